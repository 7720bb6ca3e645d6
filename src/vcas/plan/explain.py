"""A report of what vcas samples in a model, and why the rest stays exact (nothing is modified)."""

from __future__ import annotations

import dataclasses
from collections import Counter

from torch import nn

from ..install.registry import DEFAULT_SITES, SiteRegistry
from .discovery import BlockSpec, ModuleFilter, Plan, PlannedSite, plan_model
from .wrappers import unwrap_model


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """One module of the report: qualified name, class name, and what vcas does with it."""

    name: str
    type_name: str
    detail: str


@dataclasses.dataclass(frozen=True)
class Explanation:
    """What attaching samples. ``print()`` it for a table; :meth:`summary` is one line.

    Attributes:
        model: class name of the model.
        blocks: the blocks whose output gradient is sampled (SampleA), input side first.
        sampled: layers whose backward vcas computes: linear layers skip zero-gradient rows and
            sample their weight gradient (SampleW) where it is trainable and large enough;
            linear layers with a frozen weight compute only the input gradient (sampled through
            the block samplers above them) and keep no input for a weight gradient;
            convolutions skip zero-gradient samples.
        exact: parameterised modules whose backward stays exact, each with the reason.
        mixing: modules inside blocks that mix samples in their backward (BatchNorm in training
            mode); below them dropped samples have non-zero gradients again, so nothing is skipped
            there (this is correct, not a bias: skipping is decided from the arriving gradient).
    """

    model: str
    blocks: tuple[LayerReport, ...]
    sampled: tuple[LayerReport, ...]
    exact: tuple[LayerReport, ...]
    mixing: tuple[LayerReport, ...]

    @classmethod
    def from_plan(cls, model: nn.Module, plan: Plan, min_weight_numel: int = 0) -> Explanation:
        """The report of ``plan``; linears under ``min_weight_numel`` entries are reported with
        an exact weight gradient, as the controllers leave them."""
        blocks = tuple(_report(name, module, "block, top of its stack" if plan.above[name] is None else "block")
                       for name, module in plan.blocks)
        sampled = tuple(_report(site.name, site.module, _site_detail(site, min_weight_numel))
                        for site in plan.sites)
        return cls(
            model=type(model).__name__,
            blocks=blocks,
            sampled=sampled,
            exact=tuple(_report(name, module, reason) for name, module, reason in plan.exact),
            mixing=tuple(_report(name, module, "mixes samples in its backward in training mode")
                         for name, module in plan.mixing))

    def summary(self) -> str:
        """One line: counts of blocks, sampled layers by type, exact layers by reason."""
        block_types = ", ".join(sorted({b.type_name for b in self.blocks}))
        frozen = sum(r.detail.startswith(_FROZEN) for r in self.sampled)
        kinds = _counts(r.type_name for r in self.sampled) + (f"; {frozen} with a frozen weight" if frozen else "")
        line = (f"{len(self.blocks)} blocks ({block_types}), {len(self.sampled)} sampled layers "
                f"({kinds}), {len(self.exact)} exact")
        outside = sum(r.detail.startswith("outside") for r in self.exact)
        if outside:
            line += f" ({outside} outside the blocks)"
        if self.mixing:
            line += f", {len(self.mixing)} sample-mixing ({_counts(r.type_name for r in self.mixing)})"
        return line + "; vcas.explain(model) lists them"

    def __str__(self) -> str:
        lines = [f"vcas on {self.model}: {self.summary()}", "", "blocks (activation gradient sampled):"]
        lines += [f"  {r.name}  [{r.type_name}]" + ("  top of its stack" if "top" in r.detail else "")
                  for r in self.blocks]
        lines += ["", "sampled layers (zero-gradient rows or samples skipped in every one):"]
        lines += [f"  {r.name}  [{r.type_name}]  {r.detail}" for r in self.sampled]
        lines += ["", "exact layers:"] + [f"  {r.name}  [{r.type_name}]  {r.detail}" for r in self.exact]
        if self.mixing:
            lines += ["", "sample-mixing modules inside blocks (nothing is skipped below them):"]
            lines += [f"  {r.name}  [{r.type_name}]" for r in self.mixing]
        return "\n".join(lines)


def explain(model: nn.Module, blocks: BlockSpec = None, *, include: ModuleFilter = None,
            exclude: ModuleFilter = None, sites: SiteRegistry = DEFAULT_SITES,
            min_weight_numel: int | None = None) -> Explanation:
    """What :func:`vcas.attach` with the same arguments would sample, without modifying ``model``.

    Args:
        model: the model to inspect (DDP and ``torch.compile`` wrappers are looked through).
        blocks: as for :func:`vcas.attach` (``None`` detects the repeated blocks).
        include: layers outside the blocks to sample as well: glob patterns over qualified names
            or a predicate ``fn(module, qualified_name) -> bool``.
        exclude: layers or blocks to leave exact, in the same forms.
        sites: the registry of sampled layer kinds (as for :func:`vcas.attach`).
        min_weight_numel: as ``VCASConfig.min_weight_numel`` (its default if ``None``): linears
            with fewer weight entries keep an exact weight gradient.
    Raises:
        BlockDetectionError: no blocks found or a block spec that does not match.
        ConfigError: a filter pattern that matches no module.

    Example::

        >>> import vcas, torch
        >>> model = torch.nn.Sequential(*[torch.nn.Sequential(
        ...     torch.nn.Linear(4, 4), torch.nn.ReLU()) for _ in range(2)])
        >>> print(vcas.explain(model, blocks=["0", "1"]).summary())
        2 blocks (Sequential), 2 sampled layers (2 Linear), 0 exact; vcas.explain(model) lists them
    """
    from ..config import VCASConfig

    model = unwrap_model(model)  # names as attach sees them, inside DDP / torch.compile wrappers
    threshold = VCASConfig().min_weight_numel if min_weight_numel is None else min_weight_numel
    plan = plan_model(model, blocks, include=include, exclude=exclude, sites=sites)
    return Explanation.from_plan(model, plan, threshold)


def _site_detail(site: PlannedSite, min_weight_numel: int) -> str:
    if not site.is_linear:
        return "convolution: skips zero-gradient samples"
    if not site.trainable:
        return (f"{_FROZEN}: input gradient only, on non-zero rows (sampled through the block "
                "samplers above); no weight gradient, no input kept for one")
    if site.weight.numel() < min_weight_numel:
        return (f"linear: skips zero-gradient rows; weight gradient exact (fewer than "
                f"min_weight_numel={min_weight_numel} entries)")
    return "linear: skips zero-gradient rows, samples the weight gradient (SampleW)"


_FROZEN = "linear, frozen weight"  # how a sampled linear with a frozen weight is described


def _report(name: str, module: nn.Module, detail: str) -> LayerReport:
    return LayerReport(name, type(module).__name__, detail)


def _counts(type_names) -> str:
    return ", ".join(f"{count} {name}" for name, count in Counter(type_names).most_common())
