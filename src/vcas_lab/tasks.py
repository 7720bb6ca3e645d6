"""Built-in real tasks (no downloads) and the general text-classification path.

A task holds tokenised or image tensors (dicts with a ``labels`` entry), a model builder and the
hyper-parameters the task is run with by default.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import data


class TaskError(ValueError):
    """A task name, file, column or label problem found before any training starts."""


@dataclasses.dataclass
class Task:
    name: str
    train: dict[str, torch.Tensor]
    eval: dict[str, torch.Tensor]
    num_classes: int
    build_model: Callable[[], nn.Module]
    logits: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    lr: float
    batch_size: int
    epochs: float
    description: str


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _text_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits


def _image_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(batch["pixel_values"])
    return out.logits if hasattr(out, "logits") else out


def _limit(tensors: dict[str, torch.Tensor], limit: int | None) -> dict[str, torch.Tensor]:
    return tensors if limit is None else {k: v[:limit] for k, v in tensors.items()}


def _text_task(name: str, model_path: str, train_texts: list[str], train_labels: list[int],
               eval_texts: list[str], eval_labels: list[int], num_classes: int, max_length: int,
               description: str) -> Task:
    _offline()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def encode(texts: list[str], labels: list[int]) -> dict[str, torch.Tensor]:
        return {**data.tokenize_texts(tokenizer, texts, max_length), "labels": torch.tensor(labels)}

    def build() -> nn.Module:
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the new classifier head's "newly initialized" notice
        try:
            return AutoModelForSequenceClassification.from_pretrained(
                model_path, num_labels=num_classes, attn_implementation="eager")
        finally:
            hf_logging.set_verbosity(verbosity)

    return Task(name, encode(train_texts, train_labels), encode(eval_texts, eval_labels), num_classes,
                build, _text_logits, lr=5e-5, batch_size=16, epochs=3, description=description)


def bbc_minilm(max_length: int = 128) -> Task:
    train_x, train_y, test_x, test_y, classes = data.load_bbc_news()
    return _text_task("bbc-minilm", data.minilm_path(), train_x, train_y, test_x, test_y,
                      len(classes), max_length,
                      "pretrained all-MiniLM-L6-v2 (6 x 384) fine-tuned on BBC News (5 topics)")


def mnist_vit() -> Task:
    _offline()
    from transformers import ViTConfig, ViTForImageClassification

    train_x, train_y = data.load_mnist("train")
    test_x, test_y = data.load_mnist("test")
    config = ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=128,
                       num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                       num_labels=10, attn_implementation="eager")
    normalise = lambda x: (x - 0.1307) / 0.3081  # noqa: E731
    return Task("mnist-vit", {"pixel_values": normalise(train_x), "labels": train_y},
                {"pixel_values": normalise(test_x), "labels": test_y}, 10,
                lambda: ViTForImageClassification(config), _image_logits, lr=1e-3, batch_size=64,
                epochs=2, description="ViT (4 x 128, patch 4) trained from scratch on MNIST")


def text_files(model_path: str, train_file: str, eval_file: str, text_column: str = "text",
               label_column: str = "label", max_length: int = 128) -> Task:
    """Any local sequence-classification checkpoint on CSV / JSONL files with text and labels."""
    if not Path(model_path).exists():
        raise TaskError(f"--model {model_path!r} does not exist: give a local transformers checkpoint folder")
    train_texts, train_raw = _read_rows(train_file, text_column, label_column)
    eval_texts, eval_raw = _read_rows(eval_file, text_column, label_column)
    names = sorted(set(train_raw), key=lambda v: (isinstance(v, str), v))
    unseen = sorted({str(v) for v in eval_raw} - {str(v) for v in names})
    if unseen:
        raise TaskError(f"{eval_file}: labels {unseen[:10]} do not occur in {train_file}; "
                        "every eval label must be seen in training")
    index = {name: i for i, name in enumerate(names)}
    return _text_task(f"text:{Path(model_path).name}", model_path, train_texts,
                      [index[v] for v in train_raw], eval_texts, [index[v] for v in eval_raw],
                      len(names), max_length, f"{model_path} on {train_file}")


def _read_rows(path: str, text_column: str, label_column: str) -> tuple[list[str], list[Any]]:
    file = Path(path)
    if not file.is_file():
        raise TaskError(f"{path!r} does not exist or is not a file")
    if file.suffix.lower() == ".csv":
        with file.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    elif file.suffix.lower() in (".jsonl", ".json"):
        with file.open(encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    else:
        raise TaskError(f"{path!r}: use a .csv or .jsonl file")
    if not rows:
        raise TaskError(f"{path!r} has no rows")
    missing = [c for c in (text_column, label_column) if c not in rows[0]]
    if missing:
        raise TaskError(f"{path!r} has no column(s) {missing}; columns are {sorted(rows[0])}. "
                        "Name them with --text-column / --label-column")
    texts = [str(row[text_column]) for row in rows]
    labels = [_label(row[label_column], path) for row in rows]
    return texts, labels


def _label(value: Any, path: str) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise TaskError(f"{path!r}: label {value!r} is not an integer or a string")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


BUILTIN: dict[str, Callable[[int], Task]] = {
    "bbc-minilm": lambda max_length: bbc_minilm(max_length),
    "mnist-vit": lambda max_length: mnist_vit(),
}


def check_task_name(name: str) -> None:
    if name not in BUILTIN:
        raise TaskError(f"unknown task {name!r}; built-in tasks are {sorted(BUILTIN)} "
                        "(or use --model PATH --train FILE --eval FILE)")


def builtin_task(name: str, max_length: int = 128) -> Task:
    """A built-in task by name; ``max_length`` applies to text tasks."""
    check_task_name(name)
    return BUILTIN[name](max_length)
