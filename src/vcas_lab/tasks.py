"""Tasks: real data, a model, how its loss and its evaluation are computed, default settings.

A :class:`Task` is one of two kinds (:class:`Classification`, :class:`LanguageModeling`); the
training loop only calls ``task.kind.per_sample_loss`` and ``task.kind.evaluate``. Built-in tasks
use data and pretrained weights that ship inside registry packages (no downloads). Any local
transformers checkpoint (or a Hub name, when the Hub is reachable) trains on CSV / JSONL files or
a ``datasets`` dataset.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import data


class TaskError(ValueError):
    """A task name, file, column, label or model problem found before any training starts."""


Batch = dict[str, torch.Tensor]


class TaskKind(Protocol):
    """How a task's loss and evaluation are computed."""

    name: str
    metric: str  # the headline evaluation metric ("accuracy", "perplexity")
    higher_is_better: bool

    def per_sample_loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(losses, outputs)``: one training loss per sample (their mean is the training
        loss), and the outputs they come from (the UB baseline scores their gradient)."""

    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
        """Metrics over ``batches`` (the headline metric among them)."""


class Classification:
    """Cross-entropy on the logits of ``model(**inputs)`` (or ``model(pixel_values)``)."""

    name = "classification"
    metric = "accuracy"
    higher_is_better = True

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**inputs)
        return out.logits if hasattr(out, "logits") else out

    def per_sample_loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(model, batch)
        return F.cross_entropy(logits.float(), batch["labels"], reduction="none"), logits

    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
        correct = total = 0
        loss = 0.0
        for batch in batches:
            logits = self.logits(model, batch).float()
            loss += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            total += batch["labels"].numel()
        return {"accuracy": correct / max(1, total), "eval_loss": loss / max(1, total), "eval_items": total}


class LanguageModeling:
    """Next-token cross-entropy of a causal language model over ``input_ids`` (positions whose
    ``labels`` are -100, if given, are not predicted). A sample's loss is the mean over its
    predicted tokens; evaluation reports the perplexity over all held-out tokens."""

    name = "language-model"
    metric = "perplexity"
    higher_is_better = False

    def _token_losses(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits
        labels = batch.get("labels", batch["input_ids"])[:, 1:]
        mask = labels != -100
        if "attention_mask" in batch:
            mask &= batch["attention_mask"][:, 1:].bool()
        losses = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                 labels.clamp(min=0).reshape(-1), reduction="none").view_as(labels)
        return losses * mask, mask, logits

    def per_sample_loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        losses, mask, logits = self._token_losses(model, batch)
        return losses.sum(1) / mask.sum(1).clamp(min=1), logits

    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
        total, tokens, correct = 0.0, 0, 0
        for batch in batches:
            losses, mask, logits = self._token_losses(model, batch)
            labels = batch.get("labels", batch["input_ids"])[:, 1:]
            total += float(losses.sum())
            tokens += int(mask.sum())
            correct += int(((logits[:, :-1].argmax(-1) == labels) & mask).sum())
        mean = total / max(1, tokens)
        return {"perplexity": math.exp(min(mean, 50.0)), "eval_loss": mean,
                "token_accuracy": correct / max(1, tokens), "eval_items": tokens}


CLASSIFICATION = Classification()
LANGUAGE_MODELING = LanguageModeling()


@dataclasses.dataclass
class Task:
    """A real training task and its default settings.

    Attributes:
        name: the task's name (``--task``).
        description: one line for reports.
        train: training tensors by name (a dict batch is a slice of them).
        eval: held-out tensors, same names.
        build_model: a fresh model (the same one for every method and seed).
        kind: how the loss and the evaluation are computed.
        lr, batch_size, epochs: default hyper-parameters (AdamW).
        attach_options: keyword options of ``vcas.attach`` the task needs (e.g. ``blocks``).
    """

    name: str
    description: str
    train: Batch
    eval: Batch
    build_model: Callable[[], nn.Module]
    kind: TaskKind
    lr: float
    batch_size: int
    epochs: float
    attach_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def train_size(self) -> int:
        return next(iter(self.train.values())).shape[0]

    def limited(self, train_limit: int | None = None) -> Task:
        if train_limit is None:
            return self
        return dataclasses.replace(self, train={k: v[:train_limit] for k, v in self.train.items()})


def offline() -> None:
    """Read models from disk only (the built-in tasks never download)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# --------------------------------------------------------------------- text classification
def text_classification(name: str, model_path: str, train_texts: list[str], train_labels: list[int],
                        eval_texts: list[str], eval_labels: list[int], num_classes: int,
                        max_length: int, description: str, **defaults: Any) -> Task:
    """A sequence-classification checkpoint fine-tuned on texts (padded to ``max_length``)."""
    tokenizer = load_tokenizer(model_path)

    def encode(texts: list[str], labels: list[int]) -> Batch:
        return {**data.tokenize_texts(tokenizer, texts, max_length), "labels": torch.tensor(labels)}

    def build() -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        return _quiet(lambda: AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=num_classes, attn_implementation="eager"))

    settings = {"lr": 5e-5, "batch_size": 16, "epochs": 3.0, **defaults}
    return Task(name, description, encode(train_texts, train_labels), encode(eval_texts, eval_labels),
                build, CLASSIFICATION, **settings)


def load_tokenizer(model_path: str) -> Any:
    """The tokenizer of a local checkpoint folder or Hub name, with a clear error otherwise."""
    from transformers import AutoTokenizer

    path = Path(model_path)
    if path.exists() and not (path / "config.json").is_file():
        raise TaskError(f"--model {model_path!r} is a folder without config.json: give a transformers "
                        "checkpoint folder (as written by save_pretrained) or a Hub model name")
    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as error:
        where = "the local folder" if path.exists() else "the Hub (is it reachable? HF_HUB_OFFLINE is " \
            f"{os.environ.get('HF_HUB_OFFLINE', 'unset')})"
        raise TaskError(f"--model {model_path!r}: no tokenizer could be loaded from {where}: "
                        f"{str(error).splitlines()[0]}") from None


def _quiet(build: Callable[[], nn.Module]) -> nn.Module:
    """Build a transformers model without the new head's "newly initialized" notice."""
    from transformers import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return build()
    finally:
        hf_logging.set_verbosity(verbosity)


def bbc_minilm(max_length: int = 128) -> Task:
    offline()
    train_x, train_y, test_x, test_y, classes = data.load_bbc_news()
    return text_classification("bbc-minilm", data.minilm_path(), train_x, train_y, test_x, test_y,
                               len(classes), max_length,
                               "pretrained all-MiniLM-L6-v2 (6 x 384) fine-tuned on BBC News (5 topics)")


SMALL_CLASSES = ("business", "politics", "tech")


def bbc3_minilm_small(max_length: int = 128) -> Task:
    """Small-data fine-tuning: 600 training articles of 3 close topics (business, politics,
    tech), 4 epochs; evaluated on all held-out articles of those topics."""
    offline()
    train_x, train_y, test_x, test_y, classes = data.load_bbc_news()
    keep = [classes.index(name) for name in SMALL_CLASSES]

    def subset(texts: list[str], labels: list[int], limit: int | None) -> tuple[list[str], list[int]]:
        pairs = [(t, keep.index(y)) for t, y in zip(texts, labels) if y in keep]
        generator = torch.Generator().manual_seed(11)
        order = torch.randperm(len(pairs), generator=generator).tolist()[:limit]
        chosen = [pairs[i] for i in sorted(order)]
        return [t for t, _ in chosen], [y for _, y in chosen]

    tx, ty = subset(train_x, train_y, 600)
    ex, ey = subset(test_x, test_y, None)
    return text_classification(
        "bbc3-minilm-small", data.minilm_path(), tx, ty, ex, ey, len(keep), max_length,
        "pretrained all-MiniLM-L6-v2 fine-tuned on 600 BBC News articles of 3 topics "
        "(business, politics, tech), 4 epochs", epochs=4.0)


# --------------------------------------------------------------------- images
def mnist_vit() -> Task:
    offline()
    from transformers import ViTConfig, ViTForImageClassification

    train_x, train_y = data.load_mnist("train")
    test_x, test_y = data.load_mnist("test")
    config = ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=128,
                       num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                       num_labels=10, attn_implementation="eager")

    def normalise(x: torch.Tensor) -> torch.Tensor:
        return (x - 0.1307) / 0.3081

    return Task("mnist-vit", "ViT (4 x 128, patch 4) trained from scratch on MNIST",
                {"pixel_values": normalise(train_x), "labels": train_y},
                {"pixel_values": normalise(test_x), "labels": test_y},
                lambda: ViTForImageClassification(config), CLASSIFICATION, lr=1e-3, batch_size=64, epochs=2.0)


# --------------------------------------------------------------------- files and the Hub
def text_files(model_path: str, train_file: str, eval_file: str, text_column: str = "text",
               label_column: str = "label", max_length: int = 128) -> Task:
    """A sequence-classification checkpoint (local folder or Hub name) on CSV / JSONL files."""
    train_texts, train_raw = _read_rows(train_file, text_column, label_column)
    eval_texts, eval_raw = _read_rows(eval_file, text_column, label_column)
    return _labelled_task(model_path, train_texts, train_raw, eval_texts, eval_raw, max_length,
                          f"{model_path} on {train_file}", eval_file, train_file)


def hub_dataset(model_path: str, dataset: str, text_column: str = "text", label_column: str = "label",
                max_length: int = 128, train_split: str = "train", eval_split: str = "test") -> Task:
    """A sequence-classification checkpoint on a dataset loaded with ``datasets.load_dataset``
    (a Hub name, or a local folder or file it reads)."""
    try:
        import datasets
    except ModuleNotFoundError:
        raise TaskError("--dataset needs the datasets package: pip install datasets") from None
    try:
        loaded = datasets.load_dataset(dataset)
    except Exception as error:  # datasets raises many kinds; the message says which
        raise TaskError(f"--dataset {dataset!r} could not be loaded: {str(error).splitlines()[0]}") from None
    splits = {}
    for split in (train_split, eval_split):
        if split not in loaded:
            raise TaskError(f"--dataset {dataset!r} has no split {split!r}; it has {sorted(loaded)}")
        rows = loaded[split]
        missing = [c for c in (text_column, label_column) if c not in rows.column_names]
        if missing:
            raise TaskError(f"--dataset {dataset!r} split {split!r} has no column(s) {missing}; "
                            f"columns are {rows.column_names}. Name them with --text-column / --label-column")
        splits[split] = ([str(t) for t in rows[text_column]], [_label(v, dataset) for v in rows[label_column]])
    (tx, ty), (ex, ey) = splits[train_split], splits[eval_split]
    return _labelled_task(model_path, tx, ty, ex, ey, max_length, f"{model_path} on {dataset}",
                          f"{dataset}[{eval_split}]", f"{dataset}[{train_split}]")


def _labelled_task(model_path: str, train_texts: list[str], train_raw: list[Any], eval_texts: list[str],
                   eval_raw: list[Any], max_length: int, description: str, eval_name: str,
                   train_name: str) -> Task:
    names = sorted(set(train_raw), key=lambda v: (isinstance(v, str), v))
    unseen = sorted({str(v) for v in eval_raw} - {str(v) for v in names})
    if unseen:
        raise TaskError(f"{eval_name}: labels {unseen[:10]} do not occur in {train_name}; "
                        "every eval label must be seen in training")
    index = {name: i for i, name in enumerate(names)}
    return text_classification(f"text:{Path(model_path).name}", model_path, train_texts,
                               [index[v] for v in train_raw], eval_texts, [index[v] for v in eval_raw],
                               len(names), max_length, description)


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
    return [str(row[text_column]) for row in rows], [_label(row[label_column], path) for row in rows]


def _label(value: Any, path: str) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise TaskError(f"{path!r}: label {value!r} is not an integer or a string")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


# --------------------------------------------------------------------- the registry
def _language_tasks() -> Any:
    """:mod:`vcas_lab.tasks_lm` (it builds on this module, so it is imported when needed)."""
    from . import tasks_lm

    return tasks_lm


BUILTIN: dict[str, Callable[[int], Task]] = {
    "bbc-minilm": lambda max_length: bbc_minilm(max_length),
    "bbc3-minilm-small": lambda max_length: bbc3_minilm_small(max_length),
    "bbc-minilm-lora": lambda max_length: _language_tasks().bbc_minilm_lora(max_length),
    "bbc-lm": lambda max_length: _language_tasks().bbc_lm(max_length),
    "mnist-vit": lambda max_length: mnist_vit(),
}


def check_task_name(name: str) -> None:
    if name not in BUILTIN:
        raise TaskError(f"unknown task {name!r}; built-in tasks are {sorted(BUILTIN)} "
                        "(or use --model PATH_OR_NAME with --train FILE --eval FILE, or --dataset NAME)")


def builtin_task(name: str, max_length: int = 128) -> Task:
    """A built-in task by name; ``max_length`` applies to text tasks."""
    check_task_name(name)
    return BUILTIN[name](max_length)


def builtin_model(name: str) -> nn.Module:
    """The model of a built-in task (for ``vcas explain``), without loading its data."""
    check_task_name(name)
    return builtin_task(name, max_length=16).build_model()


def model_from_directory(path: str) -> nn.Module:
    """A transformers model from a local folder: its weights when present, else its config."""
    offline()
    from transformers import AutoConfig, AutoModel

    if not (Path(path) / "config.json").is_file():
        raise TaskError(f"{path!r} has no config.json: give a transformers checkpoint or config folder")
    config = AutoConfig.from_pretrained(path)
    try:
        return _quiet(lambda: AutoModel.from_pretrained(path))
    except OSError:  # a config without weights
        return AutoModel.from_config(config)
