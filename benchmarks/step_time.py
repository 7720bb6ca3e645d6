"""Wall-clock of a bbc-minilm training step and of the paper controller's calibrations.

    python3 benchmarks/step_time.py exact 12     # exact training steps
    python3 benchmarks/step_time.py paper 21     # VCAS steps, calibrating every 10 steps
    python3 benchmarks/step_time.py 0.3 12       # VCAS at fixed keep ratios act = weight = 0.3

Prints the median step time (forward, backward and optimizer step) and the total time spent in
``maybe_calibrate``.
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

import vcas
from vcas.experiments import tasks
from vcas.experiments.train import endless_batches


def main(mode: str, steps: int) -> None:
    task = tasks.builtin_task("bbc-minilm", 128)
    torch.manual_seed(0)
    model = task.build_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=task.lr)
    training = endless_batches(task.train, task.batch_size, 0)
    calibration = endless_batches(task.train, task.batch_size, 500)

    def loss_fn(batch):
        return F.cross_entropy(task.logits(model, batch), batch["labels"])

    controller = None if mode == "exact" else vcas.attach(model, vcas.VCASConfig(update_every=10, seed=0))
    if mode not in ("exact", "paper"):
        controller.set_ratios(act=float(mode), weight=float(mode))
    step_times, calibration_time = [], 0.0
    for _ in range(steps):
        batch = next(training)
        started = time.perf_counter()
        loss_fn(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - started)
        if mode == "paper":
            started = time.perf_counter()
            controller.maybe_calibrate(loss_fn, calibration)
            calibration_time += time.perf_counter() - started
    print(f"{mode}: median step {statistics.median(step_times[2:]):.3f} s over {steps} steps, "
          f"calibration {calibration_time:.1f} s in all")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
