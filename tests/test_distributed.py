"""DDP for real: 2 processes under torchrun (gloo, CPU) train with frequent calibration.

Every rank must hold bit-identical s, rho and nu after every step although each rank calibrates
on its own batches (the local statistics differ: that is checked too, so the test is not
trivially satisfied), and training must still learn. The calibration loss goes through the DDP
wrapper, the way a user writes it, to prove it neither hangs nor all-reduces.

Run as a script, this file is the worker that torchrun launches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
STEPS = 30


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(HERE), str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__).resolve()), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("controller", ["paper", "adaptive"])
def test_ratios_are_bit_identical_across_ranks(ranks, controller):
    first, second = (rank[controller] for rank in ranks)
    assert first["ratios"] == second["ratios"]
    assert len(first["ratios"]) == STEPS
    assert first["updates"] >= 5
    final = first["ratios"][-1]
    assert any(float.fromhex(r) < 1.0 for r in final["act"] + final["weight"]), "ratios never moved"
    # Each rank measured different local statistics: identity comes from the synchronisation.
    assert first["local_var_act"] != second["local_var_act"]


@pytest.mark.parametrize("controller", ["paper", "adaptive"])
def test_training_still_learns_and_replicas_stay_in_sync(ranks, controller):
    first, second = (rank[controller] for rank in ranks)
    assert first["param_checksum"] == second["param_checksum"]
    losses = [(a + b) / 2 for a, b in zip(first["losses"], second["losses"])]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert first["bp_flops_reduction"] > 0


def test_data_parallel_is_refused_with_a_pointer_to_ddp():
    import vcas
    from models import TinyTransformer

    with pytest.raises(vcas.AttachError, match="DistributedDataParallel"):
        vcas.attach(torch.nn.DataParallel(TinyTransformer()))


# --------------------------------------------------------------------------- the worker
def _batch(generator: torch.Generator, n: int = 16, t: int = 8):
    """A learnable task: the label is the most frequent residue of the tokens modulo 3."""
    tokens = torch.randint(0, 48, (n, t), generator=generator)
    labels = torch.nn.functional.one_hot(tokens % 3, 3).sum(1).argmax(1)
    return tokens, labels


def _train(controller: str, rank: int) -> dict:
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    import vcas
    import vcas.control.distributed
    import vcas.control.paper
    from models import TinyTransformer
    from vcas.control.statistics import CalibrationStats

    torch.manual_seed(0)
    ddp = DistributedDataParallel(TinyTransformer(vocab=48, dim=32, depth=3))
    # A tiny model: every linear weight-sampled, kept rows always gathered (the defaults skip both).
    ctl = vcas.attach(ddp, vcas.VCASConfig(update_every=2, controller=controller, seed=0,
                                           tau_act=0.2, tau_w=0.2, min_weight_numel=0, gather_below=1.0))
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=3e-3)
    loss_fn = lambda batch: F.cross_entropy(ddp(batch[0]), batch[1])
    train_gen = torch.Generator().manual_seed(100 + rank)
    calib_gen = torch.Generator().manual_seed(200 + rank)
    calibration_batches = iter(lambda: _batch(calib_gen), None)

    # The local statistics each rank measured, before the ranks pool them.
    local_var_act: list[str] = []
    measure, merge = vcas.control.paper.measure, vcas.control.distributed.merge

    def spy_measure(*args, **kwargs):
        measurement = measure(*args, **kwargs)
        local_var_act.append(float.hex(measurement.var_act))
        return measurement

    def spy_merge(stats):
        if isinstance(stats, CalibrationStats):
            local_var_act.append(float.hex(sum(stats.sgd_variances().values())))
        return merge(stats)

    vcas.control.paper.measure, vcas.control.distributed.merge = spy_measure, spy_merge
    losses, ratios = [], []
    try:
        for _ in range(STEPS):
            loss = loss_fn(_batch(train_gen))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            ctl.maybe_calibrate(loss_fn, calibration_batches)
            losses.append(loss.item())
            stats = ctl.stats()
            ratios.append({"s": float.hex(stats["s"]), "act": [float.hex(r) for r in stats["act_ratios"]],
                           "weight": [float.hex(r) for r in stats["weight_ratios"]]})
    finally:
        vcas.control.paper.measure, vcas.control.distributed.merge = measure, merge
    checksum = float.hex(float(sum(p.double().sum() for p in ddp.parameters())))
    stats = ctl.stats()
    return {"ratios": ratios, "losses": losses, "local_var_act": local_var_act,
            "updates": stats["updates"], "bp_flops_reduction": stats["bp_flops_reduction"],
            "param_checksum": checksum}


def _worker(out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        result = {controller: _train(controller, rank) for controller in ("paper", "adaptive")}
        (out / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
