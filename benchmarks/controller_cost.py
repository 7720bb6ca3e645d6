"""What one decision of the adaptive controller costs: the seconds of each ``maybe_calibrate()``
call that updated the ratios (the solve of s and every nu from the calibration step's records),
over a short run of a built-in task at the defaults, seed 0.

The decisions depend only on the seed and the library, so run this script against two checkouts
in turn to compare what their decisions cost: the totals compare the same work while the two
make the same decisions (the final s printed shows whether they ended alike; a change to the
solve can move a decision by a grid point and the runs apart from there).

    python3 benchmarks/controller_cost.py [TASK] [STEPS]    (default mnist-vit, 60)
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import vcas
from vcas_lab.tasks import builtin_task
from vcas_lab.train import endless_batches


def decision_seconds(task_name: str, steps: int) -> tuple[list[float], float]:
    """The seconds of every decision, and the run's final s."""
    torch.manual_seed(0)
    task = builtin_task(task_name)
    model = task.build_model()
    controller = vcas.attach(model, vcas.VCASConfig(seed=0), **task.attach_options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=task.lr)
    batches = endless_batches(task.train, task.batch_size, 0)
    seconds = []
    for _ in range(steps):
        losses, _ = task.kind.per_sample_loss(model, next(batches))
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        start = time.perf_counter()
        if controller.maybe_calibrate():
            seconds.append(time.perf_counter() - start)
    return seconds, controller.stats()["s"]


def main() -> None:
    task_name = sys.argv[1] if len(sys.argv) > 1 else "mnist-vit"
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 60
    seconds, s = decision_seconds(task_name, steps)
    if not seconds:
        raise SystemExit(f"{task_name}, {steps} steps: the controller made no decision")
    print(f"{task_name}, {steps} steps: {len(seconds)} decisions, median {statistics.median(seconds) * 1e3:.1f} ms, "
          f"total {sum(seconds):.2f} s, final s {s:.4f}")


if __name__ == "__main__":
    main()
