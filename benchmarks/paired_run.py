"""A whole training run of exact training and of vcas in lockstep: the time ratio, robust to drift.

    python3 benchmarks/paired_run.py mnist-vit --epochs 2 --update-every 25 --min-weight-numel 0
    python3 benchmarks/paired_run.py bbc-minilm --epochs 3

``vcas compare`` runs its methods one after the other, so a machine whose speed drifts (this
2-core CPU: exact training of mnist-vit took from 180 to 228 s in runs of the same code) moves
their time ratio by more than the effect measured. Here two copies of the task's model start
from the same weights and, step after step, train on the same batch in turn (vcas: forward,
backward, optimizer step and ``maybe_calibrate``, with the default ``VCASConfig`` but for the
options given), so every drift hits both alike (``--vcas-first`` swaps the order within a step). Printed: each run's total time and their ratio,
the median per-step ratio, the vcas run's whole-training FLOPs reduction (calibration included)
and both final train losses (mean of the last 5 % of steps, as ``vcas compare`` reports).
"""

import argparse
import copy
import math
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
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--update-every", type=int, default=None)
    parser.add_argument("--min-weight-numel", type=int, default=None)
    parser.add_argument("--max-weight-ratio", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vcas-first", action="store_true",
                        help="run the vcas step before the exact one (a check of order effects)")
    args = parser.parse_args()

    task = tasks.builtin_task(args.task, 128)
    steps = math.ceil((args.epochs or task.epochs) * (len(task.train["labels"]) // task.batch_size))
    torch.manual_seed(args.seed)
    exact = task.build_model().train()
    sampled = copy.deepcopy(exact)
    options = {"seed": args.seed, "update_every": args.update_every}
    for name in ("min_weight_numel", "max_weight_ratio"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    controller = vcas.attach(sampled, vcas.VCASConfig(**options))
    optimizers = {id(m): torch.optim.AdamW(m.parameters(), lr=task.lr, weight_decay=0.01)
                  for m in (exact, sampled)}
    training = endless_batches(task.train, task.batch_size, seed=1000 * args.seed)
    calibration = endless_batches(task.train, task.batch_size, seed=1000 * args.seed + 500)

    def step(model, batch) -> tuple[float, float]:
        started = time.perf_counter()
        loss = F.cross_entropy(task.logits(model, batch), batch["labels"])
        loss.backward()
        optimizers[id(model)].step()
        optimizers[id(model)].zero_grad(set_to_none=True)
        if model is sampled:
            controller.maybe_calibrate(lambda b: F.cross_entropy(task.logits(sampled, b), b["labels"]),
                                       calibration)
        return time.perf_counter() - started, float(loss.detach())

    controller.measure_flops(lambda b: F.cross_entropy(task.logits(sampled, b), b["labels"]),
                             next(calibration))
    order = [("exact", exact), ("vcas", sampled)][::-1 if args.vcas_first else 1]
    times = {"exact": [], "vcas": []}
    losses = {"exact": [], "vcas": []}
    for _ in range(steps):
        batch = next(training)
        for name, model in order:
            seconds, loss = step(model, batch)
            times[name].append(seconds)
            losses[name].append(loss)
    tail = max(1, math.ceil(0.05 * steps))
    stats = controller.stats()
    ratio = sum(times["vcas"]) / sum(times["exact"])
    per_step = statistics.median(v / e for v, e in zip(times["vcas"], times["exact"]))
    print(f"{args.task}, {steps} steps, {stats['controller']} controller (F = {stats['update_every']}), "
          f"{stats['updates']} updates")
    print(f"time: exact {sum(times['exact']):.1f} s, vcas {sum(times['vcas']):.1f} s, "
          f"ratio {ratio:.3f} (time reduction {(1 - ratio) * 100:.1f} %); median step ratio {per_step:.3f}")
    print(f"vcas train FLOPs reduction {stats['train_flops_reduction'] * 100:.1f} % "
          f"(BP {stats['bp_flops_reduction'] * 100:.1f} %)")
    print(f"final train loss: exact {sum(losses['exact'][-tail:]) / tail:.4f}, "
          f"vcas {sum(losses['vcas'][-tail:]) / tail:.4f}")


if __name__ == "__main__":
    main()
