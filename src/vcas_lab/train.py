"""Training runs of one task with several methods, measured: losses, FLOPs, time, ratios, checks.

A :class:`Run` trains one method on one seed, a step at a time, so that runs can go one after
the other (:func:`run_sequentially`) or in lockstep (:func:`run_in_lockstep`: every method trains
on the same batch in turn, step by step, with the order alternating, so that drifts of the
machine's speed hit every method alike; the fair way to compare time on a shared machine).

Every method of one seed starts from the same weights and sees the same batches. Only the
training steps are timed: evaluations, the independent variance checks and the one-off FLOPs
measurement are not. The independent FLOPs checks run on real training steps (the same steps in
every method, so each bears the counter's slowdown alike).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from vcas import Controller, VCASConfig, attach
from vcas.control.diagnostics import FlopCount

from . import baselines
from .data import batches
from .tasks import Batch, Task

METHODS = ("exact", "exact-skip", "vcas", "vcas-paper", "vcas-adaptive", "sb", "ub")
DESCRIPTIONS = {
    "exact": "stock PyTorch",
    "exact-skip": "exact, skipping rows whose gradient is exactly zero (vcas at ratio 1, no sampling)",
    "vcas": "VCAS with the given VCASConfig (controller 'auto' unless --controller)",
    "vcas-paper": "VCAS, the paper's controller",
    "vcas-adaptive": "VCAS, the adaptive controller",
    "sb": "selective backprop: the highest-loss share of each batch",
    "ub": "upper-bound importance sampling, re-weighted",
}


@dataclasses.dataclass
class RunSettings:
    """Everything a run needs besides the task.

    Attributes:
        steps: optimizer steps.
        batch_size, lr, weight_decay: AdamW training.
        seed: the seed of the weights' initialisation, the batch order and the sampling.
        vcas: the VCASConfig of the ``vcas`` method (its seed is set from ``seed``).
        adaptive_update_every: ``update_every`` of ``vcas-adaptive`` (None: its default).
        baseline_keep: SB / UB keep ratio.
        variance_checks: independent variance checks during each VCAS run (evenly spaced).
        check_draws, check_min_pairs, check_max_pairs, check_target: per check, sampled draws
            per batch, the fewest and the most pairs of batches, and the relative standard error
            it stops at. The standard error is itself estimated from the pairs: from 4 pairs
            (3 degrees of freedom) it is uncertain by about 40 %, and 8 batches easily miss
            the rare batches that carry much of a heavy-tailed V_sgd (as in language
            modelling), reading the ratio too high with a small stated error.
        flop_checks: whether the steps of the variance checks also count their FLOPs
            independently (in every method).
        evaluations: evaluations during the run (evenly spaced; the last at the end).
        eval_limit: evaluate on the first N held-out items only.
        device: where to train; bf16: under bf16 autocast.
    """

    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    weight_decay: float = 0.01
    vcas: VCASConfig = dataclasses.field(default_factory=VCASConfig)
    adaptive_update_every: int | None = None
    baseline_keep: float = 1 / 3
    variance_checks: int = 3
    check_draws: int = 2
    check_min_pairs: int = 8
    check_max_pairs: int = 24
    check_target: float = 0.25
    flop_checks: bool = True
    evaluations: int = 5
    eval_limit: int | None = None
    device: str = "cpu"
    bf16: bool = False

    def check_steps(self) -> list[int]:
        return _spread(self.steps, self.variance_checks)

    def eval_steps(self) -> list[int]:
        return sorted(set(_spread(self.steps, self.evaluations - 1)) | {self.steps}) if self.evaluations else []


def _spread(steps: int, count: int) -> list[int]:
    """``count`` steps evenly inside ``1..steps`` (never the first: the controller has moved)."""
    return sorted({max(1, round(steps * (k + 1) / (count + 1))) for k in range(count)})


@dataclasses.dataclass
class StepLog:
    step: int
    seconds: float  # training time so far (timed steps only)
    loss: float  # the full batch's mean training loss, whatever the method trains on
    flops: float  # FLOPs spent so far (0 when the method has no tally: exact)
    s: float | None = None
    act_ratio: float | None = None  # mean over blocks
    weight_ratio: float | None = None  # mean over sampled linears
    calibrating: bool = False  # the step was an adaptive calibration step (recorded)
    phases: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per phase


@dataclasses.dataclass
class RunResult:
    method: str
    seed: int
    steps: list[StepLog]
    train_seconds: float
    evaluation: dict[str, float]
    eval_curve: list[dict[str, Any]]
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    variance_checks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    flop_checks: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        return [log.loss for log in self.steps]

    def final_train_loss(self) -> float:
        """Mean training loss over the last 5 % of steps (at least one): the last step alone is
        one batch, as noisy as any single batch."""
        tail = max(1, math.ceil(0.05 * len(self.steps)))
        return sum(self.losses[-tail:]) / tail


def endless_batches(tensors: Batch, batch_size: int, seed: int) -> Iterator[Batch]:
    """Shuffled batches epoch after epoch, each epoch with its own seed: a fixed data order."""
    for epoch in itertools.count():
        yield from batches(tensors, batch_size, shuffle=True, seed=seed + epoch, drop_last=True)


class Run:
    """One method on one seed of a task, trained a step at a time."""

    def __init__(self, task: Task, method: str, settings: RunSettings) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        self.task, self.method, self.settings = task, method, settings
        self.device = torch.device(settings.device)
        seed = settings.seed
        torch.manual_seed(seed)
        self.model = task.build_model().to(self.device)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.lr,
                                           weight_decay=settings.weight_decay)
        self.generator = torch.Generator().manual_seed(seed + 17)  # UB's draws
        self.training = endless_batches(task.train, settings.batch_size, seed=1000 * seed)
        self.calibration = endless_batches(task.train, settings.batch_size, seed=1000 * seed + 500)
        self.check_batches = endless_batches(task.train, settings.batch_size, seed=1000 * seed + 700)
        self.controller = self._controller()
        if self.controller is not None:  # the model's FLOPs outside the sampled layers, untimed
            self.controller.measure_flops(self.mean_loss, self._next(self.calibration))
        self.calibration_batches = (self._next(self.calibration) for _ in itertools.count())
        self.logs: list[StepLog] = []
        self.elapsed = 0.0
        self.eval_curve: list[dict[str, Any]] = []
        self.variance_checks: list[dict[str, Any]] = []
        self.flop_checks: list[dict[str, Any]] = []
        self._check_steps = set(settings.check_steps())
        self._eval_steps = set(settings.eval_steps())

    # ------------------------------------------------------------------ set-up
    def _controller(self) -> Controller | None:
        method, settings = self.method, self.settings
        if method == "exact":
            return None
        config = settings.vcas
        if method == "vcas-paper":
            config = dataclasses.replace(config, controller="paper")
        elif method == "vcas-adaptive":
            config = dataclasses.replace(config, controller="adaptive",
                                         update_every=settings.adaptive_update_every or config.update_every)
        controller = attach(self.model, config, **self.task.attach_options)
        if method in ("exact-skip", "sb", "ub"):
            # Exact sampled layers: they skip all-zero rows (SB / UB: the dropped samples') and count FLOPs.
            controller.set_ratios(act=1.0, weight=1.0)
        return controller

    def _next(self, stream: Iterator[Batch]) -> Batch:
        return {k: v.to(self.device) for k, v in next(stream).items()}

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.settings.bf16)

    def mean_loss(self, batch: Batch) -> torch.Tensor:
        with self._autocast():
            losses, _ = self.task.kind.per_sample_loss(self.model, batch)
        return losses.mean()

    @property
    def samples(self) -> bool:
        return self.method.startswith("vcas")

    # ------------------------------------------------------------------ a step
    def step(self, step: int, progress: Callable[[int, float], None] | None = None) -> None:
        batch = self._next(self.training)
        checked = self.settings.flop_checks and step in self._check_steps
        calibrating = self.controller is not None and self.controller.calibrating
        self._phases: dict[str, float] = {}
        started = self._clock()
        if checked:
            loss = self._counted_step(batch, step)
        else:
            loss = self._train_step(batch)
        self.elapsed += self._clock() - started
        self.logs.append(self._log(step, loss, calibrating, checked))
        if progress is not None:
            progress(step, loss)
        if self.samples and step in self._check_steps:
            self._variance_check(step)
        if step in self._eval_steps:
            self.eval_curve.append({"step": step, **self.evaluate()})

    def _train_step(self, batch: Batch) -> float:
        mark = self._clock()
        with self._autocast():
            per_sample, outputs = self.task.kind.per_sample_loss(self.model, batch)
        loss = self._training_loss(per_sample, outputs)
        mark = self._phase("forward", mark)
        loss.backward()
        mark = self._phase("backward", mark)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        mark = self._phase("optimizer", mark)
        if self.samples:
            self.controller.maybe_calibrate(self.mean_loss, self.calibration_batches)
            self._phase("controller", mark)
        return float(per_sample.detach().mean())  # the full batch's loss, comparable across methods

    def _phase(self, name: str, since: float) -> float:
        now = self._clock()
        self._phases[name] = self._phases.get(name, 0.0) + now - since
        return now

    def _training_loss(self, per_sample: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        keep = self.settings.baseline_keep
        if self.method == "sb":
            return (baselines.selective_backprop_weights(per_sample, keep) * per_sample).sum()
        if self.method == "ub":
            return (baselines.upper_bound_weights(per_sample, outputs, keep, self.generator) * per_sample).sum()
        return per_sample.mean()

    def _counted_step(self, batch: Batch, step: int) -> float:
        """A training step under an independent FLOPs counter."""
        losses: list[float] = []
        if self.controller is None:
            with FlopCount() as counter:
                losses.append(self._train_step(batch))
            self.flop_checks.append({"step": step, "counted": counter.total})
        else:
            check = self.controller.check_flops(lambda: losses.append(self._train_step(batch)))
            self.flop_checks.append({"step": step, **check})
        return losses[0]

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _log(self, step: int, loss: float, calibrating: bool, checked: bool) -> StepLog:
        phases = {} if checked else dict(self._phases)  # a counted step's phases are slowed down
        if self.controller is None:
            return StepLog(step, self.elapsed, loss, 0.0, phases=phases)
        stats = self.controller.stats()
        return StepLog(step, self.elapsed, loss, stats["spent_flops"], stats["s"], _mean(stats["act_ratios"]),
                       _mean(stats["weight_ratios"]), calibrating, phases)

    # ------------------------------------------------------------------ untimed work
    def _variance_check(self, step: int) -> None:
        settings = self.settings
        check = self.controller.check_variance(
            self.mean_loss, (self._next(self.check_batches) for _ in itertools.count()),
            draws=settings.check_draws, min_pairs=min(settings.check_min_pairs, settings.check_max_pairs),
            max_pairs=settings.check_max_pairs,
            target_relative_error=settings.check_target)
        self.variance_checks.append({"step": step, **check})

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        try:
            limit = self.settings.eval_limit
            tensors = self.task.eval if limit is None else {k: v[:limit] for k, v in self.task.eval.items()}
            stream = ({k: v.to(self.device) for k, v in b.items()} for b in batches(tensors, 64))
            with self._autocast():
                return self.task.kind.evaluate(self.model, stream)
        finally:
            self.model.train()

    def result(self) -> RunResult:
        evaluation = self.eval_curve[-1] if self.eval_curve and self.eval_curve[-1]["step"] == len(self.logs) \
            else {"step": len(self.logs), **self.evaluate()}
        result = RunResult(self.method, self.settings.seed, self.logs, self.elapsed,
                           {k: v for k, v in evaluation.items() if k != "step"}, self.eval_curve,
                           variance_checks=self.variance_checks, flop_checks=self.flop_checks)
        if self.controller is not None:
            result.stats = self.controller.stats()
            result.history = list(self.controller.history)
            self.controller.detach()
        return result


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run_sequentially(task: Task, methods: list[str], settings: RunSettings,
                     progress: Callable[[Run], Any] | None = None) -> list[RunResult]:
    """Each method's whole run, one after the other."""
    results = []
    for method in methods:
        run = Run(task, method, settings)
        tick = progress(run) if progress else None
        for step in range(1, settings.steps + 1):
            run.step(step, tick)
        results.append(run.result())
    return results


def run_in_lockstep(task: Task, methods: list[str], settings: RunSettings,
                    progress: Callable[[Run], Any] | None = None) -> list[RunResult]:
    """Every method trains on the same batch in turn, step by step, the order alternating."""
    runs = [Run(task, method, settings) for method in methods]
    ticks = [progress(run) if progress else None for run in runs]
    for step in range(1, settings.steps + 1):
        order = list(zip(runs, ticks))
        for run, tick in (order if step % 2 else order[::-1]):
            run.step(step, tick)
    return [run.result() for run in runs]

