"""vcas.explain and the include/exclude filters: what is sampled, what stays exact and why."""

import doctest
import importlib
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vcas
from models import TinyCNN, TinyTransformer, token_batch


class ScaledLinear(nn.Linear):
    """A subclass of nn.Linear with its own forward: vcas cannot know what it computes."""

    def forward(self, x):
        return 2.0 * super().forward(x)


class LayerScale(nn.Module):
    """A module with its own parameter and an unknown type."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.gamma * x


class MixedBlock(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.scaled = ScaledLinear(dim, dim)
        self.scale = LayerScale(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.up = nn.ConvTranspose1d(dim, dim, 1)
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x):
        y = self.scaled(self.fc(x)) + self.attn(x, x, x, need_weights=False)[0]
        y = self.bn(self.up(y.transpose(1, 2))).transpose(1, 2)
        return x + self.scale(y)


class MixedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.blocks = nn.ModuleList([MixedBlock() for _ in range(2)])
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


def _reasons(report):
    return {r.name: r.detail for r in report.exact}


def test_explain_lists_blocks_sampled_layers_and_the_reason_each_other_layer_stays_exact():
    report = vcas.explain(MixedModel())
    assert [b.name for b in report.blocks] == ["blocks.0", "blocks.1"]
    assert [r.name for r in report.sampled] == ["blocks.0.fc", "blocks.1.fc"]
    reasons = _reasons(report)
    assert reasons["embed"] == "outside the blocks"
    assert reasons["head"].startswith("outside the blocks; opt in with include=")
    assert "subclass of nn.Linear" in reasons["blocks.0.scaled"]
    assert "unsupported type LayerScale" in reasons["blocks.0.scale"]
    assert "nn.MultiheadAttention" in reasons["blocks.0.attn"]
    assert "unsupported type ConvTranspose1d" in reasons["blocks.1.up"]
    assert "mix samples" in reasons["blocks.0.bn"]
    assert [r.name for r in report.mixing] == ["blocks.0.bn", "blocks.1.bn"]
    text = str(report)
    assert "sampled layers" in text and "exact layers" in text and "blocks.1.scaled" in text
    assert "\n" not in report.summary()


def test_explain_does_not_modify_the_model():
    model = TinyCNN()
    before = [(name, sorted(m.__dict__), len(m._forward_hooks)) for name, m in model.named_modules()]
    vcas.explain(model)
    assert [(name, sorted(m.__dict__), len(m._forward_hooks)) for name, m in model.named_modules()] == before


def test_include_opts_in_layers_outside_the_blocks_and_exclude_leaves_layers_exact():
    model = TinyTransformer(depth=2)
    report = vcas.explain(model, include="head", exclude=["blocks.*.attn.*"])
    sampled = [r.name for r in report.sampled]
    assert "head" in sampled and not any(".attn." in name for name in sampled)
    assert _reasons(report)["blocks.0.attn.qkv"] == "excluded by exclude="
    ctl = vcas.attach(model, include="head", exclude=["blocks.*.attn.*"])
    assert ctl.linear_names == sampled
    assert "forward" in model.head.__dict__ and "forward" not in model.blocks[0].attn.qkv.__dict__
    ctl.set_ratios(act=0.5, weight=0.5)
    tokens, labels = token_batch()
    F.cross_entropy(model(tokens), labels).backward()
    ctl.detach()
    assert "forward" not in model.head.__dict__


def test_a_predicate_filter_and_excluding_whole_blocks():
    model = TinyTransformer(depth=3)
    report = vcas.explain(model, exclude=lambda module, name: name == "blocks.0")
    assert [b.name for b in report.blocks] == ["blocks.1", "blocks.2"]
    assert not any(r.name.startswith("blocks.0.") for r in report.sampled)
    only_mlp = vcas.explain(model, exclude=lambda module, name: isinstance(module, nn.Linear) and "mlp" not in name)
    assert {r.name.split(".")[2] for r in only_mlp.sampled} == {"mlp"}


def test_filters_that_match_nothing_or_everything_are_refused_with_the_fix():
    model = TinyTransformer(depth=2)
    with pytest.raises(vcas.ConfigError, match="match no module"):
        vcas.explain(model, include=["classifier"])
    with pytest.raises(ValueError, match="not understood"):  # ConfigError is a ValueError
        vcas.attach(model, exclude=3)
    with pytest.raises(vcas.BlockDetectionError, match="excludes every block"):
        vcas.attach(model, exclude="blocks")
    assert "forward" not in model.blocks[0].mlp[0].__dict__  # nothing was installed


def test_layers_another_library_patched_stay_exact_and_are_listed():
    model = TinyTransformer(depth=2)
    patched = model.blocks[0].mlp[0]
    patched.forward = lambda x: nn.Linear.forward(patched, x)
    ctl = vcas.attach(model)
    assert "blocks.0.mlp.0" not in ctl.linear_names and patched.__dict__["forward"] is not None
    assert "instance-level forward" in _reasons(vcas.explain(model))["blocks.0.mlp.0"]
    ctl.detach()
    assert "forward" in patched.__dict__  # not vcas's to remove


def test_attach_logs_a_one_line_summary(caplog):
    with caplog.at_level(logging.INFO, logger="vcas"):
        vcas.attach(TinyCNN())
    (record,) = [r for r in caplog.records if r.name.startswith("vcas")]
    message = record.getMessage()
    assert "\n" not in message and "3 blocks (ConvBlock)" in message and "BatchNorm2d" in message
    assert "controller 'paper' (auto: BatchNorm in training mode (blocks.0.bn))" in message


def test_explain_docstring_example_runs():
    module = importlib.import_module("vcas.plan.explain")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
