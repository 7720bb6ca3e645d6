"""One training run of one method on one task, measured: losses, FLOPs, time, ratios."""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vcas import Controller, VCASConfig, attach

from . import baselines
from .data import batches
from .tasks import Task

METHODS = ("exact", "vcas", "vcas-paper", "vcas-adaptive", "sb", "ub")


@dataclasses.dataclass
class RunSettings:
    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    weight_decay: float = 0.01
    baseline_keep: float = 1 / 3
    eval_limit: int | None = None
    vcas: VCASConfig = dataclasses.field(default_factory=VCASConfig)
    adaptive_update_every: int | None = None  # vcas-adaptive's longest calibration interval
    variance_checks: int = 0  # large-sample checks of the variance bound during VCAS runs
    check_batches: int = 6
    check_draws: int = 2


@dataclasses.dataclass
class RunResult:
    method: str
    losses: list[float]
    cumulative_flops: list[float]
    train_seconds: float
    eval_accuracy: float
    exact_step_flops: float | None = None
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    variance_checks: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def final_train_loss(self) -> float:
        """Mean training loss over the last 5 % of steps (at least one step)."""
        tail = max(1, math.ceil(0.05 * len(self.losses)))
        return sum(self.losses[-tail:]) / tail


def endless_batches(tensors: dict[str, torch.Tensor], batch_size: int, seed: int) -> Iterator[dict]:
    """Shuffled batches epoch after epoch, each epoch with its own seed: a fixed data order."""
    for epoch in itertools.count():
        yield from batches(tensors, batch_size, shuffle=True, seed=seed + epoch, drop_last=True)


def run_method(task: Task, method: str, settings: RunSettings,
               progress: Callable[[int, float], None] | None = None) -> RunResult:
    """Train a fresh model of ``task`` with ``method`` for ``settings.steps`` optimizer steps."""
    torch.manual_seed(settings.seed)
    model = task.build_model()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed + 17)
    training = endless_batches(task.train, settings.batch_size, seed=1000 * settings.seed)
    calibration = endless_batches(task.train, settings.batch_size, seed=1000 * settings.seed + 500)

    def mean_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(task.logits(model, batch), batch["labels"])

    controller = _controller(model, method, settings)
    if controller is not None:
        controller.measure_flops(mean_loss, next(calibration))

    losses, flops, elapsed, exact_step, checks = [], [], 0.0, None, []
    check_steps = _check_steps(settings) if method.startswith("vcas") else set()
    for step in range(1, settings.steps + 1):
        batch = next(training)
        started = time.perf_counter()
        if step == 1 and method == "exact":
            with FlopCounterMode(display=False) as counter:
                loss = _train_step(task, model, batch, method, settings, generator)
            exact_step = float(counter.get_total_flops())
        else:
            loss = _train_step(task, model, batch, method, settings, generator)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if method.startswith("vcas"):
            controller.maybe_calibrate(mean_loss, calibration)
        elapsed += time.perf_counter() - started
        losses.append(loss)
        flops.append(controller.flops.spent_flops() if controller else step * (exact_step or 0.0))
        if progress:
            progress(step, loss)
        if step in check_steps:  # outside the timed region, not counted in the FLOPs
            check_batches = [next(calibration) for _ in range(settings.check_batches)]
            checks.append({"step": step, **controller.check_variance(
                mean_loss, check_batches, draws=settings.check_draws)})
    accuracy = evaluate(task, model, settings)
    result = RunResult(method, losses, flops, elapsed, accuracy, exact_step, variance_checks=checks)
    if controller is not None:
        result.stats = controller.stats()
        result.history = list(controller.history)
        controller.detach()
    return result


def _check_steps(settings: RunSettings) -> set[int]:
    count = settings.variance_checks
    return {max(1, round(settings.steps * (k + 1) / (count + 1))) for k in range(count)}


def _controller(model: torch.nn.Module, method: str, settings: RunSettings) -> Controller | None:
    if method == "exact":
        return None
    config = settings.vcas
    if method == "vcas-paper":
        config = dataclasses.replace(config, controller="paper")
    elif method == "vcas-adaptive":
        config = dataclasses.replace(config, controller="adaptive",
                                     update_every=settings.adaptive_update_every)
    controller = attach(model, config)
    if method in ("sb", "ub"):
        # Exact sampled layers: they skip the all-zero rows of the dropped samples and count FLOPs.
        controller.set_ratios(act=1.0, weight=1.0)
    return controller


def _train_step(task: Task, model: torch.nn.Module, batch: dict[str, torch.Tensor], method: str,
                settings: RunSettings, generator: torch.Generator) -> float:
    logits = task.logits(model, batch)
    per_sample = F.cross_entropy(logits, batch["labels"], reduction="none")
    if method == "sb":
        loss = (baselines.selective_backprop_weights(per_sample, settings.baseline_keep) * per_sample).sum()
    elif method == "ub":
        weights = baselines.upper_bound_weights(per_sample, logits, settings.baseline_keep, generator)
        loss = (weights * per_sample).sum()
    else:
        loss = per_sample.mean()
    loss.backward()
    return float(per_sample.detach().mean())  # the full-batch loss, comparable across methods


@torch.no_grad()
def evaluate(task: Task, model: torch.nn.Module, settings: RunSettings) -> float:
    model.eval()
    correct = total = 0
    for batch in batches(task.eval, 128):
        if settings.eval_limit is not None and total >= settings.eval_limit:
            break
        correct += int((task.logits(model, batch).argmax(-1) == batch["labels"]).sum())
        total += batch["labels"].numel()
    model.train()
    return correct / max(1, total)
