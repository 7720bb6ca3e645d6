"""What a calibration measures, keyed by layer name, and how each kind merges across ranks.

- :class:`Measurement`: variance estimates per measured weight (the paper's calibration passes,
  and the form every controller reports).
- :class:`CalibrationStats`: what an adaptive calibration step recorded (per-sample records,
  SampleW row scores), from which the adaptive controller predicts variances at any ratios.

Merging: the gradient data parallelism applies is the mean of the ranks' local gradients, so
both its SGD variance and its sampling variance are the local ones divided by the number of
ranks; the ratio the controllers compare is the same whether taken per rank or for the global
batch. :meth:`Measurement.merge` averages the estimates (a larger sample of the same ratio);
:meth:`CalibrationStats.merge` pools the ranks' passes as passes of one step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, cast

import torch

from ..ops.records import SampleRecord
from ..sampling import SortedScores


@dataclasses.dataclass
class Measurement:
    """Variance estimates of one calibration.

    Attributes:
        var_sgd_layers: per measured weight (layer or parameter name), the SGD variance.
        var_act_layers: per measured weight, the variance activation sampling adds.
        var_weight_layers: per sampled linear, the variance weight sampling adds.
        block_norms: per backward pass, per block (plan order): per-sample gradient norms.
        row_scores: per sampled linear, the SampleW row scores of each pass.
        act_ratios: the activation keep ratios the estimates are for (plan order).
    """

    var_sgd_layers: dict[str, float]
    var_act_layers: dict[str, float]
    var_weight_layers: dict[str, float]
    block_norms: list[list[torch.Tensor | None]]
    row_scores: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    act_ratios: list[float] = dataclasses.field(default_factory=list)

    @property
    def var_sgd(self) -> float:
        return float(sum(self.var_sgd_layers.values()))

    @property
    def var_act(self) -> float:
        return float(sum(self.var_act_layers.values()))

    @property
    def var_weight(self) -> float:
        return float(sum(self.var_weight_layers.values()))

    @classmethod
    def merge(cls, ranks: Sequence[Measurement]) -> Measurement:
        """The ranks' measurements as one: estimates averaged, per-pass records concatenated
        in rank order (so every rank computes the same update from the same numbers)."""
        if len(ranks) == 1:
            return ranks[0]
        first = ranks[0]
        return dataclasses.replace(
            first,
            var_sgd_layers=_mean_by_name([m.var_sgd_layers for m in ranks]),
            var_act_layers=_mean_by_name([m.var_act_layers for m in ranks]),
            var_weight_layers=_mean_by_name([m.var_weight_layers for m in ranks]),
            block_norms=[batch for m in ranks for batch in m.block_norms],
            row_scores={name: [s for m in ranks for s in m.row_scores[name]] for name in first.row_scores})


def _mean_by_name(values: list[dict[str, float]]) -> dict[str, float]:
    return {name: sum(v[name] for v in values) / len(values) for name in values[0]}


@dataclasses.dataclass
class CalibrationStats:
    """What one adaptive calibration step recorded.

    Attributes:
        layers: per measured layer name, one :class:`SampleRecord` per backward pass.
        scales: per measured layer, its number of weight entries over the probe size.
        row_scores: per sampled linear, the SampleW row scores of each pass.
        blocks: the block names, in plan order (some may have recorded nothing).
    """

    layers: dict[str, list[SampleRecord]]
    scales: dict[str, float]
    row_scores: dict[str, list[torch.Tensor]]
    blocks: tuple[str, ...]
    _sgd_variances: dict[str, float] | None = dataclasses.field(default=None, init=False, repr=False,
                                                                compare=False)
    _sorted_scores: dict[str, SortedScores] = dataclasses.field(default_factory=dict, init=False,
                                                                repr=False, compare=False)
    _energy: float | None = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _excess: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False)

    @property
    def samples(self) -> int:
        return max((sum(r.squared_norms.numel() for r in records) for records in self.layers.values()),
                   default=0)

    def sgd_variances(self) -> dict[str, float]:
        """Per measured layer, the unbiased within-batch estimate of the variance of the
        minibatch gradient: ``(N sum_i ||c_i||^2 - ||sum_i c_i||^2) / (N - 1)``, scaled up.
        Computed once: the records do not change, and every later update pools them again."""
        if self._sgd_variances is None:
            self._sgd_variances = {name: _within_batch_variance(records, self.scales[name])
                                   for name, records in self.layers.items()}
        return dict(self._sgd_variances)

    def energy(self) -> float:
        """``sum_l scale_l sum_i ||c_il||^2``: the calibration's scale (the pool's normaliser),
        a sum of every sample's squared contribution, steadier than its V_sgd."""
        if self._energy is None:
            self._energy = sum(self.scales[name] * sum(float(r.squared_norms.sum()) for r in records)
                               for name, records in self.layers.items()) or 1.0
        return self._energy

    def sorted_scores(self, linear: str) -> SortedScores:
        """The SampleW row scores of one linear, a row per pass, sorted once."""
        if linear not in self._sorted_scores:
            self._sorted_scores[linear] = SortedScores(list(self.row_scores.get(linear, [])))
        return self._sorted_scores[linear]

    def excess_weights(self) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        """Per pass, its sampler norms and, per block, ``sum_l scale_l ||c_il||^2`` over the
        layers below that block's sampler: the total predicted V_act is then one dot product
        per pass and block, ``sum_i (E[w_i^2] - 1) * excess_i`` (what the bisection evaluates).
        Computed once, like :meth:`sgd_variances`; callers only read it."""
        if self._excess is None:
            self._excess = self._sum_excess_weights()
        return self._excess

    def _sum_excess_weights(self) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        passes: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
        for name, records in self.layers.items():
            scale = self.scales[name]
            for record in records:
                if record.block is None:
                    continue
                _norms, sums = passes.setdefault(id(record.pass_norms), (record.pass_norms, {}))
                weighted = scale * record.squared_norms
                previous = sums.get(record.block)
                sums[record.block] = weighted if previous is None else previous + weighted
        return list(passes.values())

    def block_norms(self) -> list[list[torch.Tensor | None]]:
        """Per backward pass, per block (plan order): the per-sample norms the samplers recorded."""
        return [[norms.get(block) for block in self.blocks] for norms in self.passes()]

    def passes(self) -> list[dict[str, torch.Tensor]]:
        """The norms of every pass that recorded some, in the order first seen."""
        seen: dict[int, dict[str, torch.Tensor]] = {}
        for records in self.layers.values():
            for record in records:
                seen.setdefault(id(record.pass_norms), record.pass_norms)
        return [norms for norms in seen.values() if norms]

    @classmethod
    def merge(cls, ranks: Sequence[CalibrationStats]) -> CalibrationStats:
        """The ranks' records as passes of one step, in rank order."""
        if len(ranks) == 1:
            return ranks[0]
        first = ranks[0]
        return cls(layers={name: [r for stats in ranks for r in stats.layers[name]] for name in first.layers},
                   scales=dict(first.scales),
                   row_scores={name: [s for stats in ranks for s in stats.row_scores[name]]
                               for name in first.row_scores},
                   blocks=first.blocks)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        passes = self.passes()
        index = {id(p): i for i, p in enumerate(passes)}
        return {"passes": [dict(p) for p in passes], "scales": dict(self.scales),
                "row_scores": {k: list(v) for k, v in self.row_scores.items()}, "blocks": list(self.blocks),
                "layers": {name: [(index.get(id(r.pass_norms)), r.block, r.squared_norms, r.total)
                                  for r in records] for name, records in self.layers.items()}}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> CalibrationStats:
        passes = [dict(p) for p in state["passes"]]
        layers = {name: [SampleRecord(block, squares, total, passes[index] if index is not None else {})
                         for index, block, squares, total in records]
                  for name, records in state["layers"].items()}
        return cls(layers, dict(state["scales"]), {k: list(v) for k, v in state["row_scores"].items()},
                   tuple(state["blocks"]))


def _within_batch_variance(records: list[SampleRecord], scale: float) -> float:
    n = sum(r.squared_norms.numel() for r in records)
    if n < 2:
        return 0.0
    squares = sum(float(r.squared_norms.sum()) for r in records)
    # A tensor: n >= 2 means at least one record.
    total = float(cast(torch.Tensor, sum(r.total for r in records)).pow(2).sum())
    return scale * max(0.0, n * squares - total) / (n - 1)
