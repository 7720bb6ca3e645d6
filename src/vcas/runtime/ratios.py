"""Keep ratios by qualified module name: one table per decision, replaced whole."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType

from ..errors import ConfigError


@dataclasses.dataclass(frozen=True)
class RatioTable:
    """The activation keep ratio of every block and the weight keep ratio of every sampled linear.

    Attributes:
        act: block name -> rho (input side first, in plan order).
        weight: linear name -> nu.
    """

    act: Mapping[str, float]
    weight: Mapping[str, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "act", MappingProxyType(dict(self.act)))
        object.__setattr__(self, "weight", MappingProxyType(dict(self.weight)))

    @classmethod
    def ones(cls, blocks: Iterable[str], linears: Iterable[str]) -> RatioTable:
        return cls(dict.fromkeys(blocks, 1.0), dict.fromkeys(linears, 1.0))

    def with_act(self, values: Sequence[float]) -> RatioTable:
        """The table with the activation ratios replaced, given in plan order."""
        return dataclasses.replace(self, act=_by_name(self.act, values))

    def with_weight(self, values: Sequence[float]) -> RatioTable:
        """The table with the weight ratios replaced, given in plan order."""
        return dataclasses.replace(self, weight=_by_name(self.weight, values))

    @property
    def act_list(self) -> list[float]:
        return list(self.act.values())

    @property
    def weight_list(self) -> list[float]:
        return list(self.weight.values())

    @property
    def samples_anything(self) -> bool:
        return any(r < 1.0 for r in self.act.values()) or any(r < 1.0 for r in self.weight.values())


def _by_name(current: Mapping[str, float], values: Sequence[float]) -> dict[str, float]:
    values = list(values)
    if len(values) != len(current):
        raise ConfigError(f"expected {len(current)} ratios, got {len(values)}")
    return {name: float(value) for name, value in zip(current, values)}
