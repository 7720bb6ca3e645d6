"""The adaptive controller's per-layer variance estimates against exact ones, on a built-in task.

Trains VCAS with the defaults for a number of steps (``vcas_lab``'s training loop), then, at the
controller's current activation keep ratios and on 6 held-back batches of the training set:

- V_act measured: the mean squared error of 16 activation-sampling-only draws against the exact
  gradient, per layer, averaged over 3 batches;
- V_act predicted: what the controller predicts from one recorded calibration pass of each batch;
- V_sgd between batches: ``||g_1 - g_2||^2 / 2`` over 3 pairs of batches;
- V_sgd within the batch, exact: from per-sample gradients (one backward per sample), 2 batches;
- V_sgd, the controller's: its within-batch estimate from the calibration records.

Usage: python benchmarks/variance_estimates.py [TASK] [STEPS]   (default: bbc-lm 30)
"""

from __future__ import annotations

import sys

import torch

from vcas.control import prediction
from vcas.control.mechanism import scalar_loss
from vcas.control.statistics import CalibrationStats
from vcas.runtime.mode import CALIBRATION
from vcas_lab.tasks import builtin_task
from vcas_lab.train import Run, RunSettings, endless_batches


def trained_run(task_name: str, train_steps: int, steps: int) -> Run:
    """VCAS with the defaults trained for ``train_steps`` steps of a ``steps``-step run (its
    learning-rate schedule), seed 0, no checks."""
    torch.manual_seed(0)
    task = builtin_task(task_name)
    settings = RunSettings(steps=steps, batch_size=task.batch_size, lr=task.lr, seed=0,
                           variance_checks=0, flop_checks=False, evaluations=1)
    run = Run(task, "vcas", settings)
    for step in range(1, train_steps + 1):
        run.step(step)
    return run


def recorded_calibration(run: Run, batch) -> CalibrationStats:
    """What a calibration step of ``run``'s controller records on ``batch`` (one exact pass)."""
    mech = run.controller.mechanism
    mech.stop_recording()
    mech.start_recording()
    with mech.isolated(phase=CALIBRATION):
        mech.exact_pass(scalar_loss(run.mean_loss, batch))
    stats = mech.take_stats()
    mech.stop_recording()
    return stats


def main(task_name: str = "bbc-lm", train_steps: int = 30) -> None:
    run = trained_run(task_name, train_steps, 10 * train_steps)
    task = run.task
    ctl = run.controller
    mech = ctl.mechanism
    params = mech.measured
    names = list(params)
    act = mech.ratios.act_list

    def grads(loss, retain):
        gs = torch.autograd.grad(loss, [params[n] for n in names], retain_graph=retain, allow_unused=True)
        return {n: (torch.zeros_like(params[n]) if g is None else g).detach().double().flatten()
                for n, g in zip(names, gs)}

    def measured(batch, draws=16):
        with mech.isolated(enabled=True, record_samples=False, record_norms=False, record_row_scores=False):
            with mech.runtime.using(sample_acts=False, sample_weights=False):
                loss = scalar_loss(run.mean_loss, batch)
                exact = grads(loss, True)
            errors = dict.fromkeys(names, 0.0)
            for draw in range(draws):
                with mech.runtime.using(sample_acts=True, sample_weights=False):
                    g = grads(loss, draw < draws - 1)
                for n in names:
                    errors[n] += float((g[n] - exact[n]).pow(2).sum()) / draws
        return exact, errors

    def within_exact(batch):
        with mech.isolated(enabled=True, record_samples=False, record_norms=False, record_row_scores=False), \
                mech.runtime.using(sample_acts=False, sample_weights=False):
            losses, _ = task.kind.per_sample_loss(run.model, batch)
            n = losses.numel()
            contributions = [grads(losses[i] / n, i < n - 1) for i in range(n)]
        result = {}
        for name in names:
            squares = sum(float(c[name].pow(2).sum()) for c in contributions)
            total = float(sum(c[name] for c in contributions).pow(2).sum())
            result[name] = (n * squares - total) / (n - 1)
        return result

    def predicted(batch):
        stats = recorded_calibration(run, batch)
        return stats.sgd_variances(), prediction.act_variances(stats, mech.above_positions, act)

    # Batches of the training set in the order the run's variance checks would take them.
    stream = endless_batches(task.train, task.batch_size, seed=700)
    batches = [next(stream) for _ in range(6)]
    exact = [measured(b, draws=1)[0] for b in batches]
    between = {n: sum(float((exact[2 * k][n] - exact[2 * k + 1][n]).pow(2).sum()) / 2 for k in range(3)) / 3
               for n in names}
    within = dict.fromkeys(names, 0.0)
    for b in batches[:2]:
        for n, v in within_exact(b).items():
            within[n] += v / 2
    act_measured, act_predicted, sgd_controller = (dict.fromkeys(names, 0.0) for _ in range(3))
    for b in batches[:3]:
        _, errors = measured(b)
        sgd, act_var = predicted(b)
        for n in names:
            act_measured[n] += errors[n] / 3
            act_predicted[n] += act_var.get(n, 0.0) / 3
            sgd_controller[n] += sgd.get(n, 0.0) / 3
    print(f"task {task_name}, after {train_steps} steps; activation keep ratios {[round(r, 3) for r in act]}")
    print(f"TOTAL V_act measured {sum(act_measured.values()):.4g} predicted {sum(act_predicted.values()):.4g} | "
          f"V_sgd between batches {sum(between.values()):.4g}, within (exact per-sample) "
          f"{sum(within.values()):.4g}, the controller's {sum(sgd_controller.values()):.4g}")
    for n in names:
        print(f"  {n:40s} V_act measured {act_measured[n]:.3g} predicted {act_predicted[n]:.3g} | V_sgd between "
              f"{between[n]:.3g} within {within[n]:.3g} controller {sgd_controller[n]:.3g}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bbc-lm", int(sys.argv[2]) if len(sys.argv) > 2 else 30)
