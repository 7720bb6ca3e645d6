"""The added variance at the adaptive controller's keep ratios, batch by batch, at one point of a
``vcas compare`` run (the same task, seed and step count, so the same learning-rate schedule).

Trains VCAS with the defaults for STEP steps of a STEPS-step run, then, at the activation keep
ratios in force, on 12 fresh batches of the training set (the stream the variance checks use):

- the controller's own estimates from one recording pass of each batch: V_sgd within the batch
  and the V_act it predicts at those ratios, and their ratio;
- V_act measured: the mean squared error of 8 activation-sampling-only draws against the
  batch's exact gradient;
- V_sgd between batches, ``||g_1 - g_2||^2 / 2`` over the 6 pairs of batches;

and the check-like ratio (mean measured V_act over V_sgd between batches) beside the mean of the
predicted ratios. Comparing it with the ratio the controller's last calibration predicted at the
same keep ratios (its ``history`` in the run's report) tells a controller that mis-predicts from
a model whose added variance moved between calibrations.

Usage: python benchmarks/variance_by_batch.py [TASK] [STEP] [STEPS]   (default: bbc-lm 50 100)
"""

from __future__ import annotations

import sys

import torch
from variance_estimates import recorded_calibration, trained_run

from vcas.control import prediction
from vcas.control.mechanism import scalar_loss
from vcas_lab.train import endless_batches

BATCHES, DRAWS = 12, 8


def main(task_name: str = "bbc-lm", at_step: int = 50, steps: int = 100) -> None:
    torch.set_num_threads(1)
    run = trained_run(task_name, at_step, steps)
    task = run.task
    ctl = run.controller
    mech = ctl.mechanism
    params = mech.measured
    names = list(params)
    act = mech.ratios.act_list

    def gradient(loss: torch.Tensor, retain: bool) -> torch.Tensor:
        grads = torch.autograd.grad(loss, [params[n] for n in names], retain_graph=retain, allow_unused=True)
        return torch.cat([(torch.zeros_like(params[n]) if g is None else g).detach().double().flatten()
                          for n, g in zip(names, grads)])

    def measured(batch) -> tuple[torch.Tensor, float]:
        """The batch's exact gradient, and the mean squared error of sampled draws against it."""
        with mech.isolated(enabled=True, record_samples=False, record_norms=False, record_row_scores=False):
            with mech.runtime.using(sample_acts=False, sample_weights=False):
                loss = scalar_loss(run.mean_loss, batch)
                exact = gradient(loss, True)
            error = 0.0
            for draw in range(DRAWS):
                with mech.runtime.using(sample_acts=True, sample_weights=False):
                    error += float((gradient(loss, draw < DRAWS - 1) - exact).pow(2).sum()) / DRAWS
        return exact, error

    def predicted(batch) -> tuple[float, float]:
        """The controller's V_sgd and predicted V_act at the ratios in force, from one recording pass."""
        stats = recorded_calibration(run, batch)
        return (sum(stats.sgd_variances().values()),
                sum(prediction.act_variances(stats, mech.above_positions, act).values()))

    print(f"task {task_name}, step {at_step} of {steps}; activation keep ratios {[round(r, 3) for r in act]}")
    print("the controller's calibrations (step, its predicted V_act / V_sgd at the ratios it chose): "
          + ", ".join(f"({h['step']}, {h['var_act'] / h['var_sgd']:.4f})" for h in ctl.history if h['var_sgd'] > 0))
    stream = endless_batches(task.train, task.batch_size, seed=700)
    rows = []
    for index in range(BATCHES):
        batch = next(stream)
        exact, act_measured = measured(batch)
        sgd, act_predicted = predicted(batch)
        rows.append((exact, act_measured, sgd, act_predicted))
        print(f"batch {index:2d}: V_sgd (controller) {sgd:.4g}  V_act predicted {act_predicted:.4g}  "
              f"measured {act_measured:.4g}  predicted ratio {act_predicted / sgd:.4f}")
    pairs = BATCHES // 2
    between = sum(float((rows[2 * k][0] - rows[2 * k + 1][0]).pow(2).sum()) / 2 for k in range(pairs)) / pairs
    mean = [sum(row[i] for row in rows) / BATCHES for i in (1, 2, 3)]
    print(f"V_sgd between batches {between:.4g}, the controller's mean {mean[1]:.4g}; "
          f"V_act measured mean {mean[0]:.4g}, predicted mean {mean[2]:.4g}")
    print(f"V_act measured / V_sgd between batches {mean[0] / between:.4f}; mean predicted ratio "
          f"{sum(row[3] / row[2] for row in rows) / BATCHES:.4f} (tau 0.025)")


if __name__ == "__main__":
    arguments = sys.argv[1:]
    main(arguments[0] if arguments else "bbc-lm", int(arguments[1]) if len(arguments) > 1 else 50,
         int(arguments[2]) if len(arguments) > 2 else 100)
