"""Recorded runs of both controllers replay bit for bit (see ``tests/replay/record.py``)."""

import json
from pathlib import Path

import pytest

from replay.record import OUTPUT, RUNS, run

RECORDED = json.loads(Path(OUTPUT).read_text())


@pytest.mark.parametrize("name", sorted(RUNS))
def test_recorded_run_replays_bit_for_bit(name):
    replayed = run(name)
    assert replayed["config"] == RECORDED[name]["config"]
    for step, (now, then) in enumerate(zip(replayed["steps"], RECORDED[name]["steps"])):
        assert now == then, f"{name} run differs from the recording at step {step}"
    assert len(replayed["steps"]) == len(RECORDED[name]["steps"])
