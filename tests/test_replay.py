"""Recorded runs of both controllers replay: the same ratios, the same losses and gradients up to
the rounding of another CPU's vector units (see ``tests/replay/record.py``)."""

import json
from pathlib import Path

import pytest

from replay.record import OUTPUT, RUNS, run

RECORDED = json.loads(Path(OUTPUT).read_text())
ROUNDING = dict(rel=1e-5, abs=1e-12)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_recorded_run_replays(name):
    replayed = run(name)
    assert replayed["config"] == RECORDED[name]["config"]
    assert len(replayed["steps"]) == len(RECORDED[name]["steps"])
    for step, (now, then) in enumerate(zip(replayed["steps"], RECORDED[name]["steps"])):
        where = f"{name} run, step {step}"
        assert (now["s"], now["act"], now["weight"]) == (then["s"], then["act"], then["weight"]), where
        assert now["loss"] == pytest.approx(then["loss"], **ROUNDING), where
        assert now["grads"].keys() == then["grads"].keys(), where
        for param, summary in now["grads"].items():
            assert summary == pytest.approx(then["grads"][param], **ROUNDING), f"{where}, {param}"
