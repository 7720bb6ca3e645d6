"""The VCAS controller: owns the sampling state of one model and adapts its keep ratios."""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from . import adaptive, calibration, diagnostics, distributed
from .config import VCASConfig
from .discovery import BlockSpec, ModuleFilter, plan_model
from .accounting import CALIBRATION
from .errors import AttachError, ConfigError, StateDictError
from .explain import Explanation
from .ops.conv import ConvSite
from .ops.records import weight_slices
from .rewrite import Installation
from .sampling import share_schedule
from .state import SamplingState

logger = logging.getLogger(__name__)

_STATE_VERSION = 2

# SamplingState flags of an adaptive calibration step: an exact backward that records
# per-sample statistics (vcas.adaptive) and the SampleW row scores.
_RECORDING = {"sample_acts": False, "sample_weights": False, "record_samples": True,
              "record_row_scores": True}


class Controller:
    """Attaches VCAS to ``model`` and adapts the keep ratios during training.

    Build it with :func:`vcas.attach`. Call :meth:`maybe_calibrate` once per optimizer step; the
    user's training step itself is unchanged (``loss.backward(); optimizer.step()``).
    """

    def __init__(self, model: nn.Module, config: VCASConfig | None = None, *,
                 blocks: BlockSpec = None, include: ModuleFilter = None,
                 exclude: ModuleFilter = None, check_batch_first: bool = True) -> None:
        self.config = config if config is not None else VCASConfig()
        if not isinstance(self.config, VCASConfig):
            raise ConfigError(f"config must be a VCASConfig, got {type(self.config).__name__}")
        # Attach to the user's module inside DDP / torch.compile wrappers (see vcas.distributed).
        self._ddp = distributed.ddp_wrapper(model)
        model = distributed.unwrap_model(model)
        self.model = model
        plan = plan_model(model, blocks, include=include, exclude=exclude)
        block_list, linears = plan.blocks, plan.linears
        seed = self.config.seed if self.config.seed is not None else torch.initial_seed() % (2**62)
        self._seed = seed
        self._state = SamplingState(len(block_list), len(linears), seed, rank=_rank())
        self._state.recompute_below = self.config.recompute_below
        self._state.gather_below = self.config.gather_below
        self._installation = Installation(model, plan, self._state,
                                          check_batch_first=check_batch_first)
        self.block_names = [name for name, _ in block_list]
        self.linear_names = [name for name, _, _ in linears]
        self.conv_names = [name for name, _ in plan.convs]
        for site in self._installation.linear_sites:
            # Small layers keep an exact weight gradient: SampleW costs more time than it saves.
            site.scored = site.module.weight.numel() >= self.config.min_weight_numel
        self._params = self._measured_parameters(block_list)
        self._measured_sites = self._sites_of(self._params)
        norms = _training_batchnorms(model)
        self.config, why = self._resolve_controller(norms)
        # A model attached in eval mode (as from_pretrained returns it) may train its BatchNorm
        # later: the first calibration step looks again.
        self._batchnorm_unchecked = self.config.controller == "adaptive" and not norms
        self._subsets = self._parameter_subsets(seed)
        self._s = 1.0
        self._adaptive = True
        self._steps = 0
        self._updates = 0
        self._skipped_updates = 0
        self._last_skip_reason: str | None = None
        self._last: calibration.Measurement | None = None
        self.history: list[dict[str, Any]] = []
        self._adaptive_state = adaptive.AdaptiveState()
        self._saved_flags: dict[str, Any] | None = None  # set while a calibration step records
        self._batch_source: tuple[Any, Iterator[Any]] | None = None
        self._detached = False
        if self.config.controller == "adaptive":
            self._start_recording()  # the first training step calibrates
        logger.info("vcas attached to %s: %s; controller %r (%s); %s", type(model).__name__,
                    Explanation.from_plan(model, plan).summary(), self.config.controller, why,
                    self.config)

    # ----------------------------------------------------------------- set-up helpers
    def _resolve_controller(self, norms: list[str]) -> tuple[VCASConfig, str]:
        """The config with ``controller="auto"`` replaced by the controller this model suits,
        and why it runs.

        The adaptive controller needs per-sample gradients of sampled layers (an error without
        any) and samples that do not interact in the backward (a warning under the BatchNorm
        layers in training mode, ``norms``)."""
        chosen = self.config.controller
        has_sites = any(site is not None for site in self._measured_sites)
        why = "as configured"
        if chosen == "auto":
            chosen = "adaptive" if has_sites and not norms else "paper"
            why = ("auto: no sampled layer with a trainable weight" if not has_sites else
                   f"auto: BatchNorm in training mode ({norms[0]})" if norms else "auto")
        elif chosen == "adaptive" and not has_sites:
            self._installation.remove()
            raise AttachError(
                "controller='adaptive' measures per-sample gradients in the sampled linear or "
                "convolution layers, and this model has none with a trainable weight; use "
                "VCASConfig(controller='paper') (or 'auto', which chooses it)")
        elif chosen == "adaptive" and norms:
            warnings.warn(_batchnorm_warning(norms, "here"), stacklevel=4)
        try:
            return self.config.resolve(chosen), why
        except ConfigError:
            self._installation.remove()  # leave the user's model as it was
            raise

    def _measured_parameters(self, blocks: list[tuple[str, nn.Module]]) -> list[nn.Parameter]:
        """The weights whose gradient variance is measured: the sampled linears' weights, or, in
        a model without sampled linears, the trainable parameters of the blocks."""
        sites = self._installation.linear_sites + self._installation.conv_sites
        params = [site.module.weight for site in sites if site.module.weight.requires_grad]
        if not params:
            seen: set[int] = set()
            params = [p for _, block in blocks for p in block.parameters()
                      if p.requires_grad and not (id(p) in seen or seen.add(id(p)))]
        if not params:
            self._installation.remove()
            raise AttachError("the blocks have no trainable parameters: nothing to sample")
        return params

    def _sites_of(self, params: list[nn.Parameter]) -> list[Any]:
        """The sampled layer owning each measured weight (None for a block parameter)."""
        by_weight = {id(site.module.weight): site
                     for site in self._installation.linear_sites + self._installation.conv_sites}
        return [by_weight.get(id(p)) for p in params]

    def _parameter_subsets(self, seed: int) -> list[torch.Tensor]:
        """The random 1 % of each measured weight: flat entries for the paper's calibration and
        the convolutions' records, whole slices for the linears' records (vcas.ops.records)."""
        generator = torch.Generator().manual_seed(seed)
        subsets = []
        for param, site in zip(self._params, self._measured_sites):
            size = max(1, math.ceil(self.config.param_fraction * param.numel()))
            subsets.append(torch.randperm(param.numel(), generator=generator)[:size].sort().values)
            if isinstance(site, ConvSite):
                site.subset = subsets[-1]
            elif site is not None:
                out_features, in_features = site.module.weight.shape[::-1 if site.transposed else 1]
                site.slices = weight_slices(out_features, in_features, self.config.param_fraction,
                                            generator)
        return subsets

    # ----------------------------------------------------------------- training-loop API
    def maybe_calibrate(self, loss_fn: calibration.LossFn | None = None,
                        batches: Iterable[Any] | None = None) -> bool:
        """Count one optimizer step (call it after ``optimizer.step()``) and update the ratios
        when a calibration is due.

        The paper's controller calibrates every ``update_every`` steps on ``mc_samples`` batches
        of its own. The adaptive one calibrates on the training steps themselves: a calibration
        step's backward runs exactly and records what the update needs, so ``loss_fn`` and
        ``batches`` only serve to measure the model's FLOPs once (optional: without them FLOPs
        are reported for the sampled layers only).

        Args:
            loss_fn: ``loss_fn(batch) -> scalar loss``, computed like the training loss.
            batches: where calibration batches come from: an iterator (``next`` is called
                ``mc_samples`` times) or an iterable such as a DataLoader, iterated again when
                exhausted. Use a source other than the training iterator, so training batches
                are not consumed.
        Returns:
            True if a calibration (and controller update) ran.
        """
        self._check_attached()
        self._steps += 1
        if not self._adaptive:
            return False
        if self.config.controller == "adaptive":
            return self._adaptive_step(loss_fn, batches)
        if self._steps % self.config.update_every != 0:
            return False
        if loss_fn is None or batches is None:
            raise ValueError("the paper's controller calibrates on batches of its own: pass "
                             "maybe_calibrate(loss_fn, batches)")
        self.calibrate(loss_fn, [self._next_batch(batches) for _ in range(self.config.mc_samples)])
        return True

    def _adaptive_step(self, loss_fn: calibration.LossFn | None, batches: Iterable[Any] | None) -> bool:
        """Update from the step that just recorded (if it did), and arm the next calibration step."""
        updated = False
        if self._saved_flags is not None:
            stats = self._recorded_stats()
            if stats is not None:
                self._check_batchnorm_once()
                self._stop_recording()
                if self._state.tally.other_forward_per_linear is None and loss_fn is not None \
                        and batches is not None:
                    self.measure_flops(loss_fn, self._next_batch(batches))
                self._apply_stats(distributed.merge_stats(stats))
                updated = True
        if self._saved_flags is None and self._steps + 1 >= self._adaptive_state.next_step:
            self._start_recording()
        return updated

    def _check_batchnorm_once(self) -> None:
        norms = _training_batchnorms(self.model) if self._batchnorm_unchecked else []
        self._batchnorm_unchecked = False
        if norms:
            warnings.warn(_batchnorm_warning(norms, "when attached in training mode"), stacklevel=4)

    def _start_recording(self) -> None:
        state = self._state
        for site in self._installation.linear_sites + self._installation.conv_sites:
            site.sample_records.clear()
        for site in self._installation.linear_sites:
            site.recorded_scores.clear()
        if self._saved_flags is None:
            self._saved_flags = {name: getattr(state, name) for name in _RECORDING}
        for name, value in _RECORDING.items():
            setattr(state, name, value)

    def _stop_recording(self) -> None:
        if self._saved_flags is None:
            return
        for name, value in self._saved_flags.items():
            setattr(self._state, name, value)
        self._saved_flags = None

    def _recorded_stats(self) -> adaptive.CalibrationStats | None:
        """What the sampled layers recorded since recording started (None if nothing ran).

        A pass with a non-finite record in any layer is dropped from every layer (the layers
        above the overflow would otherwise mix two loss scales): a step the fp16 GradScaler skips
        is not an optimizer step, so when the caller skips ``maybe_calibrate`` for it (the
        integrations do), recording goes on into the next step, whose records then decide.
        (Only "nothing ran" gives None, so that DDP ranks stay in step: they all merge, then
        skip alike.) Row scores of such a pass stay: they are finite, and can only make a weight
        ratio more cautious."""
        if not any(site.sample_records for site in self._measured_sites if site is not None):
            return None
        records = [list(site.sample_records) if site is not None else [] for site in self._measured_sites]
        overflowed = {id(r.pass_norms) for layer in records for r in layer if not r.finite}
        layers = [[r for r in layer if id(r.pass_norms) not in overflowed] for layer in records]
        scales = [p.numel() / max(1, site.sample_records[0].total.numel())
                  if site is not None and site.sample_records else 1.0
                  for p, site in zip(self._params, self._measured_sites)]
        scores = [list(site.recorded_scores) for site in self._installation.linear_sites]
        return adaptive.CalibrationStats(layers, scales, scores, len(self.block_names))

    def calibrate(self, loss_fn: calibration.LossFn, batches: Sequence[Any]) -> None:
        """Measure the variances on ``batches`` (at least 2) and update s, rho and nu now.

        Leaves training untouched: ``.grad``, optimizer, buffers and RNG streams are unchanged.
        Turns adaptation back on after :meth:`set_ratios`.
        """
        self._check_attached()
        batches = list(batches)
        if self.config.controller == "adaptive":
            self._calibrate_adaptive(loss_fn, batches)
            return
        if len(batches) < 2:
            raise ConfigError(
                f"calibrate needs at least 2 batches to estimate the SGD variance, got {len(batches)}")
        state = self._state
        if state.tally.other_forward_per_linear is None:
            self.measure_flops(loss_fn, batches[0])
        with calibration.preserved_training_state(self.model), distributed.no_sync(self._ddp), \
                calibration.sampling_mode(state, enabled=True):
            measurement = calibration.measure(
                loss_fn, batches, state, self._installation.block_samplers,
                self._installation.linear_sites, self._params, self._subsets)
        self._adaptive = True
        self._apply(distributed.merge_measurements(measurement))  # identical on every DDP rank

    def _calibrate_adaptive(self, loss_fn: calibration.LossFn, batches: list[Any]) -> None:
        """An adaptive calibration on separate batches: one recording exact pass each."""
        if not batches:
            raise ConfigError("calibrate needs at least 1 batch")
        if self._state.tally.other_forward_per_linear is None:
            self.measure_flops(loss_fn, batches[0])
        self._stop_recording()
        self._start_recording()
        try:
            with calibration.preserved_training_state(self.model), distributed.no_sync(self._ddp), \
                    calibration.sampling_mode(self._state, enabled=True, phase=CALIBRATION):
                for batch in batches:
                    loss = calibration.scalar_loss(loss_fn, batch)
                    torch.autograd.grad(loss, self._params, allow_unused=True)
            stats = self._recorded_stats()
        finally:
            self._stop_recording()
        self._adaptive = True
        if stats is None:
            self._skip_update(f"calibration at step {self._steps} recorded nothing: no sampled "
                              "layer took part in the loss")
        else:
            self._apply_stats(distributed.merge_stats(stats))

    def _skip_update(self, reason: str) -> None:
        self._skipped_updates += 1
        self._last_skip_reason = f"{reason}; ratios left unchanged"
        logger.warning("vcas: %s", self._last_skip_reason)

    def measure_flops(self, loss_fn: calibration.LossFn, batch: Any) -> None:
        """Measure the model's FLOPs outside the sampled layers once, with
        ``torch.utils.flop_counter``, so FLOPs reductions cover the whole model (done
        automatically at the first calibration; call it when ratios are set by hand)."""
        self._check_attached()
        state = self._state
        params = [p for p in self.model.parameters() if p.requires_grad]
        with calibration.preserved_training_state(self.model), distributed.no_sync(self._ddp), \
                calibration.sampling_mode(state, enabled=True):
            ratios = calibration.measure_model_flops(loss_fn, batch, state, params)
        state.tally.other_forward_per_linear, state.tally.other_backward_per_linear = ratios

    def _apply(self, measurement: calibration.Measurement) -> None:
        self._last = measurement
        values = [measurement.var_sgd, measurement.var_act, measurement.var_weight]
        if not all(math.isfinite(v) for v in values):
            self._skip_update(
                f"non-finite variance statistics at step {self._steps} (var_sgd={values[0]}, "
                f"var_act={values[1]}, var_weight={values[2]})")
        else:
            self._s = next_share(self._s, measurement.var_act, measurement.var_sgd, self.config)
            schedule = candidate_schedule(measurement.block_norms, self._s)
            decay = self.config.ratio_ema
            self._state.act_ratios = [decay * old + (1 - decay) * new
                                      for old, new in zip(self._state.act_ratios, schedule)]
            self._state.weight_ratios = self._only_large(next_weight_ratios(
                self._state.weight_ratios, measurement.var_weight_layers,
                self._linear_sgd_variances(measurement), self.config))
            self._updates += 1
        self.history.append({"step": self._steps, **self._ratio_stats(), **self._variance_stats()})

    def _apply_stats(self, stats: adaptive.CalibrationStats) -> None:
        """Solve s and every nu for the variance budgets (see :mod:`vcas.adaptive`)."""
        config, memory = self.config, self._adaptive_state
        var_sgd = stats.sgd_variances()
        if stats.samples < 2 or not all(math.isfinite(v) for v in var_sgd) or sum(var_sgd) <= 0:
            self._skip_update(f"calibration step {self._steps} gave no usable SGD variance "
                              f"({stats.samples} samples with finite gradients, "
                              f"var_sgd={sum(var_sgd)})")
            memory.schedule_next(self._steps, False, config.shortest_interval, config.update_every)
            return
        memory.remember(stats, self._steps, adaptive.WINDOW * config.update_every)
        pool = memory.pool(config.smoothing)
        pooled_sgd = adaptive.pooled_sgd_variances(pool)
        above = [sampler.above for sampler in self._installation.block_samplers]
        previous_s, previous_nu = self._s, list(self._state.weight_ratios)
        target = adaptive.solve_share(pool, above, config.tau_act * sum(pooled_sgd))
        self._s = target if len(memory.history) == 1 else memory.move(previous_s, target)
        self._state.act_ratios = candidate_schedule(adaptive.pooled_block_norms(pool), self._s)
        by_param = {id(p): v for p, v in zip(self._params, pooled_sgd)}
        budgets = [config.tau_w * by_param.get(id(site.module.weight), 0.0)
                   if site.scored else None for site in self._installation.linear_sites]
        solved = adaptive.solve_weight_ratios(pool, budgets, config.min_weight_ratio)
        cap = config.max_weight_ratio
        self._state.weight_ratios = [nu if nu <= cap else 1.0 for nu in solved]
        # Moves between ratios above the cap change nothing that runs.
        nu_moves = [abs(min(a, cap) - min(b, cap)) for a, b in zip(solved, previous_nu)]
        stable = abs(target - previous_s) < 0.05 and sum(nu_moves) < 0.05 * max(1, len(nu_moves))
        memory.schedule_next(self._steps, stable, config.shortest_interval, config.update_every)
        self._last = adaptive.summary(stats, above, self._state.act_ratios, self._state.weight_ratios)
        self._updates += 1
        self.history.append({"step": self._steps, **self._ratio_stats(), **self._variance_stats()})

    def _only_large(self, ratios: list[float]) -> list[float]:
        """nu = 1 for the linears whose weight gradient is not sampled (``min_weight_numel``)."""
        return [ratio if site.scored else 1.0
                for ratio, site in zip(ratios, self._installation.linear_sites)]

    def _linear_sgd_variances(self, measurement: calibration.Measurement) -> list[float]:
        """V_sgd of each sampled linear (0 for a frozen one, whose weight is not measured)."""
        by_param = {id(p): v for p, v in zip(self._params, measurement.var_sgd_layers)}
        return [by_param.get(id(site.module.weight), 0.0) for site in self._installation.linear_sites]

    def set_ratios(self, act: float | Sequence[float] | None = None,
                   weight: float | Sequence[float] | None = None) -> None:
        """Fix the keep ratios and turn adaptation off (until :meth:`calibrate` is called).

        Args:
            act: one ratio for every block or one per block (input side first, non-decreasing
                towards the output); ``None`` keeps the current ones.
            weight: one ratio for every sampled linear or one per linear; ``None`` keeps them.
        Raises:
            ConfigError: a ratio outside (0, 1], a list of the wrong length, or a decreasing
                activation schedule.
        """
        self._check_attached()
        new_act = _ratios("act", act, self._state.act_ratios)
        new_weight = _ratios("weight", weight, self._state.weight_ratios)
        if any(lower > upper for lower, upper in zip(new_act, new_act[1:])):
            raise ConfigError(
                f"act ratios {new_act} decrease towards the output; a sample dropped near the "
                "output stays dropped below, so ratios must not decrease from input to output")
        self._state.act_ratios, self._state.weight_ratios = new_act, new_weight
        self._stop_recording()
        self._adaptive = False

    def check_variance(self, loss_fn: calibration.LossFn, batches: Sequence[Any],
                       draws: int = 8) -> dict[str, float]:
        """An expensive independent check of the bound at the current ratios: V_act / V_sgd and
        V_w / V_sgd from many batches and draws on every weight entry (see :mod:`vcas.diagnostics`).
        Leaves training untouched and is not counted in the FLOPs."""
        self._check_attached()
        return diagnostics.variance_check(self.model, self._state, self._params, loss_fn,
                                          list(batches), draws)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Exact backward inside the block (e.g. for a comparison step); restores on exit."""
        with calibration.sampling_mode(self._state, enabled=False):
            yield

    def detach(self) -> None:
        """Remove every hook and forward vcas installed; the model behaves exactly as before."""
        if self._detached:
            return
        self._stop_recording()
        self._installation.remove()
        self._state.enabled = False
        self._detached = True

    # ----------------------------------------------------------------- reporting
    def stats(self) -> dict[str, Any]:
        """Current ratios, last variance estimates, step counts and FLOPs reductions."""
        tally = self._state.tally
        return {
            "controller": self.config.controller,  # resolved: "adaptive" or "paper"
            "update_every": self.config.update_every,
            **self._ratio_stats(),
            **self._variance_stats(),
            "steps": self._steps,
            "updates": self._updates,
            "skipped_updates": self._skipped_updates,
            "last_skip_reason": self._last_skip_reason,
            "adaptive": self._adaptive,
            "nonfinite_gradients": self._state.nonfinite_gradients,
            "bp_flops_reduction": tally.bp_flops_reduction(),
            "train_flops_reduction": tally.train_flops_reduction(),
            "exact_training_flops": tally.exact_training_flops(),
            "spent_flops": tally.spent_flops(),
            "flops_scope": tally.scope,
        }

    def _ratio_stats(self) -> dict[str, Any]:
        return {"s": self._s, "act_ratios": list(self._state.act_ratios),
                "weight_ratios": list(self._state.weight_ratios)}

    def _variance_stats(self) -> dict[str, Any]:
        last = self._last
        if last is None:
            return {"var_sgd": None, "var_act": None, "var_weight": None}
        return {"var_sgd": last.var_sgd, "var_act": last.var_act, "var_weight": last.var_weight,
                "var_weight_layers": list(last.var_weight_layers)}

    @property
    def calibrating(self) -> bool:
        """True while the coming training steps are an adaptive calibration step: their backward
        runs exactly and records per-sample statistics (until the next ``maybe_calibrate``)."""
        return self._saved_flags is not None

    @property
    def flops(self):
        """The :class:`~vcas.accounting.FlopTally` of this controller (read it, do not edit)."""
        return self._state.tally

    # ----------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: ratios, s, counters, FLOPs, generator states."""
        return {
            "version": _STATE_VERSION,
            "config": self.config.to_dict(),
            "block_names": list(self.block_names),
            "linear_names": list(self.linear_names),
            "seed": self._seed,
            "s": self._s,
            "act_ratios": list(self._state.act_ratios),
            "weight_ratios": list(self._state.weight_ratios),
            "adaptive": self._adaptive,
            "steps": self._steps,
            "updates": self._updates,
            "skipped_updates": self._skipped_updates,
            "tally": self._state.tally.state_dict(),
            "adaptive_state": self._adaptive_state.state_dict(),
            "recording": self._saved_flags is not None,
            "generators": self._state.generator_states(),
            "history": [dict(entry) for entry in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the model's blocks and linears must match."""
        if state.get("version") == 1:  # before the adaptive controller recorded on training steps
            state = {**state, "adaptive_state": adaptive.AdaptiveState().state_dict(), "recording": False}
        elif state.get("version") != _STATE_VERSION:
            raise StateDictError(f"unsupported vcas state version {state.get('version')!r}")
        saved = state.get("config", {}).get("controller", self.config.controller)
        if saved != self.config.controller:
            raise StateDictError(
                f"this state_dict was saved by the {saved!r} controller, and this one is "
                f"{self.config.controller!r}; attach with VCASConfig(controller={saved!r})")
        for key in ("block_names", "linear_names"):
            if list(state[key]) != getattr(self, key):
                raise StateDictError(
                    f"state_dict {key} do not match this model: saved {len(state[key])}, "
                    f"model has {len(getattr(self, key))}; attach with the same blocks")
        self._stop_recording()  # restore the flags before "adaptive" and the ratios are loaded
        self._seed = self._state.seed = int(state["seed"])
        self._subsets = self._parameter_subsets(self._seed)
        self._s = float(state["s"])
        self._state.act_ratios = [float(r) for r in state["act_ratios"]]
        self._state.weight_ratios = [float(r) for r in state["weight_ratios"]]
        self._adaptive = bool(state["adaptive"])
        self._steps = int(state["steps"])
        self._updates = int(state["updates"])
        self._skipped_updates = int(state["skipped_updates"])
        self._state.tally.load_state_dict(state["tally"])
        self._adaptive_state.load_state_dict(state["adaptive_state"])
        self._stop_recording()
        if state["recording"]:
            self._start_recording()
        self._state.load_generator_states(state["generators"])
        self.history = [dict(entry) for entry in state["history"]]

    # ----------------------------------------------------------------- internals
    def _check_attached(self) -> None:
        if self._detached:
            raise AttachError("this controller was detached; attach the model again")

    def _next_batch(self, batches: Iterable[Any]) -> Any:
        if isinstance(batches, Iterator):
            try:
                return next(batches)
            except StopIteration:
                raise ValueError("the calibration batch iterator is exhausted; pass an iterable "
                                 "(e.g. a DataLoader) or an endless iterator") from None
        if self._batch_source is None or self._batch_source[0] is not batches:
            self._batch_source = (batches, iter(batches))
        try:
            return next(self._batch_source[1])
        except StopIteration:
            self._batch_source = (batches, iter(batches))
            try:
                return next(self._batch_source[1])
            except StopIteration:
                raise ValueError("the calibration batch source is empty") from None


# --------------------------------------------------------------------- the paper's update rules
def next_share(s: float, var_act: float, var_sgd: float, config: VCASConfig) -> float:
    """s + alpha if the activation variance exceeds tau_act * V_sgd, else s - alpha; clipped to [0, 1]."""
    step = config.s_step if var_act > config.tau_act * var_sgd else -config.s_step
    return min(1.0, max(0.0, s + step))


def next_weight_ratios(ratios: Sequence[float], var_weight: Sequence[float],
                       var_sgd: Sequence[float], config: VCASConfig) -> list[float]:
    """nu / beta where V_w,l > tau_w * V_sgd,l, else nu * beta; clipped to (0, 1]."""
    beta = config.nu_mult
    return [min(1.0, nu / beta) if vw > config.tau_w * vs else nu * beta
            for nu, vw, vs in zip(ratios, var_weight, var_sgd)]


def candidate_schedule(block_norms: list[list[torch.Tensor | None]], s: float) -> list[float]:
    """rho_l(s) = max over blocks j <= l of p_j(s), p_j averaged over the calibration batches."""
    return share_schedule(block_norms, s)


def _ratios(name: str, value: float | Sequence[float] | None, current: list[float]) -> list[float]:
    if value is None:
        return list(current)
    values = [value] * len(current) if isinstance(value, (int, float)) else list(value)
    if len(values) != len(current):
        raise ConfigError(f"{name} ratios: expected one value or {len(current)} values "
                          f"(one per {'block' if name == 'act' else 'sampled linear'}), got {len(values)}")
    for ratio in values:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ConfigError(f"{name} ratio {ratio!r} is invalid: keep ratios must be in (0, 1]")
    return [float(r) for r in values]


def _batchnorm_warning(norms: list[str], auto_would: str) -> str:
    return (f"controller='adaptive' estimates variances from per-sample gradients, which assumes "
            f"the samples of a batch do not interact; BatchNorm in training mode ({norms[0]}"
            f"{' and others' if len(norms) > 1 else ''}) mixes them, so its estimates are "
            f"approximate. Use controller='paper' (or 'auto', which chooses it {auto_would}), "
            "or freeze BatchNorm (eval mode).")


def _training_batchnorms(model: nn.Module) -> list[str]:
    """Names of the BatchNorm layers in training mode: they mix the samples of a batch."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def attach(model: nn.Module, config: VCASConfig | None = None, *,
           blocks: BlockSpec = None, include: ModuleFilter = None,
           exclude: ModuleFilter = None, check_batch_first: bool = True) -> Controller:
    """Attach VCAS sampled backpropagation to ``model`` and return its :class:`Controller`.

    The model keeps its parameters (an existing optimizer keeps working), module classes and
    ``state_dict`` keys; ``controller.detach()`` restores the original behaviour exactly.

    Args:
        model: any ``nn.Module`` whose repeated blocks return a batch-first hidden state. A
            DistributedDataParallel or ``torch.compile`` wrapper is looked through: vcas attaches
            to the inner module, and calibration runs under DDP's ``no_sync``. Under DDP, attach
            after ``init_process_group`` and call ``maybe_calibrate`` on every rank.
        config: a :class:`VCASConfig` (its defaults if ``None``).
        blocks: ``None`` to detect the repeated blocks, a module class or tuple of classes, or
            a list of qualified module names.
        include: layers outside the blocks to sample as well (default: none): glob patterns
            over qualified names, or a predicate ``fn(module, qualified_name) -> bool``.
        exclude: layers or blocks to leave exact, in the same forms. :func:`vcas.explain`
            shows what a choice of blocks and filters samples.
        check_batch_first: check during each forward that every block's hidden state has a
            dimension 0 equal to a batch size of the model's inputs (activation sampling drops
            samples along dimension 0). Turn off for blocks that see a reshaped batch on purpose,
            e.g. video frames folded into the batch dimension.
    Raises:
        BlockDetectionError: no blocks found, a block name that does not exist, or blocks
            that are not batch-first (:class:`vcas.BatchLayoutError`, raised by the forward).
        ConfigError: a filter pattern that matches no module.
        AttachError: the model already has vcas attached, or is wrapped in ``nn.DataParallel``
            or FSDP (use DistributedDataParallel).
    """
    return Controller(model, config, blocks=blocks, include=include, exclude=exclude,
                      check_batch_first=check_batch_first)
