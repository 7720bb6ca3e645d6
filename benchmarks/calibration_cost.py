"""What the adaptive controller's calibrations cost, in lockstep with exact training.

    python3 benchmarks/calibration_cost.py mnist-vit 400 --min-weight-numel 0

Two copies of the task's model train on the same batches in turn (as in paired_run.py) for the
given number of steps. Printed: the median step-time ratio to exact of ordinary steps and of
calibration steps (an exact backward that records per-sample statistics), the time of each
controller update (``maybe_calibrate`` after a calibration step: pooling and solving), and the
seconds all calibration steps and all ordinary steps added to exact training's time.
"""

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import vcas
from vcas_lab import tasks
from vcas_lab.train import endless_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=sorted(tasks.BUILTIN))
    parser.add_argument("steps", type=int)
    parser.add_argument("--update-every", type=int, default=None)
    parser.add_argument("--min-weight-numel", type=int, default=None)
    args = parser.parse_args()

    task = tasks.builtin_task(args.task, 128)
    torch.manual_seed(0)
    exact = task.build_model().train()
    sampled = copy.deepcopy(exact)
    options = {"seed": 0, "update_every": args.update_every}
    if args.min_weight_numel is not None:
        options["min_weight_numel"] = args.min_weight_numel
    controller = vcas.attach(sampled, vcas.VCASConfig(**options))
    optimizers = {id(m): torch.optim.AdamW(m.parameters(), lr=task.lr) for m in (exact, sampled)}
    training = endless_batches(task.train, task.batch_size, 0)
    calibration = endless_batches(task.train, task.batch_size, 500)

    def loss_of(model, batch):
        return F.cross_entropy(task.logits(model, batch), batch["labels"])

    def train_step(model, batch) -> float:
        started = time.perf_counter()
        loss_of(model, batch).backward()
        optimizers[id(model)].step()
        optimizers[id(model)].zero_grad(set_to_none=True)
        return time.perf_counter() - started

    controller.measure_flops(lambda b: loss_of(sampled, b), next(calibration))
    rows = []  # (exact step, vcas step, maybe_calibrate, was a calibration step)
    for _ in range(args.steps):
        batch = next(training)
        exact_seconds = train_step(exact, batch)
        calibrating = controller.calibrating
        vcas_seconds = train_step(sampled, batch)
        started = time.perf_counter()
        controller.maybe_calibrate(lambda b: loss_of(sampled, b), calibration)
        rows.append((exact_seconds, vcas_seconds, time.perf_counter() - started, calibrating))
    rows = rows[5:]  # the first steps allocate and warm caches
    calibrations = [r for r in rows if r[3]]
    ordinary = [r for r in rows if not r[3]]
    stats = controller.stats()
    print(f"{args.task}, {args.steps} steps, {stats['controller']} controller "
          f"(F = {stats['update_every']}), {len(calibrations)} calibration steps")
    print(f"ordinary steps: median ratio to exact {statistics.median(v / e for e, v, _, _ in ordinary):.3f}")
    if calibrations:
        updates = [u * 1e3 for _, _, u, _ in calibrations]
        print(f"calibration steps: median ratio to exact "
              f"{statistics.median(v / e for e, v, _, _ in calibrations):.3f}; controller update "
              f"median {statistics.median(updates):.0f} ms, max {max(updates):.0f} ms")
    added = {name: sum(v + u - e for e, v, u, _ in group)
             for name, group in (("calibration", calibrations), ("ordinary", ordinary))}
    total_exact = sum(e for e, _, _, _ in rows)
    print(f"time added to exact training's {total_exact:.1f} s: calibration steps "
          f"{added['calibration']:.1f} s, ordinary steps {added['ordinary']:.1f} s")
    print(f"act ratios at the end {[round(r, 3) for r in stats['act_ratios']]}")


if __name__ == "__main__":
    main()
