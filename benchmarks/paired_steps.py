"""Paired training-step times on a built-in task: exact against vcas at fixed keep ratios.

    python3 benchmarks/paired_steps.py mnist-vit 25 1,1 0.9,1 1,0.2 0.4,1
    python3 benchmarks/paired_steps.py bbc-minilm 10 1,1 0.9,1 1,0.5 0.6,0.3

Each argument after the step count is ``act,weight``. Every model starts from the same weights
and, step after step, every variant trains on the same batch in turn, so the machine's drifts
hit all of them alike; printed are the median step time and the median of the per-step ratios
to the exact step (forward, backward and optimizer step); then the same per phase, with the
backward's FLOPs against an exact backward that skips zero rows (what sampling saved; 1 for
exact) beside its time ratio: where time follows FLOPs, the two agree. ``set_ratios`` applies
the ratios as given (``min_weight_numel`` limits only the controllers); other ``VCASConfig``
settings are the defaults. The built-in tasks train on the CPU here, where a phase ends when its
call returns (on a GPU the phases would need a synchronisation each).
"""

import copy
import itertools
import statistics
import sys
import time

import torch

import vcas
from vcas_lab import tasks
from vcas_lab.train import endless_batches


def main(task_name: str, steps: int, variants: list[str]) -> None:
    task = tasks.builtin_task(task_name, 128)
    torch.manual_seed(0)
    base = task.build_model().train()
    runs = []
    for variant in ["exact"] + variants:
        model = copy.deepcopy(base)
        controller = None
        if variant != "exact":
            act, weight = (float(v) for v in variant.split(","))
            controller = vcas.attach(model, vcas.VCASConfig(seed=0))
            controller.set_ratios(act=act, weight=weight)
            # FLOPs of the whole model, not only of the sampled layers (on a batch not trained on).
            controller.measure_flops(lambda batch, model=model: task.kind.per_sample_loss(model, batch)[0].mean(),
                                     next(endless_batches(task.train, task.batch_size, 1)))
        runs.append((variant, model, torch.optim.AdamW(model.parameters(), lr=task.lr), controller))
    batches = endless_batches(task.train, task.batch_size, 0)
    times: dict[str, dict[str, list[float]]] = {variant: {phase: [] for phase in PHASES} for variant, *_ in runs}
    for _ in range(steps):
        batch = next(batches)
        for variant, model, optimizer, _ in runs:
            marks = [time.perf_counter()]
            losses, _ = task.kind.per_sample_loss(model, batch)
            loss = losses.mean()
            marks.append(time.perf_counter())
            loss.backward()
            marks.append(time.perf_counter())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            marks.append(time.perf_counter())
            for phase, took in zip(PHASES, [marks[-1] - marks[0], *(b - a for a, b in itertools.pairwise(marks))]):
                times[variant][phase].append(took)
    for variant, measured in times.items():
        ratios = _median_ratios(measured["step"], times["exact"]["step"])
        print(f"{variant:10s} median step {statistics.median(measured['step'][WARM:]) * 1e3:7.1f} ms, "
              f"median ratio to exact {ratios:.3f}")
    print("\nper phase, median ratio to exact (backward FLOPs: against an exact backward that skips zero rows)")
    for variant, _, _, controller in runs:
        phases = ", ".join(f"{phase} {_median_ratios(times[variant][phase], times['exact'][phase]):.3f}"
                           for phase in PHASES[1:])
        flops = 1.0 if controller is None else 1 - controller.stats()["sampling_bp_flops_reduction"]
        print(f"{variant:10s} {phases}; backward FLOPs {flops:.3f}")


PHASES = ("step", "forward", "backward", "optimizer")
WARM = 3  # the first steps allocate and warm caches


def _median_ratios(measured: list[float], exact: list[float]) -> float:
    return statistics.median(t / e for t, e in zip(measured[WARM:], exact[WARM:]))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
