"""Wall-clock of a training step on a built-in task and of the controllers' calibrations.

    python3 benchmarks/step_time.py exact 12     # exact training steps
    python3 benchmarks/step_time.py paper 21     # VCAS steps, calibrating every 10 steps
    python3 benchmarks/step_time.py 0.3 12       # VCAS at fixed keep ratios act = weight = 0.3
    python3 benchmarks/step_time.py adaptive 14  # adaptive controller, calibrating every 2-4 steps
    python3 benchmarks/step_time.py 0.5 30 mnist-vit  # any mode on another built-in task (default bbc-minilm)

Prints the median step time (forward, backward and optimizer step) and the total time spent in
``maybe_calibrate``; for ``adaptive`` also the median of its calibration steps (exact backward
that records per-sample statistics) apart from the others.
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

import vcas
from vcas_lab import tasks
from vcas_lab.train import endless_batches


def main(mode: str, steps: int, task_name: str = "bbc-minilm") -> None:
    task = tasks.builtin_task(task_name, 128)
    torch.manual_seed(0)
    model = task.build_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=task.lr)
    training = endless_batches(task.train, task.batch_size, 0)
    calibration = endless_batches(task.train, task.batch_size, 500)

    def loss_fn(batch):
        return F.cross_entropy(task.logits(model, batch), batch["labels"])

    config = (vcas.VCASConfig(controller="adaptive", update_every=4, min_update_every=2, seed=0)
              if mode == "adaptive" else vcas.VCASConfig(update_every=10, seed=0))
    controller = None if mode == "exact" else vcas.attach(model, config)
    if mode not in ("exact", "paper", "adaptive"):
        controller.set_ratios(act=float(mode), weight=float(mode))
    step_times, recording_times, calibration_time = [], [], 0.0
    for _ in range(steps):
        batch = next(training)
        recording = mode == "adaptive" and controller.calibrating
        started = time.perf_counter()
        loss_fn(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        (recording_times if recording else step_times).append(time.perf_counter() - started)
        if mode in ("paper", "adaptive"):
            started = time.perf_counter()
            controller.maybe_calibrate(loss_fn, calibration)
            calibration_time += time.perf_counter() - started
    recorded = (f", calibration steps {statistics.median(recording_times):.3f} s "
                f"({len(recording_times)})" if recording_times else "")
    print(f"{mode}: median step {statistics.median(step_times[2:]):.3f} s over {len(step_times)} steps"
          f"{recorded}, maybe_calibrate {calibration_time:.1f} s in all")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:4])
