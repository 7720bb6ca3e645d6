"""Large-sample checks of the sampled gradient on a built-in task, at fixed activation keep
ratios, after training exact for a while (weight gradients exact: activation sampling alone).

    python3 benchmarks/gradient_checks.py bias   [--task T] [--steps N] [--act R] [--draws D] [--trials K]
    python3 benchmarks/gradient_checks.py groups [--task T] [--steps N] [--act R] [--batches B] [--draws D]

``bias``: for each of K fresh batches (and a fresh sampling seed), D sampled gradients are split
into two interleaved halves. The dot product of the halves' mean errors against the exact
gradient, ``<mean_A - g, mean_B - g>``, has expectation ``||E[sampled] - g||^2``: for an unbiased
estimator it is 0 in expectation, so the dot products scatter symmetrically around 0. Printed per
parameter group and for all parameters, over the batches: its mean and standard error, in units
of the halves' noise level (one draw's mean squared error over D / 2). Six groups are tested at
once: one of them reading |t| near 2 by chance is likely; a bias reads far above it in "all".
Printed beside: the bias, relative to ``||g||``, that would read 2 standard errors above 0 on
average (detected about half the time) and the one detected 95 % of the time.

``groups``: the variance activation sampling adds (one draw's mean squared error against each
batch's exact gradient) against the SGD variance (``||g_1 - g_2||^2 / 2`` over pairs of batches),
per parameter group, with standard errors over the pairs: the weights the controller measures
(its bound is on them, at the ratios it picks), the other linear weights (a head above every
sampler gets the exact gradient), embeddings, biases and normalisation. Beside it, the same
ratio in AdamW's metric: each coordinate's variance divided by ``(sqrt(v_hat) + eps)^2`` from the
exact run's optimizer, as it reaches the update. The controller bounds the plain sum; if sampling
put its variance on coordinates with small second moments, AdamW would amplify it there.

Dropout draws the same masks for the exact gradient and for each of its sampled draws, so only
the sampling differs. ``--sync-free`` checks the sync-free path (the GPU's) on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

import vcas
from vcas.control.diagnostics import ratio_of_sums
from vcas_lab.tasks import Task, builtin_task
from vcas_lab.train import endless_batches

# Two-sided 95 % interval and one-sided 95 % power, in standard errors.
DETECTED_ON_AVERAGE, DETECTED_95 = 2.0, 2.0 + 1.645


def trained(task_name: str, steps: int) -> tuple[Task, nn.Module, Iterator[dict], torch.optim.AdamW]:
    """The task's model after ``steps`` exact AdamW steps (seed 0), the batch stream after them,
    and the optimizer."""
    task = builtin_task(task_name)
    torch.manual_seed(0)
    model = task.build_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=task.lr)
    batches = endless_batches(task.train, task.batch_size, 0)
    for _ in range(steps):
        losses, _ = task.kind.per_sample_loss(model, next(batches))
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return task, model, batches, optimizer


def adam_scales(model: nn.Module, optimizer: torch.optim.AdamW) -> torch.Tensor:
    """Per flat coordinate, ``1 / (sqrt(v_hat) + eps)^2``: what AdamW multiplies a gradient
    coordinate's variance by in its update (before the learning rate), from the optimizer's
    bias-corrected second moments (zero where a parameter has none yet)."""
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    scales = []
    for parameter in model.parameters():
        state = optimizer.state.get(parameter, {})
        if "exp_avg_sq" not in state:
            scales.append(torch.zeros(parameter.numel(), dtype=torch.float64))
            continue
        group = groups[id(parameter)]
        beta2, eps = group["betas"][1], group["eps"]
        v_hat = state["exp_avg_sq"].double().flatten() / (1 - beta2 ** float(state["step"]))
        scales.append((v_hat.sqrt() + eps).pow(-2))
    return torch.cat(scales)


def sampled_copy(task: Task, model: nn.Module, act: float, seed: int,
                 sync_free: bool) -> tuple[nn.Module, vcas.Controller]:
    """A copy of ``model`` that samples activation gradients at keep ratio ``act`` everywhere."""
    copied = copy.deepcopy(model)
    controller = vcas.attach(copied, vcas.VCASConfig(seed=seed, sync_free=sync_free), **task.attach_options)
    controller.set_ratios(act=act, weight=1.0)
    return copied, controller


def flat_gradient(task: Task, model: nn.Module, batch: dict, dropout_seed: int) -> torch.Tensor:
    """The gradient of the batch's mean loss, all parameters flattened (zeros where unused),
    with dropout drawing from ``dropout_seed``."""
    model.zero_grad()
    torch.manual_seed(dropout_seed)
    losses, _ = task.kind.per_sample_loss(model, batch)
    losses.mean().backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in model.parameters()])


def parameter_groups(model: nn.Module, controller: vcas.Controller) -> dict[str, torch.Tensor]:
    """Flat positions of each group of parameters, and of all of them."""
    measured = {id(p) for p in controller.measured_parameters.values()}
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    positions: dict[str, list[torch.Tensor]] = {}
    offset = 0
    for name, parameter in model.named_parameters():
        positions.setdefault(_group(name, parameter, measured, linear_weights), []).append(
            torch.arange(offset, offset + parameter.numel()))
        offset += parameter.numel()
    groups = {group: torch.cat(parts) for group, parts in positions.items()}
    groups["all"] = torch.arange(offset)
    return groups


def _group(name: str, parameter: nn.Parameter, measured: set[int], linear_weights: set[int]) -> str:
    if id(parameter) in measured:
        return "measured"
    if id(parameter) in linear_weights:
        return "other linear"
    if "embed" in name:
        return "embeddings"
    if "norm" in name.lower():
        return "normalisation"
    return "biases" if name.endswith("bias") else "other"


# ------------------------------------------------------------------------------------ bias
def half_products(task: Task, model: nn.Module, sampled: nn.Module, batch: dict, draws: int,
                  groups: dict[str, torch.Tensor], dropout_seed: int) -> tuple[dict[str, float], float]:
    """Per group, ``<mean_A - g, mean_B - g>`` over the noise level (None where nothing is
    sampled), and ``||g||^2`` over the noise level of all parameters."""
    exact = flat_gradient(task, model, batch, dropout_seed)
    halves = [torch.zeros_like(exact), torch.zeros_like(exact)]
    squares = torch.zeros_like(exact)
    for draw in range(draws):
        error = flat_gradient(task, sampled, batch, dropout_seed) - exact
        halves[draw % 2] += error
        squares += error.pow(2)
    mean_a, mean_b = (half / (draws // 2) for half in halves)
    noise = squares / draws / (draws // 2)  # per coordinate: the squared error of one half's mean
    products = {}
    for group, index in groups.items():
        level = float(noise[index].sum())
        if level > 0:  # a group above every sampler gets the exact gradient
            products[group] = float((mean_a[index] * mean_b[index]).sum()) / level
    return products, float(exact.pow(2).sum()) / float(noise.sum())


def bias(args: argparse.Namespace) -> None:
    task, model, batches, _ = trained(args.task, args.steps)
    found: dict[str, list[float]] = {}
    signal: list[float] = []  # ||g||^2 over the noise level, per batch
    for trial in range(args.trials):
        sampled, controller = sampled_copy(task, model, args.act, 100 + trial, args.sync_free)
        groups = parameter_groups(sampled, controller)
        products, snr = half_products(task, model, sampled, next(batches), args.draws, groups, 1000 + trial)
        for group, value in products.items():
            found.setdefault(group, []).append(value)
        signal.append(snr)
        print(f"trial {trial}: <mean_A - g, mean_B - g> / noise level {products['all']:+.3f}", flush=True)
    print(f"\n{args.task}, {args.steps} exact steps, activation keep ratio {args.act}, "
          f"{args.trials} batches x {args.draws} draws{', sync-free' if args.sync_free else ''}")
    for group, values in found.items():
        mean, error = statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))
        t = f"{mean / error:+.2f}" if error > 0 else "-"
        print(f"{group:15s} {mean:+.3f} +- {error:.3f} (t = {t})")
    error_all = statistics.stdev(found["all"]) / math.sqrt(len(found["all"]))
    # A bias b with ||b||^2 = z x error x level reads z standard errors above 0; relative to
    # ||g||: sqrt(z x error / mean(||g||^2 / level)).
    relative = [math.sqrt(z * error_all / statistics.fmean(signal)) for z in (DETECTED_ON_AVERAGE, DETECTED_95)]
    print(f"a bias of {relative[0]:.1%} of ||g|| would read 2 standard errors above 0 on average "
          f"(detected about half the time); {relative[1]:.1%} would be detected 95 % of the time")


# ------------------------------------------------------------------------------------ groups
def added_variance(args: argparse.Namespace) -> None:
    task, model, batches, optimizer = trained(args.task, args.steps)
    scales = adam_scales(model, optimizer)
    sampled, controller = sampled_copy(task, model, args.act, 0, args.sync_free)
    groups = parameter_groups(sampled, controller)
    sgd: dict[str, list[float]] = {group: [] for group in groups}
    added: dict[str, list[float]] = {group: [] for group in groups}
    # The same in AdamW's metric: each coordinate's variance as it reaches the update.
    sgd_adam: dict[str, list[float]] = {group: [] for group in groups}
    added_adam: dict[str, list[float]] = {group: [] for group in groups}
    for pair in range(args.batches // 2):
        exact, squares = [], None
        for side in range(2):
            batch, seed = next(batches), 1000 + 2 * pair + side
            g = flat_gradient(task, model, batch, seed)
            exact.append(g)
            for _ in range(args.draws):
                error = (flat_gradient(task, sampled, batch, seed) - g).double().pow(2)
                squares = error if squares is None else squares + error
        between = (exact[0] - exact[1]).double().pow(2) / 2
        assert squares is not None
        for group, index in groups.items():
            sgd[group].append(float(between[index].sum()))
            added[group].append(float(squares[index].sum()) / (2 * args.draws))
            sgd_adam[group].append(float((between[index] * scales[index]).sum()))
            added_adam[group].append(float((squares[index] * scales[index]).sum()) / (2 * args.draws))
    print(f"{args.task}, {args.steps} exact steps, activation keep ratio {args.act}, "
          f"{args.batches} batches x {args.draws} draws{', sync-free' if args.sync_free else ''}")
    for group in groups:
        print(f"{group:15s} V_sgd {statistics.fmean(sgd[group]):.3e}  V_added {statistics.fmean(added[group]):.3e}  "
              f"V_added / V_sgd {_ratio(added[group], sgd[group])}  "
              f"in AdamW's metric {_ratio(added_adam[group], sgd_adam[group])}")


def _ratio(numerators: list[float], denominators: list[float]) -> str:
    ratio, error = ratio_of_sums(numerators, denominators)
    return f"{ratio:.4f} +- {error:.4f}" if math.isfinite(ratio) else "-"


# ------------------------------------------------------------------------------------ command line
def _arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=("bias", "groups"))
    parser.add_argument("--task", default="mnist-vit")
    parser.add_argument("--steps", type=int, default=300, help="exact training steps first (default 300)")
    parser.add_argument("--act", type=float, default=0.4, help="activation keep ratio, in (0, 1) (default 0.4)")
    parser.add_argument("--draws", type=int, default=None,
                        help="sampled draws per batch (bias: even, default 100; groups: default 3)")
    parser.add_argument("--trials", type=int, default=10, help="bias: batches, at least 2 (default 10)")
    parser.add_argument("--batches", type=int, default=12, help="groups: batches, even, at least 4 (default 12)")
    parser.add_argument("--sync-free", action="store_true", help="VCASConfig(sync_free=True)")
    args = parser.parse_args(argv)
    args.draws = args.draws if args.draws is not None else (100 if args.check == "bias" else 3)
    problems = [message for bad, message in (
        (not 0 < args.act < 1, "--act must be in (0, 1): at 1 nothing is sampled"),
        (args.steps < 0, "--steps must be at least 0"),
        (args.check == "bias" and (args.draws < 2 or args.draws % 2), "--draws must be even and at least 2"),
        (args.check == "groups" and args.draws < 1, "--draws must be at least 1"),
        (args.check == "bias" and args.trials < 2, "--trials must be at least 2 (a standard error needs 2)"),
        (args.check == "groups" and (args.batches < 4 or args.batches % 2), "--batches must be even and at least 4"),
    ) if bad]
    if problems:
        parser.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> Any:
    args = _arguments(argv)
    return bias(args) if args.check == "bias" else added_variance(args)


if __name__ == "__main__":
    main()
