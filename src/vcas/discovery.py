"""Finding the blocks of a model and the linear layers whose backward is sampled."""

from __future__ import annotations

from collections import Counter
from typing import Sequence, Union

from torch import nn

from .errors import BlockDetectionError

BlockSpec = Union[None, type, tuple, Sequence[str]]

_HOW_TO_NAME = (
    "Name the blocks explicitly: attach(model, cfg, blocks=MyBlockClass), a tuple of classes, "
    "or a list of qualified module names such as ['encoder.layer.0', 'encoder.layer.1'].")


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
            classes = Counter(type(child) for child in module.children())
            for cls, count in classes.items():
                if count >= 2 and not _is_leaf_layer(cls):
                    counts[cls] += count
    if not counts:
        return []
    best = max(counts, key=lambda cls: (counts[cls], -_first_position(model, cls)))
    return _outermost(model, lambda module: type(module) is best)


def _is_leaf_layer(cls: type) -> bool:
    """Single layers (Linear, Dropout, activations...) are not blocks: blocks hold modules."""
    return cls.__module__.startswith("torch.nn.modules")


def _first_position(model: nn.Module, cls: type) -> int:
    for position, module in enumerate(model.modules()):
        if type(module) is cls:
            return position
    return 0


def _outermost(model: nn.Module, match) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if match(module) and not any(name.startswith(parent + ".") for parent, _ in found):
            if all(module is not other for _, other in found):
                found.append((name, module))
    return found


def _by_names(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise BlockDetectionError(
            f"blocks {missing} are not modules of {type(model).__name__}; valid names look like "
            f"{[n for n in list(modules)[1:6]]}. {_HOW_TO_NAME}")
    order = {name: position for position, name in enumerate(modules)}
    return [(name, modules[name]) for name in sorted(dict.fromkeys(names), key=order.__getitem__)]


def is_transposed_linear(module: nn.Module) -> bool:
    """transformers' Conv1D: a linear layer that stores its weight as (in, out)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")


def find_linears(blocks: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module, bool]]:
    """Linear layers inside the blocks as (qualified name, module, transposed), each once."""
    found: list[tuple[str, nn.Module, bool]] = []
    seen: set[int] = set()
    for block_name, block in blocks:
        for name, module in block.named_modules():
            if id(module) in seen:
                continue
            transposed = is_transposed_linear(module)
            # Subclasses of nn.Linear may compute something else in forward: they stay exact.
            if type(module) is nn.Linear or transposed:
                seen.add(id(module))
                found.append((f"{block_name}.{name}" if name else block_name, module, transposed))
    return found
