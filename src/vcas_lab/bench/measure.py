"""Timing, FLOPs and memory of one training step, for exact and sampled variants of one model."""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from vcas import DEFAULT_SITES, Controller, VCASConfig, attach

from .naive import NaiveLinearKind
from .presets import Workload

EXACT, NAIVE, FAST, FULL = "exact", "naive", "vcas", "vcas-no-recompute"
# Steps a compactly recomputing block needs to be verified (vcas.ops.recompute) before its
# compact path runs: the benchmark times the steady state.
VERIFYING_STEPS = 3
VARIANTS = (NAIVE, FAST, FULL)


@dataclasses.dataclass
class Setting:
    """One variant of the model at one keep ratio (act = weight = ``ratio``)."""

    variant: str
    ratio: float
    model: nn.Module
    controller: Controller | None = None
    forward_s: list[float] = dataclasses.field(default_factory=list)
    backward_s: list[float] = dataclasses.field(default_factory=list)
    forward_flops: float = 0.0
    backward_flops: float = 0.0
    memory_bytes: float = 0.0

    @property
    def label(self) -> str:
        return self.variant if self.variant == EXACT else f"{self.variant}@{self.ratio:g}"

    def activate(self) -> None:
        if self.controller is not None:
            self.controller.set_ratios(act=self.ratio, weight=self.ratio)


def make_settings(workload: Workload, ratios: list[float], config: VCASConfig,
                  variants: tuple[str, ...] = (NAIVE, FAST)) -> list[Setting]:
    """The exact model and, per variant, one attached copy shared by all ratios."""
    settings = [Setting(EXACT, 1.0, workload.model)]
    for variant in variants:
        model = copy.deepcopy(workload.model)
        cfg = config if variant == FAST else dataclasses.replace(config, recompute_below=0.0)
        sites = DEFAULT_SITES.register(nn.Linear, NaiveLinearKind()) if variant == NAIVE else DEFAULT_SITES
        controller = attach(model, cfg, sites=sites)
        settings += [Setting(variant, ratio, model, controller) for ratio in ratios]
    return settings


def _zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


class Clock:
    """Wall-clock on CPU; CUDA events (synchronised once per measurement) on GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return end - start


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def time_step(setting: Setting, workload: Workload, clock: Clock, dtype: torch.dtype | None) -> None:
    setting.activate()
    _zero_grads(setting.model)
    start = clock.mark()
    with autocast_context(clock_device(workload), dtype):
        loss = workload.loss_fn(setting.model, workload.inputs)
    middle = clock.mark()
    loss.backward()
    end = clock.mark()
    setting.forward_s.append(clock.elapsed(start, middle))
    setting.backward_s.append(clock.elapsed(middle, end))


def clock_device(workload: Workload) -> torch.device:
    return next(workload.model.parameters()).device


def count_step(setting: Setting, workload: Workload, dtype: torch.dtype | None, draws: int) -> None:
    """Mean FLOPs (torch.utils.flop_counter) of forward and backward, and the activation memory:
    bytes saved for the backward on CPU, peak allocated bytes on CUDA."""
    device = clock_device(workload)
    forward, backward, memory = [], [], []
    for _ in range(draws):
        setting.activate()
        _zero_grads(setting.model)
        saved = _SavedBytes()
        with FlopCount() as counter:
            with autocast_context(device, dtype), saved:
                loss = workload.loss_fn(setting.model, workload.inputs)
            forward.append(counter.total)
            loss.backward()
        backward.append(counter.total - forward[-1])
        memory.append(float(saved.bytes))
    if device.type == "cuda":
        memory = [_cuda_peak(setting, workload, dtype)]
    setting.forward_flops = statistics.mean(forward)
    setting.backward_flops = statistics.mean(backward)
    setting.memory_bytes = statistics.mean(memory)


def _cuda_peak(setting: Setting, workload: Workload, dtype: torch.dtype | None) -> float:
    _zero_grads(setting.model)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with autocast_context(clock_device(workload), dtype):
        loss = workload.loss_fn(setting.model, workload.inputs)
    loss.backward()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


class FlopCount(TorchDispatchMode):
    """Total FLOPs of the ops run, by ``torch.utils.flop_counter``'s formulas.

    ``FlopCounterMode`` itself also tracks modules with backward hooks that cannot run inside
    the nested ``autograd.grad`` of a compact block's backward, so the total is kept here.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the distinct storages autograd saves for the backward (the activation memory)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[int] = set()
        super().__init__(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._seen and not isinstance(tensor, nn.Parameter):
            self._seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()
        return tensor


def rounds(settings: list[Setting], repeats: int) -> Iterator[list[Setting]]:
    """The order of each round: every setting once, rotated so that slow drifts of the machine
    spread evenly over the settings."""
    for r in range(repeats):
        shift = r % len(settings)
        yield settings[shift:] + settings[:shift]


def run_benchmark(workload: Workload, ratios: list[float], config: VCASConfig, *,
                  repeats: int, warmup: int, dtype: torch.dtype | None, flop_draws: int = 3,
                  variants: tuple[str, ...] = (NAIVE, FAST),
                  progress: Callable[[str], None] = lambda _: None) -> list[Setting]:
    """Time every setting in interleaved rounds; FLOPs and memory are measured in separate steps."""
    settings = make_settings(workload, ratios, config, variants)
    clock = Clock(clock_device(workload))
    for setting in settings:  # past compact recompute's verifying uses, then warm
        for _ in range(warmup + (VERIFYING_STEPS if setting.variant == FAST else 0)):
            time_step(setting, workload, clock, dtype)
        setting.forward_s.clear()
        setting.backward_s.clear()
    for setting in settings:
        progress(f"counting {setting.label}")
        count_step(setting, workload, dtype, flop_draws)
    for i, order in enumerate(rounds(settings, repeats)):
        progress(f"round {i + 1}/{repeats}")
        for setting in order:
            time_step(setting, workload, clock, dtype)
    return settings
