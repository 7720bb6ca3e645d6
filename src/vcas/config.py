"""The frozen, validated configuration of a VCAS controller."""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import ConfigError

CONTROLLERS = ("auto", "adaptive", "paper")
# update_every when it is None: the paper's F, and the adaptive controller's longest interval.
DEFAULT_UPDATE_EVERY = {"paper": 100, "adaptive": 10}


@dataclasses.dataclass(frozen=True)
class VCASConfig:
    """Settings of variance-controlled adaptive sampling (tau, F, M, alpha and beta: the paper's).

    Args:
        tau_act: allowed activation-sampling variance as a fraction of the SGD variance.
        tau_w: allowed weight-sampling variance as a fraction of the SGD variance (per layer).
        update_every: F, the number of optimizer steps between two controller updates (for the
            adaptive controller: the longest calibration interval). ``None``: the controller's
            default, 100 for ``"paper"`` (the paper's F) and 10 for ``"adaptive"`` (on a causal LM
            the added variance at fixed ratios grew faster than calibrations 20 steps apart
            followed; docs/method.md).
        mc_samples: M, the number of calibration batches (and of sampled draws per batch).
        s_step: alpha, the step by which the kept gradient-norm share ``s`` moves per update.
        nu_mult: beta, the factor applied to (or divided out of) each weight keep ratio per update.
        param_fraction: the size of what each sampled layer's variances are estimated from:
            the share of a weight's entries the paper's calibration (and a convolution's records)
            use, and a linear's sketch columns as a share of its larger side (adaptive; at
            least 8 columns).
        ratio_ema: decay of an exponential moving average applied to the activation keep ratios
            (0 = apply the candidate schedule directly; the paper mentions 0.6 as an option).
        seed: seed of the controller's own sampling generator. ``None`` derives it from
            ``torch.initial_seed()`` so that the user's seed fixes it and no RNG draw is consumed.
        controller: ``"adaptive"`` (calibrates on training steps whose activation gradients propagate
            exactly and records per-sample statistics, then solves for the operating point; see
            :mod:`vcas.control.adaptive`), ``"paper"`` (the paper's rules, for reproducing it), or
            ``"auto"`` (the default): ``"adaptive"`` unless the model breaks its assumptions, that
            is, it has no sampled linear or convolution with a trainable weight, or BatchNorm in
            training mode mixes the samples of a batch; ``"paper"`` there. ``attach`` resolves
            it, and ``Controller.config.controller`` says which one runs.
        min_update_every: adaptive only: the shortest calibration interval (default
            ``max(1, update_every // 10)``); the interval doubles up to ``update_every`` while the
            ratios are stable. The first training step is a calibration step.
        smoothing: adaptive only: the weight of a calibration in the pooled statistics decays by
            this factor with each newer one (0 = use each calibration alone).
        min_weight_ratio: adaptive only: the smallest weight keep ratio the solver may choose.
        max_weight_ratio: adaptive only: a solved weight keep ratio above this becomes 1 (the
            layer's weight gradient stays exact): near 1, SampleW's solve and gathers cost more
            time than the few rows it skips. The default 1 samples at every solved ratio; on
            small layers on a CPU (128-wide: SampleW paid only at nu <= 0.2 in
            ``benchmarks/paired_steps.py``) a lower value trades a few FLOPs for time.
        recompute_below: a block whose activation keep ratio is at most this when its forward
            runs keeps only its linear outputs and dropout masks instead of all activations and,
            in the backward, re-runs its element-wise ops on the kept samples only and
            backpropagates through that compact graph (:mod:`vcas.ops.compact`; 0 turns this
            off). The default 0.6 is where it beat the full-size backward on a MiniLM step at the
            keep ratios a fine-tuning run settles on (on a CPU).
        gather_below: a linear backward whose incoming gradient has more than this fraction of
            non-zero rows runs its dense products (the zero rows add nothing) instead of
            gathering the non-zero rows first: gathering and scattering cost more than the
            skipped products save when few rows are zero. 1 always gathers; 0 never does.
            (Convolutions always gather their non-zero samples: their products per row are large.)
            The adaptive controller rounds an activation keep ratio above this (or above
            ``recompute_below``, if higher) up to 1 in a block of linears: there sampling would
            add variance and save next to nothing.
        sync_free: whether the sampled ops avoid every host synchronisation inside the forward
            and backward: data-dependent subsets (the kept samples, the non-zero rows, SampleW's
            kept rows) go into room reserved from the keep ratios, on the device
            (:mod:`vcas.ops.capacity`). ``None`` (the default) takes this path on CUDA devices,
            where a sync stalls the host, and the exact-size path on the CPU, where reading a
            size is free and the reserved room would only cost computation.
        min_weight_numel: the controllers sample the weight gradient of a linear layer only if
            its weight has at least this many entries; smaller layers keep nu = 1. On small
            layers the row scores, the keep-probability solve and the gathers cost more than
            the skipped products save (measured on CPU: 128 x 128 and 128 x 256 layers ran
            slower at every nu, 384 x 384 ones faster). ``set_ratios`` is not limited by it.
    """

    tau_act: float = 0.025
    tau_w: float = 0.025
    update_every: int | None = None
    mc_samples: int = 2
    s_step: float = 0.01
    nu_mult: float = 0.95
    param_fraction: float = 0.01
    ratio_ema: float = 0.0
    seed: int | None = None
    controller: str = "auto"
    min_update_every: int | None = None
    smoothing: float = 0.8
    min_weight_ratio: float = 0.05
    max_weight_ratio: float = 1.0
    recompute_below: float = 0.6
    gather_below: float = 0.75
    min_weight_numel: int = 65536
    sync_free: bool | None = None

    def __post_init__(self) -> None:
        _check(self.tau_act > 0, "tau_act", self.tau_act, "> 0")
        _check(self.tau_w > 0, "tau_w", self.tau_w, "> 0")
        if self.update_every is not None:
            _check_int(self.update_every, "update_every", 1)
        _check_int(self.mc_samples, "mc_samples", 2)
        _check(0 < self.s_step < 1, "s_step", self.s_step, "in (0, 1)")
        _check(0 < self.nu_mult < 1, "nu_mult", self.nu_mult, "in (0, 1)")
        _check(0 < self.param_fraction <= 1, "param_fraction", self.param_fraction, "in (0, 1]")
        _check(0 <= self.ratio_ema < 1, "ratio_ema", self.ratio_ema, "in [0, 1)")
        if self.seed is not None:
            _check_int(self.seed, "seed", 0)
        _check(self.controller in CONTROLLERS, "controller", self.controller, f"one of {CONTROLLERS}")
        if self.min_update_every is not None:
            _check_int(self.min_update_every, "min_update_every", 1)
            _check(self.min_update_every <= (self.update_every or self.min_update_every),
                   "min_update_every", self.min_update_every, "at most update_every")
        _check(0 <= self.smoothing < 1, "smoothing", self.smoothing, "in [0, 1)")
        _check(0 <= self.recompute_below <= 1, "recompute_below", self.recompute_below, "in [0, 1]")
        _check(0 <= self.gather_below <= 1, "gather_below", self.gather_below, "in [0, 1]")
        _check_int(self.min_weight_numel, "min_weight_numel", 0)
        _check(self.sync_free in (None, True, False), "sync_free", self.sync_free, "None, True or False")
        _check(0 < self.min_weight_ratio <= 1, "min_weight_ratio", self.min_weight_ratio, "in (0, 1]")
        _check(self.min_weight_ratio <= self.max_weight_ratio <= 1, "max_weight_ratio",
               self.max_weight_ratio, f"in [min_weight_ratio={self.min_weight_ratio}, 1]")

    def resolve(self, controller: str) -> VCASConfig:
        """This config for ``controller`` (``"paper"`` or ``"adaptive"``), with the controller's
        default ``update_every`` filled in where it is ``None``."""
        every = self.update_every if self.update_every is not None else DEFAULT_UPDATE_EVERY[controller]
        return dataclasses.replace(self, controller=controller, update_every=every)

    @property
    def shortest_interval(self) -> int:
        if self.update_every is None:
            raise ConfigError("update_every is not resolved yet: use config.resolve(controller)")
        return self.min_update_every or max(1, self.update_every // 10)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> VCASConfig:
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown VCASConfig fields: {sorted(unknown)}")
        return cls(**values)


def _check(ok: bool, name: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"VCASConfig.{name}={value!r} is invalid: it must be {valid}")


def _check_int(value: Any, name: str, minimum: int) -> None:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    _check(is_int and value >= minimum, name, value, f"an integer >= {minimum}")
