"""Finding the blocks of a model and deciding, layer by layer, whose backward vcas samples.

Design note "stacks": blocks that are consecutive children of one container (``encoder.layer``)
form a stack; the gradient reaching a block's output went through the sampler of the next block
of its stack first (its "block above"). The top block of a stack has no block above: in an
encoder-decoder, the encoder's top block receives the sum of the gradients of every decoder block
(cross-attention), not the output of one sampler, so it samples on its own.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import cast

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import BlockDetectionError, ConfigError
from ..install.registry import DEFAULT_SITES, SiteKind, SiteRegistry

BlockSpec = type | tuple | Sequence[str] | None
ModulePredicate = Callable[[nn.Module, str], bool]
ModuleFilter = str | Sequence[str] | ModulePredicate | None

_HOW_TO_NAME = (
    "Name the blocks explicitly: attach(model, cfg, blocks=MyBlockClass), a tuple of classes, "
    "or a list of qualified module names such as ['encoder.layer.0', 'encoder.layer.1'].")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclasses.dataclass(frozen=True)
class PlannedSite:
    """A layer whose backward vcas will compute.

    Attributes:
        name: qualified name.
        module: the layer.
        kind: the registry entry that builds its site (``kind.kind`` is "linear" or "conv").
        block: the block that contains it, or None for a layer opted in with ``include=``.
        trainable: whether its weight requires a gradient (a frozen weight gets none: only the
            input gradient is computed, sampled through the activation samplers above it).
    """

    name: str
    module: nn.Module
    kind: SiteKind
    block: str | None
    trainable: bool

    @property
    def is_linear(self) -> bool:
        return self.kind.kind == "linear"

    @property
    def weight(self) -> nn.Parameter:
        return cast(nn.Parameter, self.kind.weight_of(self.module))


@dataclasses.dataclass(frozen=True)
class Plan:
    """What attaching does to a model, decided before anything is changed.

    Attributes:
        blocks: (name, module) of each block whose output gradient is sampled, input side first.
        above: per block name, the block whose sampler the gradient passed first (the next
            block of the same stack), or None for the top of a stack.
        sites: the layers whose backward vcas computes, in module order.
        exact: (name, module, reason) of the layers whose backward stays exact.
        mixing: (name, module) of modules inside blocks that mix samples in their backward.
    """

    blocks: tuple[tuple[str, nn.Module], ...]
    above: dict[str, str | None]
    sites: tuple[PlannedSite, ...]
    exact: tuple[tuple[str, nn.Module, str], ...]
    mixing: tuple[tuple[str, nn.Module], ...]

    @property
    def block_names(self) -> list[str]:
        return [name for name, _ in self.blocks]

    @property
    def linears(self) -> list[PlannedSite]:
        return [site for site in self.sites if site.is_linear]

    @property
    def convs(self) -> list[PlannedSite]:
        return [site for site in self.sites if not site.is_linear]


def plan_model(model: nn.Module, blocks: BlockSpec = None, *, include: ModuleFilter = None,
               exclude: ModuleFilter = None, sites: SiteRegistry = DEFAULT_SITES) -> Plan:
    """Decide the blocks and the sampled layers of ``model`` without modifying it.

    A layer of a kind in ``sites`` (by default ``nn.Linear``, transformers' ``Conv1D``,
    ``nn.Conv1d/2d/3d``) is sampled when it lies inside a block or matches ``include``, unless
    it matches ``exclude``; a module matches when it or a module containing it matches. Blocks
    that match ``exclude`` are not sampled either. Filters are glob patterns over qualified
    names (``"encoder.*.attention.*"``; a pattern also matches as a name suffix, so
    ``"classifier"`` matches ``"model.classifier"``) or a predicate
    ``fn(module, qualified_name) -> bool``.

    Raises:
        BlockDetectionError: no blocks, an unknown block name, or sequence-first blocks.
        ConfigError: a filter of the wrong type, or a pattern that matches no module.
    """
    include_fn = compile_filter(model, include, "include")
    exclude_fn = compile_filter(model, exclude, "exclude")
    included = _matched_subtrees(model, include_fn)
    excluded = _matched_subtrees(model, exclude_fn)
    found = [(name, block) for name, block in find_blocks(model, blocks) if name not in excluded]
    if not found:
        raise BlockDetectionError(
            f"exclude={exclude!r} excludes every block of {type(model).__name__}; nothing is left "
            "to sample. Exclude fewer modules.")
    _check_batch_first(found)
    owner = _block_owner(found)
    planned, exact, mixing = [], [], []
    for name, module in model.named_modules():
        block = owner.get(name)
        kind = sites.lookup(module)
        patched = "forward" in module.__dict__  # another library (or vcas) replaced its forward
        wanted = block is not None or name in included
        if kind is not None and wanted and not patched and name not in excluded:
            weight = kind.weight_of(module)
            trainable = isinstance(weight, nn.Parameter) and weight.requires_grad
            planned.append(PlannedSite(name, module, kind, block, trainable))
        elif kind is not None or _owns_parameters(module) or isinstance(module, _BatchNorm):
            reason = _exact_reason(module, kind is not None, block is not None, name in excluded, patched)
            exact.append((name, module, reason))
        if block is not None and isinstance(module, _BatchNorm):
            mixing.append((name, module))
    return Plan(tuple(found), stack_above(found), tuple(planned), tuple(exact), tuple(mixing))


def stack_above(blocks: list[tuple[str, nn.Module]]) -> dict[str, str | None]:
    """The next block of the same container, or None at the top of a stack (design note above)."""
    names = [name for name, _ in blocks]
    parents = [name.rpartition(".")[0] for name in names]
    return {name: names[i + 1] if i + 1 < len(names) and parents[i + 1] == parents[i] else None
            for i, name in enumerate(names)}


def _exact_reason(module: nn.Module, supported: bool, in_block: bool, excluded: bool,
                  patched: bool) -> str:
    if excluded:
        return "excluded by exclude="
    if patched and supported:
        return "has an instance-level forward already (vcas attached, or another library patched it)"
    if not in_block:
        return ("outside the blocks; opt in with include=" if supported
                else "outside the blocks")
    if type(module).__module__.startswith("bitsandbytes"):
        return (f"quantized layer ({type(module).__name__}, bitsandbytes): its backward stays "
                "exact; the activation samplers above it still sample its input gradient")
    if isinstance(module, _BatchNorm):
        return ("batch statistics mix samples in its backward (training mode): dropped samples "
                "get non-zero gradients again, so nothing is skipped below it")
    if isinstance(module, nn.Linear):
        return (f"subclass of nn.Linear ({type(module).__name__}) whose forward vcas does not know; "
                "register it with vcas.DEFAULT_SITES.register(...) if it is a plain linear layer")
    if isinstance(module, nn.MultiheadAttention):
        return "unsupported type: nn.MultiheadAttention computes its projections in one fused call"
    if "Norm" in type(module).__name__:
        return "normalisation (per-sample and cheap)"
    if isinstance(module, nn.Embedding):
        return "embedding lookup (cheap)"
    return f"unsupported type {type(module).__name__}: its backward stays exact"


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


# ------------------------------------------------------------------------- filters
def compile_filter(model: nn.Module, spec: ModuleFilter, argument: str) -> ModulePredicate | None:
    """A predicate ``fn(module, name)`` for a filter spec; patterns must each match a module."""
    if spec is None:
        return None
    if callable(spec):
        return spec
    if isinstance(spec, str):
        patterns = [spec]
    elif isinstance(spec, (list, tuple)) and all(isinstance(p, str) for p in spec):
        patterns = list(spec)
    else:
        raise ConfigError(
            f"{argument}={spec!r} is not understood: pass a glob pattern, a list of patterns, "
            "or a predicate fn(module, qualified_name) -> bool")
    names = [name for name, _ in model.named_modules() if name]
    unmatched = [p for p in patterns if not any(_name_matches(name, p) for name in names)]
    if unmatched:
        raise ConfigError(
            f"{argument} patterns {unmatched} match no module of {type(model).__name__}; "
            f"patterns are globs over qualified names such as {names[:4]}")
    return lambda module, name: any(_name_matches(name, p) for p in patterns)


def _name_matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def _matched_subtrees(model: nn.Module, predicate: ModulePredicate | None) -> set[str]:
    """Names of the modules that match, or lie inside a module that matches."""
    if predicate is None:
        return set()
    matched: set[str] = set()
    for name, module in model.named_modules():
        if not name:
            continue
        if name.rpartition(".")[0] in matched or bool(predicate(module, name)):
            matched.add(name)
    return matched


def _block_owner(blocks: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """Qualified name of every module inside a block (the block included) -> the block's name."""
    return {f"{block_name}.{name}" if name else block_name: block_name
            for block_name, block in blocks for name, _ in block.named_modules()}


def _check_batch_first(blocks: Iterable[tuple[str, nn.Module]]) -> None:
    """torch's transformer layers default to (sequence, batch, features); vcas samples dim 0."""
    layers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    wrong = [name for name, block in blocks
             if isinstance(block, layers) and not block.self_attn.batch_first]
    if wrong:
        raise BlockDetectionError(
            f"blocks {wrong} are sequence-first (batch_first=False); vcas samples the batch "
            "dimension, which must come first. Build them with batch_first=True.")


# ------------------------------------------------------------------------- blocks
def find_blocks(model: nn.Module, blocks: BlockSpec = None) -> list[tuple[str, nn.Module]]:
    """The model's blocks as (qualified name, module), in module order (input side first).

    ``blocks=None`` detects them: the children of ``nn.ModuleList`` / ``nn.Sequential`` containers
    that hold at least two modules of one class; the class with the most such instances wins (so
    the two stacks of an encoder-decoder are both found). A class or tuple of classes selects the
    outermost modules of those classes; a list of names selects exactly those modules.

    Raises:
        BlockDetectionError: nothing found, an unknown name, or a spec of the wrong type.
    """
    if blocks is None:
        found = _detect_repeated_blocks(model)
    elif isinstance(blocks, type) or (isinstance(blocks, tuple) and blocks
                                        and all(isinstance(b, type) for b in blocks)):
        found = _outermost(model, lambda module: isinstance(module, blocks))
    elif isinstance(blocks, (list, tuple)) and all(isinstance(b, str) for b in blocks):
        found = _by_names(model, list(blocks))
    else:
        raise BlockDetectionError(
            f"blocks={blocks!r} is not understood. {_HOW_TO_NAME}")
    if not found:
        raise BlockDetectionError(
            f"no blocks found in {type(model).__name__}: vcas samples the gradient at block "
            f"outputs and found no repeated layers to use. {_HOW_TO_NAME}")
    return found


def _detect_repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    counts: Counter[type] = Counter()
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            classes = Counter(type(child) for child in module.children() if _can_be_block(child))
            for cls, count in classes.items():
                if count >= 2:
                    counts[cls] += count
    if not counts:
        return []
    best = max(counts, key=lambda cls: (counts[cls], -_first_position(model, cls)))
    return _outermost(model, lambda module: type(module) is best)


def _can_be_block(module: nn.Module) -> bool:
    """Blocks hold layers: single layers (Linear, Dropout, activations) and bare containers are
    not blocks, torch's composite layers (nn.TransformerEncoderLayer) are."""
    return not isinstance(module, _CONTAINERS) and next(module.children(), None) is not None


def _first_position(model: nn.Module, cls: type) -> int:
    for position, module in enumerate(model.modules()):
        if type(module) is cls:
            return position
    return 0


def _outermost(model: nn.Module, match) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if (match(module) and not any(name.startswith(parent + ".") for parent, _ in found)
                and all(module is not other for _, other in found)):
                found.append((name, module))
    return found


def _by_names(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise BlockDetectionError(
            f"blocks {missing} are not modules of {type(model).__name__}; valid names look like "
            f"{list(list(modules)[1:6])}. {_HOW_TO_NAME}")
    order = {name: position for position, name in enumerate(modules)}
    return [(name, modules[name]) for name in sorted(dict.fromkeys(names), key=order.__getitem__)]
