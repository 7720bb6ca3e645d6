"""Paired training-step times on a built-in task: exact against vcas at fixed keep ratios.

    python3 benchmarks/paired_steps.py mnist-vit 25 1,1 0.9,1 1,0.2 0.4,1
    python3 benchmarks/paired_steps.py bbc-minilm 10 1,1 0.9,1 1,0.5 0.6,0.3

Each argument after the step count is ``act,weight``. Every model starts from the same weights
and, step after step, every variant trains on the same batch in turn, so the machine's drifts
hit all of them alike; printed are the median step time and the median of the per-step ratios
to the exact step (forward, backward and optimizer step). ``set_ratios`` applies the ratios as
given (``min_weight_numel`` limits only the controllers); other ``VCASConfig`` settings are the
defaults.
"""

import copy
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
        if variant != "exact":
            act, weight = (float(v) for v in variant.split(","))
            vcas.attach(model, vcas.VCASConfig(seed=0)).set_ratios(act=act, weight=weight)
        runs.append((variant, model, torch.optim.AdamW(model.parameters(), lr=task.lr)))
    batches = endless_batches(task.train, task.batch_size, 0)
    times: dict[str, list[float]] = {variant: [] for variant, _, _ in runs}
    for _ in range(steps):
        batch = next(batches)
        for variant, model, optimizer in runs:
            started = time.perf_counter()
            losses, _ = task.kind.per_sample_loss(model, batch)
            losses.mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[variant].append(time.perf_counter() - started)
    warm = 3  # the first steps allocate and warm caches
    exact = times["exact"][warm:]
    for variant, measured in times.items():
        ratios = [t / e for t, e in zip(measured[warm:], exact)]
        print(f"{variant:10s} median step {statistics.median(measured[warm:]) * 1e3:7.1f} ms, "
              f"median ratio to exact {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
