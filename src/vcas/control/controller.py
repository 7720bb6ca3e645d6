"""The controller: the one object a training loop talks to.

It orchestrates, and only that: it counts optimizer steps, asks its policy
(:mod:`vcas.control.paper` or :mod:`vcas.control.adaptive`) for decisions, applies them to the
mechanism (:mod:`vcas.control.mechanism`), keeps the history, reports, and checkpoints the whole.
:func:`attach` decides everything on the plan first and changes the model only at the end.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..config import VCASConfig
from ..errors import AttachError, ConfigError, StateDictError
from ..install.installation import Installation
from ..install.registry import DEFAULT_SITES, SiteRegistry
from ..plan.discovery import BlockSpec, ModuleFilter, Plan, plan_model
from ..plan.explain import Explanation
from ..plan.wrappers import ddp_wrapper, is_fsdp2, unwrap_model
from ..runtime.mode import PAUSED, SAMPLING
from ..runtime.ratios import RatioTable
from ..runtime.recorder import Recorder
from ..runtime.rng import SamplingGenerators
from ..runtime.runtime import Runtime
from . import checkpoint, diagnostics, distributed
from .adaptive import AdaptivePolicy
from .mechanism import LossFn, Mechanism, measured_weights, probes, scalar_loss
from .paper import PaperPolicy
from .policy import CalibrationSource, Decision, Outcome, Policy, Skip
from .statistics import Measurement

logger = logging.getLogger(__name__)

POLICIES: dict[str, type] = {"paper": PaperPolicy, "adaptive": AdaptivePolicy}


class Controller:
    """Adapts the keep ratios of one attached model. Build it with :func:`vcas.attach`.

    Call :meth:`maybe_calibrate` once per optimizer step, or attach with ``optimizer=`` and vcas
    counts the steps itself; the training step is unchanged (``loss.backward(); optimizer.step()``).

    Attributes:
        model: the user's module (inside any DDP or ``torch.compile`` wrapper).
        config: the config in use (``controller`` and ``update_every`` resolved).
        plan: what is sampled (:class:`vcas.plan.discovery.Plan`).
        history: one entry per calibration: step, s, ratios and variance estimates.
    """

    def __init__(self, mechanism: Mechanism, policy: Policy, config: VCASConfig, seed: int,
                 source: CalibrationSource, reason: str) -> None:
        self.mechanism = mechanism
        self.policy = policy
        self.config = config
        self.model = mechanism.model
        self.plan: Plan = mechanism.plan
        self.history: list[dict[str, Any]] = []
        self._seed = seed
        self._source = source
        self._reason = reason
        self._adapting = True
        self._steps = 0
        self._updates = 0
        self._skipped_updates = 0
        self._last_skip_reason: str | None = None
        self._last: Measurement | None = None
        self._bound: float | None = None
        self._detached = False
        self._optimizer_hook: Any = None
        # A model attached in eval mode (as from_pretrained returns it) may train its
        # BatchNorm later: the first update looks again.
        self._batchnorm_unchecked = policy.name == "adaptive"

    # ------------------------------------------------------------------ names
    @property
    def block_names(self) -> list[str]:
        return self.mechanism.block_names

    @property
    def linear_names(self) -> list[str]:
        return self.mechanism.linear_names

    @property
    def measured_parameters(self) -> dict[str, nn.Parameter]:
        """The weights whose gradient variance the controller measures, by layer name."""
        return dict(self.mechanism.measured)

    @property
    def weight_sampled_layers(self) -> list[str]:
        """The linears whose weight gradient the controller may sample (trainable, at least
        ``min_weight_numel`` entries)."""
        return [name for name in self.linear_names if self.mechanism.weight_sampled(name)]

    def compact_status(self) -> dict[str, str]:
        """Per block that may recompute compactly: ``"unverified"`` (its first uses are still
        checked against the full backward), ``"compact"``, or ``"full: <reason>"``."""
        blocks = self.mechanism.installation.compact_blocks
        return {name: block.status if block.reason is None else f"{block.status}: {block.reason}"
                for name, block in blocks.items()}

    # ------------------------------------------------------------------ training-loop API
    def maybe_calibrate(self, loss_fn: LossFn | None = None, batches: Iterable[Any] | None = None) -> bool:
        """Count one optimizer step (call it after ``optimizer.step()``) and update the ratios
        when a calibration is due. Not needed (and refused) when attached with ``optimizer=``.

        The paper's controller calibrates every ``update_every`` steps on ``mc_samples`` batches
        of its own. The adaptive one calibrates on the training steps themselves, so ``loss_fn``
        and ``batches`` only serve to measure the FLOPs of the rest of the model once (optional:
        without them the FLOPs reductions cover the sampled layers only, and
        ``stats()["flops_scope"]`` stays ``"sampled_layers"``).

        Args:
            loss_fn: ``loss_fn(batch) -> scalar loss``, computed like the training loss.
            batches: where calibration batches come from: an iterator (``next`` is called as
                needed) or an iterable such as a DataLoader, iterated again when exhausted. Use
                a source other than the training iterator, so training batches are not consumed.
        Returns:
            True if the controller updated the ratios.
        Raises:
            ConfigError: the paper's controller got no batches (at attach or here).
            AttachError: detached, or attached with ``optimizer=`` (which counts steps itself).
        """
        self._check_attached()
        if self._optimizer_hook is not None:
            raise AttachError("this controller counts optimizer steps itself (attached with "
                              "optimizer=...); remove the maybe_calibrate() call")
        self._source.offer(loss_fn, batches)
        if self.policy.needs_batches and self._adapting:
            self._source.require(f"the {self.policy.name!r} controller calibrates on batches of its own")
        return self._on_step()

    def _on_step(self) -> bool:
        self._steps += 1
        self.mechanism.runtime.forwards_since_step = 0
        if not self._adapting:
            return False
        outcome = self.policy.on_step(self._steps, self.mechanism, self._source, distributed.merge)
        if outcome is None:
            return False
        self.apply(outcome)
        self._measure_flops_once()
        return True

    def calibrate(self, loss_fn: LossFn, batches: Sequence[Any]) -> None:
        """Calibrate now on ``batches`` (the paper's controller: at least 2) and update s, rho
        and nu. Leaves training untouched: ``.grad``, optimizer, buffers and RNG streams are
        unchanged. Turns adaptation back on after :meth:`set_ratios`."""
        self._check_attached()
        batches = list(batches)
        source = CalibrationSource(loss_fn, batches)
        if batches and self.mechanism.runtime.tally.other is None:
            self.measure_flops(loss_fn, batches[0])
        outcome = self.policy.calibrate(self._steps, self.mechanism, source, batches, distributed.merge)
        self._adapting = True
        self.apply(outcome)

    def measure_flops(self, loss_fn: LossFn, batch: Any) -> None:
        """Measure the model's FLOPs outside the sampled layers once, with
        ``torch.utils.flop_counter``, so FLOPs reductions cover the whole model (done
        automatically; call it when ratios are set by hand). Not counted as training work."""
        self._check_attached()
        self.mechanism.measure_other_work(lambda: scalar_loss(loss_fn, batch))

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
        ratios = self.mechanism.ratios
        new_act = _ratios("act", act, ratios.act_list)
        new_weight = _ratios("weight", weight, ratios.weight_list)
        if any(lower > upper for lower, upper in itertools.pairwise(new_act)):
            raise ConfigError(
                f"act ratios {new_act} decrease towards the output; a sample dropped near the "
                "output stays dropped below, so ratios must not decrease from input to output")
        self.mechanism.set_ratios(ratios.with_act(new_act).with_weight(new_weight))
        self.policy.pause(self.mechanism)
        self._adapting = False

    def check_variance(self, loss_fn: LossFn, batches: Iterable[Any], draws: int = 2, **options: Any) -> dict[str, Any]:
        """An expensive independent check of the bound at the current ratios: V_act / V_sgd and
        V_w / V_sgd from pairs of batches and sampled draws on every weight entry, with their
        standard errors; pairs are taken from ``batches`` (an endless iterator is fine) until
        both relative errors are at most 25 % (options: ``min_pairs``, ``max_pairs``,
        ``target_relative_error``; see :func:`vcas.control.diagnostics.variance_check`).
        Leaves training untouched and is not counted in the FLOPs."""
        self._check_attached()
        return diagnostics.variance_check(self.mechanism, loss_fn, batches, draws, **options)

    def check_flops(self, step: Callable[[], Any]) -> dict[str, Any]:
        """Run ``step()`` (one real training step: forward, backward, optimizer step, and
        ``maybe_calibrate`` if you call it there) under an independent FLOPs counter and compare
        its count with what the controller's tally says the step spent: ``ratio`` =
        accounted / counted, 1 when the accounting is exact (once the model's FLOPs are measured,
        ``scope == "model"``). The step trains as usual; only its speed suffers."""
        self._check_attached()
        return diagnostics.flop_check(self.mechanism, step)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Exact backward inside the block (e.g. for a comparison step); restores on exit."""
        with self.mechanism.runtime.using(PAUSED):
            yield

    def detach(self) -> None:
        """Remove every hook and forward vcas installed; the model behaves exactly as before."""
        if self._detached:
            return
        self.policy.pause(self.mechanism)
        self.mechanism.installation.remove()
        self.mechanism.runtime.set_base_mode(PAUSED)
        if self._optimizer_hook is not None:
            self._optimizer_hook.remove()
            self._optimizer_hook = None
        self._detached = True

    def hook_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Count ``optimizer``'s steps (its step post-hook) instead of ``maybe_calibrate`` calls.

        Steps a GradScaler skips never call the optimizer's ``step`` and are not counted; with
        gradient accumulation, only real steps are. Wrappers (accelerate's ``AcceleratedOptimizer``,
        Lightning's) are looked through to the torch optimizer."""
        inner: Any = optimizer  # the optimizer, or a wrapper whose .optimizer is looked through
        # Wrappers that subclass Optimizer themselves (accelerate's, Lightning's) step the inner one
        # only on real steps (accelerate skips accumulation micro-batches): hook the innermost.
        while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer) or \
                (not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer")):
            inner = inner.optimizer
        if not isinstance(inner, torch.optim.Optimizer):
            raise ConfigError(f"optimizer= must be a torch.optim.Optimizer (or a wrapper of one), "
                              f"got {type(optimizer).__name__}")
        if self.policy.needs_batches:
            self._source.require(f"with optimizer=..., the {self.policy.name!r} controller needs its "
                                 "calibration batches at attach")
        if self._optimizer_hook is not None:
            self._optimizer_hook.remove()
        self._optimizer_hook = inner.register_step_post_hook(_OptimizerStep(self))

    # ------------------------------------------------------------------ applying decisions
    def apply(self, outcome: Outcome) -> None:
        """Apply a policy's outcome: new ratios for a :class:`~vcas.control.policy.Decision`, a
        counted skip for a :class:`~vcas.control.policy.Skip`; either goes into the history."""
        self._check_batchnorm_once()
        self._last = outcome.estimate or self._last
        if isinstance(outcome, Skip):
            self._skipped_updates += 1
            self._last_skip_reason = f"step {self._steps}: {outcome.reason}; ratios left unchanged"
            logger.warning("vcas: %s", self._last_skip_reason)
        else:
            assert isinstance(outcome, Decision)
            ratios = self.mechanism.ratios.with_act(outcome.act)
            weight = [outcome.weight.get(name, 1.0) for name in self.linear_names]
            self.mechanism.set_ratios(ratios.with_weight(weight))
            self._bound = outcome.bound
            self._updates += 1
        self.history.append({"step": self._steps, **self._ratio_stats(), **self._variance_stats(),
                             "controlled_act_ratio": self._bound})

    def _measure_flops_once(self) -> None:
        """The model's FLOPs outside the sampled layers, on a calibration batch when there is one."""
        if self.mechanism.runtime.tally.other is not None or self._source.loss_fn is None:
            return
        batch = self._source.first_batch
        if batch is None and self._source.batches is not None:
            batch = self._source.next_batch()
        if batch is not None:
            self.measure_flops(self._source.loss_fn, batch)
            self._source.first_batch = None

    def _check_batchnorm_once(self) -> None:
        norms = _training_batchnorms(self.model) if self._batchnorm_unchecked else []
        self._batchnorm_unchecked = False
        if norms:
            warnings.warn(_batchnorm_warning(norms, "when attached in training mode"), stacklevel=4)

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict[str, Any]:
        """Current ratios, last variance estimates, step counts and FLOPs reductions.

        ``sampling_*_flops_reduction`` are what sampling saved against an exact backward that
        also skips rows whose gradient is exactly zero; ``bp_flops_reduction`` and
        ``train_flops_reduction`` are against stock PyTorch (see :mod:`vcas.accounting`)."""
        runtime = self.mechanism.runtime
        tally = runtime.tally
        return {
            "controller": self.config.controller,  # resolved: "adaptive" or "paper"
            "update_every": self.config.update_every,
            **self._ratio_stats(),
            **self._variance_stats(),
            "controlled_act_ratio": self._bound,
            "steps": self._steps,
            "updates": self._updates,
            "skipped_updates": self._skipped_updates,
            "last_skip_reason": self._last_skip_reason,
            "adapting": self._adapting,
            "calibrating": self.calibrating,
            "nonfinite_gradients": runtime.nonfinite_gradients,
            "compact_backwards": runtime.compact_backwards,
            "sampling_bp_flops_reduction": tally.sampling_bp_flops_reduction(),
            "sampling_train_flops_reduction": tally.sampling_train_flops_reduction(),
            "bp_flops_reduction": tally.bp_flops_reduction(),
            "train_flops_reduction": tally.train_flops_reduction(),
            "exact_training_flops": tally.exact_training_flops(),
            "nonzero_training_flops": tally.nonzero_training_flops(),
            "spent_flops": tally.spent_flops(),
            "flops_scope": tally.scope,
        }

    def _ratio_stats(self) -> dict[str, Any]:
        ratios = self.mechanism.ratios
        return {"s": self.policy.s, "act_ratios": ratios.act_list, "weight_ratios": ratios.weight_list}

    def _variance_stats(self) -> dict[str, Any]:
        last = self._last
        if last is None:
            return {"var_sgd": None, "var_act": None, "var_weight": None}
        return {"var_sgd": last.var_sgd, "var_act": last.var_act, "var_weight": last.var_weight,
                "var_weight_layers": list(last.var_weight_layers.values())}

    @property
    def calibrating(self) -> bool:
        """True while the coming training steps are an adaptive calibration step: their
        activation gradients propagate exactly and they record per-sample statistics (until the
        next optimizer step)."""
        return self.mechanism.recording

    @property
    def flops(self):
        """The :class:`~vcas.accounting.FlopTally` of this controller (read it, do not edit)."""
        return self.mechanism.runtime.tally

    def explain(self) -> Explanation:
        """What this controller samples, and why the rest stays exact."""
        return Explanation.from_plan(self.model, self.plan, self.config.min_weight_numel)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: ratios, policy, counters, FLOPs, generators."""
        runtime = self.mechanism.runtime
        return {
            "version": checkpoint.VERSION,
            "config": self.config.to_dict(),
            "block_names": list(self.block_names),
            "linear_names": list(self.linear_names),
            "seed": self._seed,
            "policy": self.policy.state_dict(),
            "act_ratios": self.mechanism.ratios.act_list,
            "weight_ratios": self.mechanism.ratios.weight_list,
            "adapting": self._adapting,
            "steps": self._steps,
            "updates": self._updates,
            "skipped_updates": self._skipped_updates,
            "tally": runtime.tally.state_dict(),
            "recording": self.mechanism.recording,
            "generators": runtime.generators.state_dict(),
            "sketches": self.mechanism.sketch_state(),
            "history": [dict(entry) for entry in self.history],
            "compact_blocks": {name: block.state_dict()
                               for name, block in self.mechanism.installation.compact_blocks.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (of this version or an earlier one); the model's
        blocks and linears and the controller must match.

        Raises:
            StateDictError: another model, another controller, or an unknown version.
        """
        state = checkpoint.upgrade(state, self.config.controller)
        saved = state["config"].get("controller", self.config.controller)
        if saved != self.config.controller:
            raise StateDictError(
                f"this state_dict was saved by the {saved!r} controller, and this one is "
                f"{self.config.controller!r}; attach with VCASConfig(controller={saved!r})")
        for key in ("block_names", "linear_names"):
            if list(state[key]) != getattr(self, key):
                raise StateDictError(
                    f"state_dict {key} do not match this model: saved {len(state[key])}, "
                    f"model has {len(getattr(self, key))}; attach with the same blocks")
        mechanism, runtime = self.mechanism, self.mechanism.runtime
        self.policy.pause(mechanism)
        self._seed = int(state["seed"])
        runtime.generators.reseed(self._seed)
        mechanism.subsets, runtime.recorder.probes = probes(self.plan, mechanism.measured,
                                                            self.config.param_fraction, self._seed)
        mechanism.load_sketch_state(state.get("sketches"), self._seed)
        self.policy.load_state_dict(state["policy"])
        mechanism.set_ratios(mechanism.ratios.with_act(state["act_ratios"]).with_weight(state["weight_ratios"]))
        self._adapting = bool(state["adapting"])
        self._steps = int(state["steps"])
        self._updates = int(state["updates"])
        self._skipped_updates = int(state["skipped_updates"])
        runtime.tally.load_state_dict(state["tally"])
        if state["recording"]:
            mechanism.start_recording()
        runtime.generators.load_state_dict(state["generators"])
        self.history = [dict(entry) for entry in state["history"]]
        # A checkpoint without this entry (an earlier format): its blocks verify themselves again.
        blocks = self.mechanism.installation.compact_blocks
        for name, block_state in state.get("compact_blocks", {}).items():
            if name in blocks:
                blocks[name].load_state_dict(block_state)

    # ------------------------------------------------------------------ internals
    def _check_attached(self) -> None:
        if self._detached:
            raise AttachError("this controller was detached; attach the model again")


class _OptimizerStep:
    """The optimizer step post-hook of a controller attached with ``optimizer=``."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.controller._detached:
            self.controller._on_step()


# --------------------------------------------------------------------- attaching
def attach(model: nn.Module, config: VCASConfig | None = None, *, blocks: BlockSpec = None,
           include: ModuleFilter = None, exclude: ModuleFilter = None,
           sites: SiteRegistry = DEFAULT_SITES, optimizer: torch.optim.Optimizer | None = None,
           loss_fn: LossFn | None = None, calibration_data: Iterable[Any] | None = None,
           check_batch_first: bool = True) -> Controller:
    """Attach VCAS sampled backpropagation to ``model`` and return its :class:`Controller`.

    The model keeps its parameters (an existing optimizer keeps working), module classes and
    ``state_dict`` keys; ``controller.detach()`` restores the original behaviour exactly.
    Everything is decided and validated before the model is changed: a failed ``attach``
    leaves the model as it was.

    Args:
        model: any ``nn.Module`` whose repeated blocks return a batch-first hidden state. A
            DistributedDataParallel or ``torch.compile`` wrapper is looked through (vcas attaches
            to the inner module; calibration runs under DDP's ``no_sync``); FSDP2
            (``fully_shard``) is supported. Under DDP or FSDP2, attach after
            ``init_process_group`` and step the controller on every rank.
        config: a :class:`VCASConfig` (its defaults if ``None``).
        blocks: ``None`` to detect the repeated blocks, a module class or tuple of classes, or
            a list of qualified module names.
        include: layers outside the blocks to sample as well (default: none): glob patterns
            over qualified names, or a predicate ``fn(module, qualified_name) -> bool``.
        exclude: layers or blocks to leave exact, in the same forms. :func:`vcas.explain`
            shows what a choice of blocks and filters samples.
        sites: the registry of sampled layer kinds (:data:`vcas.DEFAULT_SITES`; for a custom
            linear-like layer pass ``DEFAULT_SITES.register(MyLinear, vcas.LinearKind(...))``, a new
            registry).
        optimizer: count this optimizer's steps (its step post-hook) instead of calls to
            ``maybe_calibrate``: nothing else is needed in the training loop.
        loss_fn: ``loss_fn(batch) -> scalar loss`` for calibration passes and the FLOPs
            measurement; the paper's controller needs it (here or at ``maybe_calibrate``, and here
            with ``optimizer=``). The adaptive one does without; its FLOPs reductions then cover
            the sampled layers only (``stats()["flops_scope"] == "sampled_layers"``).
        calibration_data: batches for ``loss_fn`` (an iterable such as a DataLoader, other than
            the training iterator).
        check_batch_first: check during each forward that every block's hidden state has a
            dimension 0 equal to a batch size of the model's inputs (activation sampling drops
            samples along dimension 0). Turn off for blocks that see a reshaped batch on purpose.
    Raises:
        BlockDetectionError: no blocks found, a block name that does not exist, or blocks
            that are not batch-first (:class:`vcas.BatchLayoutError`, raised by the forward).
        ConfigError: a bad config or filter, or the paper's controller with ``optimizer=`` but
            without calibration batches.
        AttachError: the model already has vcas attached, has nothing to sample, or is wrapped
            in ``nn.DataParallel``, FSDP1 or DeepSpeed.
    """
    config = config if config is not None else VCASConfig()
    if not isinstance(config, VCASConfig):
        raise ConfigError(f"config must be a VCASConfig, got {type(config).__name__}")
    ddp = ddp_wrapper(model)
    target = unwrap_model(model)
    plan = plan_model(target, blocks, include=include, exclude=exclude, sites=sites)
    measured = measured_weights(plan)
    if not measured:
        raise AttachError("the blocks have no trainable parameters: nothing to sample")
    config, reason = _resolve_controller(config, plan, target)
    if config.controller == "paper" and is_fsdp2(target):
        raise AttachError("controller='paper' takes gradients of the weights with autograd.grad, "
                          "which FSDP2's sharded parameters do not support; use "
                          "controller='adaptive' (or 'auto')")
    seed = config.seed if config.seed is not None else torch.initial_seed() % (2**62)
    subsets, layer_probes = probes(plan, measured, config.param_fraction, seed)
    ratios = RatioTable.ones(plan.block_names, [site.name for site in plan.linears])
    runtime = Runtime(ratios, SamplingGenerators(seed, distributed.rank()), Recorder(layer_probes),
                      recompute_below=config.recompute_below, gather_below=config.gather_below,
                      sync_free=config.sync_free)
    installation = Installation(target, plan, runtime, min_weight_numel=config.min_weight_numel,
                                check_batch_first=check_batch_first)
    mechanism = Mechanism(target, plan, installation, measured, subsets, ddp, seed)
    policy = POLICIES[config.controller](config)
    source = CalibrationSource(loss_fn, calibration_data)
    controller = Controller(mechanism, policy, config, seed, source, reason)
    if optimizer is not None and policy.needs_batches:
        source.require(f"with optimizer=..., the {policy.name!r} controller needs its calibration "
                       "batches at attach")
    installation.install()
    runtime.set_base_mode(SAMPLING)
    policy.start(mechanism)
    if optimizer is not None:
        controller.hook_optimizer(optimizer)
    logger.info("vcas attached to %s: %s; controller %r (%s); %s", type(target).__name__,
                Explanation.from_plan(target, plan, config.min_weight_numel).summary(),
                config.controller, reason, config)
    return controller


def _resolve_controller(config: VCASConfig, plan: Plan, model: nn.Module) -> tuple[VCASConfig, str]:
    """The config with ``controller="auto"`` replaced by the controller this model suits, and why.

    The adaptive controller needs per-sample gradients of sampled layers (an error without
    any) and samples that do not interact in the backward (a warning under the BatchNorm
    layers in training mode)."""
    chosen = config.controller
    has_sites = any(site.trainable for site in plan.sites)
    norms = _training_batchnorms(model)
    reason = "as configured"
    if chosen == "auto":
        chosen = "adaptive" if has_sites and not norms else "paper"
        reason = ("auto: no sampled layer with a trainable weight" if not has_sites else
                  f"auto: BatchNorm in training mode ({norms[0]})" if norms else "auto")
    elif chosen == "adaptive" and not has_sites:
        raise AttachError(
            "controller='adaptive' measures per-sample gradients in the sampled linear or "
            "convolution layers, and this model has none with a trainable weight; use "
            "VCASConfig(controller='paper') (or 'auto', which chooses it)")
    elif chosen == "adaptive" and norms:
        warnings.warn(_batchnorm_warning(norms, "here"), stacklevel=4)
    return config.resolve(chosen), reason


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

