"""Sharded training: FSDP2 for real (2 gloo CPU ranks under torchrun), FSDP1 and DeepSpeed refused.

FSDP2 (``fully_shard`` on every block of a tiny Llama and on the root, vcas attached after
``init_process_group``):

- the adaptive controller's ratios are bit-identical on both ranks over several calibrations,
  although each rank records different local statistics;
- with every keep decision at its expectation, the full gradient (gathered across the shards)
  equals the unsharded model's exact gradient on the same global batch (a 5 % over-weighting
  does not), and blocks recompute compactly with sharded parameters;
- the controller's state_dict saved mid-run and loaded into a fresh model, optimizer and
  controller resumes the run bit for bit;
- calibration measures the full gradient, not a shard's: the measured weights and their probes
  have the global shapes, and V_sgd equals that of an unsharded run on the same data (whose loss
  is the sum of the ranks' losses, so that each sample contributes as on its rank; V_act
  differs, rightly: each rank samples within its own batch).

The paper's controller is refused with FSDP2; FSDP1 and DeepSpeed are refused wherever they
appear (a real ``FullyShardedDataParallel`` on a 1-rank gloo group, DeepSpeed stand-ins).

Run as a script, this file is the worker that torchrun launches.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
V, N, T = 64, 4, 12  # N samples per rank; the global batch holds 2 * N
RANKS = 2
STEPS = 8
FSDP_CONFIG = dict(seed=0, min_weight_numel=0, update_every=2, tau_act=2.0, tau_w=2.0)


def _llama() -> nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   use_cache=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _global_batch(step: int) -> torch.Tensor:
    """The tokens of both ranks at a step: rank r trains on rows [r N, (r + 1) N)."""
    return torch.randint(0, V, (RANKS * N, T), generator=torch.Generator().manual_seed(1000 + step))


def _rank_losses(model: nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Per rank's rows, the mean next-token loss (what each rank's ``model(...).loss`` is)."""
    logits = model(input_ids=tokens).logits.float()
    losses = []
    for rank in range(RANKS):
        rows = slice(rank * N, (rank + 1) * N)
        losses.append(nn.functional.cross_entropy(logits[rows, :-1].reshape(-1, V), tokens[rows, 1:].reshape(-1)))
    return losses


# --------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [str(HERE), str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS),
               str(Path(__file__).resolve()), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(RANKS)]
    return reports, torch.load(out / "gradients.pt")


def test_adaptive_ratios_are_bit_identical_across_ranks(ranks):
    first, second = (report["adaptive"] for report in ranks[0])
    assert first["ratios"] == second["ratios"] and len(first["ratios"]) == STEPS
    assert first["updates"] >= 3
    assert any(float.fromhex(r) < 1.0 for step in first["ratios"] for r in step["act"] + step["weight"])
    # Each rank recorded different statistics: identity comes from merging them.
    assert first["local_var_sgd"] != second["local_var_sgd"]
    assert first["param_checksum"] == second["param_checksum"]


def test_expected_gradient_equals_the_unsharded_exact_gradient(ranks):
    _, gradients = ranks
    model = _llama()
    tokens = _global_batch(0)
    params = dict(model.named_parameters())
    exact = torch.autograd.grad(sum(_rank_losses(model, tokens)) / RANKS, list(params.values()))
    exact = dict(zip(params, exact))
    scale = max(float(g.norm()) for g in exact.values())

    def error(got: dict[str, torch.Tensor]) -> float:
        assert set(got) == set(exact)
        return max(float((got[name] - exact[name]).norm()) / max(float(exact[name].norm()), 1e-3 * scale)
                   for name in exact)

    for passes in gradients["expected"]:
        assert error(passes) < 1e-4
    assert error(gradients["over_weighted"]) > 1e-2  # negative control: keeps scaled by 1.05


def test_blocks_recompute_compactly_with_sharded_parameters(ranks):
    for report in ranks[0]:
        compact = report["compact"]
        assert set(compact["status"].values()) == {"compact"} and compact["compact_backwards"] > 0
        assert all(torch.isfinite(torch.tensor(compact["losses"])))


def test_controller_state_dict_resumes_the_run_bit_for_bit(ranks):
    for report in ranks[0]:
        resumed, uninterrupted = report["resumed"], report["adaptive"]
        assert resumed["ratios"] == uninterrupted["ratios"]
        assert resumed["losses"] == uninterrupted["losses"]
        assert resumed["param_checksum"] == uninterrupted["param_checksum"]


def test_calibration_measures_the_full_gradient(ranks):
    import vcas

    model = _llama()
    ctl = vcas.attach(model, vcas.VCASConfig(**FSDP_CONFIG))
    shapes = {name: list(p.shape) for name, p in ctl.measured_parameters.items()}
    # The sketches of the first calibration (drawn at attach, where it starts recording).
    probes = {name: [probe.dim, probe.matrix.tolist()] for name, probe in ctl.mechanism.runtime.recorder.probes.items()}
    sum(_rank_losses(model, _global_batch(0))).backward()  # per-sample contributions as each rank's
    ctl.maybe_calibrate()
    reference = ctl.history[0]
    for report in ranks[0]:
        sharded = report["adaptive"]
        assert sharded["measured_shapes"] == shapes and sharded["probes"] == probes
        assert sharded["local_shapes"] != shapes  # control: the ranks hold shards of those weights
        assert sharded["first_var_sgd"] == pytest.approx(reference["var_sgd"], rel=1e-5)


# --------------------------------------------------------------------------- refusals, one rank
@pytest.fixture
def one_rank():
    """A 1-rank gloo process group in this process, destroyed afterwards."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _tiny():
    from models import TinyTransformer

    torch.manual_seed(0)
    return TinyTransformer(depth=2)


def test_the_paper_controller_is_refused_with_fsdp2(one_rank):
    from torch.distributed.fsdp import fully_shard

    import vcas

    model = _tiny()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    with pytest.raises(vcas.AttachError, match="controller='adaptive'"):
        vcas.attach(model, vcas.VCASConfig(controller="paper"))
    ctl = vcas.attach(model, vcas.VCASConfig(controller="auto"))  # auto chooses the adaptive one
    assert ctl.config.controller == "adaptive"
    ctl.detach()


def _fsdp1(module: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(module, device_id=torch.device("cpu"))


class _Holder(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner


def _blocks_wrapped() -> nn.Module:
    model = _tiny()
    model.blocks[0] = _fsdp1(model.blocks[0])
    return model


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
@pytest.mark.parametrize("case", ["outer", "inside", "block"])
def test_fsdp1_is_refused_wherever_it_appears(one_rank, case):
    import vcas

    build = {"outer": lambda: _fsdp1(_tiny()), "inside": lambda: _Holder(_fsdp1(_tiny())),
             "block": _blocks_wrapped}[case]
    where = {"outer": "the model uses", "inside": "the model (inner) uses", "block": "the model (blocks.0) uses"}
    model = build()
    for action in (vcas.attach, vcas.explain):
        with pytest.raises(vcas.AttachError, match=r"FSDP1 \(FullyShardedDataParallel\)") as error:
            action(model)
        assert where[case] in str(error.value) and "fully_shard" in str(error.value)
    assert not any("forward" in m.__dict__ for m in model.modules())  # nothing was installed


class DeepSpeedEngine(nn.Module):
    """Stands in for DeepSpeed's engine (the check looks at the class's module)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


DeepSpeedEngine.__module__ = "deepspeed.runtime.engine"


def _zero3_partitioned() -> nn.Module:
    model = _tiny()
    model.blocks[1].attn.qkv.weight.ds_id = 7  # how ZeRO-3 marks a partitioned parameter
    return model


@pytest.mark.parametrize("build, where", [
    (lambda: DeepSpeedEngine(_tiny()), "the model uses DeepSpeed"),
    (lambda: _Holder(DeepSpeedEngine(_tiny())), "the model (inner) uses DeepSpeed"),
    (_zero3_partitioned, "parameter blocks.1.attn.qkv.weight, ZeRO-3 partitioned"),
], ids=["outer", "inside", "zero3-parameter"])
def test_deepspeed_is_refused_wherever_it_appears(build, where):
    import vcas

    model = build()
    for action in (vcas.attach, vcas.explain):
        with pytest.raises(vcas.AttachError, match="DeepSpeed") as error:
            action(model)
        assert where in str(error.value) and "DistributedDataParallel or FSDP2" in str(error.value)
    # Control: the same model without DeepSpeed's marks attaches.
    vcas.attach(_tiny()).detach()


# --------------------------------------------------------------------------- the worker
def _sharded_llama() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _llama()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _checksum(model: nn.Module) -> str:
    return float.hex(float(sum(p.full_tensor().double().sum() for p in model.parameters())))


def _ratios(ctl) -> dict:
    stats = ctl.stats()
    return {"s": float.hex(stats["s"]), "act": [float.hex(r) for r in stats["act_ratios"]],
            "weight": [float.hex(r) for r in stats["weight_ratios"]]}


def _local_tokens(step: int, rank: int) -> torch.Tensor:
    return _global_batch(step)[rank * N:(rank + 1) * N]


def _train(model, optimizer, ctl, rank: int, steps: range, log: dict) -> None:
    for step in steps:
        tokens = _local_tokens(step, rank)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        log["losses"].append(float.hex(float(loss.detach())))
        log["ratios"].append(_ratios(ctl))


def _adaptive(rank: int) -> dict:
    import vcas
    import vcas.control.distributed
    from vcas.control.statistics import CalibrationStats

    model = _sharded_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctl = vcas.attach(model, vcas.VCASConfig(**FSDP_CONFIG), optimizer=optimizer)
    first_sketches = {name: [probe.dim, probe.matrix.tolist()]
                      for name, probe in ctl.mechanism.runtime.recorder.probes.items()}
    log: dict = {"losses": [], "ratios": [], "local_var_sgd": []}
    merge = vcas.control.distributed.merge

    def spy_merge(stats):
        if isinstance(stats, CalibrationStats):
            log["local_var_sgd"].append(float.hex(sum(stats.sgd_variances().values())))
        return merge(stats)

    vcas.control.distributed.merge = spy_merge
    try:
        _train(model, optimizer, ctl, rank, range(STEPS), log)
    finally:
        vcas.control.distributed.merge = merge
    return {**log, "updates": ctl.stats()["updates"], "param_checksum": _checksum(model),
            "first_var_sgd": ctl.history[0]["var_sgd"],
            "measured_shapes": {name: list(p.shape) for name, p in ctl.measured_parameters.items()},
            "local_shapes": {name: list(p.to_local().shape) for name, p in ctl.measured_parameters.items()},
            "probes": first_sketches}


def _resumed(rank: int) -> dict:
    """The run of :func:`_adaptive`, saved after half of its steps and resumed in fresh objects."""
    import vcas

    half = STEPS // 2
    model = _sharded_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctl = vcas.attach(model, vcas.VCASConfig(**FSDP_CONFIG), optimizer=optimizer)
    log: dict = {"losses": [], "ratios": []}
    _train(model, optimizer, ctl, rank, range(half), log)
    buffer = io.BytesIO()
    torch.save({"controller": ctl.state_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict()},
               buffer)
    ctl.detach()
    del model, optimizer, ctl
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model = _sharded_llama()
    model.load_state_dict(saved["model"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer.load_state_dict(saved["optimizer"])
    ctl = vcas.attach(model, vcas.VCASConfig(**FSDP_CONFIG), optimizer=optimizer)
    ctl.load_state_dict(saved["controller"])
    _train(model, optimizer, ctl, rank, range(half, STEPS), log)
    return {**log, "param_checksum": _checksum(model)}


def _expected_gradients(rank: int) -> dict:
    """Full gradients with every keep decision at its expectation (and a 5 % over-weighting)."""
    import vcas
    from stats import ScaledDraws
    from vcas.runtime.rng import ExpectedDraws

    model = _sharded_llama()
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, min_weight_numel=0))
    ctl.set_ratios(act=0.5, weight=0.5)
    runtime = ctl.mechanism.runtime
    tokens = _local_tokens(0, rank)

    def full_gradient(draws) -> dict[str, torch.Tensor]:
        runtime.draws = draws
        model(input_ids=tokens, labels=tokens).loss.backward()
        grads = {name: p.grad.full_tensor().clone() for name, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return grads

    expected = [full_gradient(ExpectedDraws()) for _ in range(3)]
    return {"expected": expected, "over_weighted": full_gradient(ScaledDraws(1.05))}


def _compact(rank: int) -> dict:
    import vcas

    model = _sharded_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, min_weight_numel=0), optimizer=optimizer)
    ctl.set_ratios(act=0.25, weight=0.5)
    log: dict = {"losses": [], "ratios": []}
    _train(model, optimizer, ctl, rank, range(6), log)
    return {"status": ctl.compact_status(), "compact_backwards": ctl.stats()["compact_backwards"],
            "losses": [float.fromhex(loss) for loss in log["losses"]]}


def _worker(out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        report = {"adaptive": _adaptive(rank), "resumed": _resumed(rank), "compact": _compact(rank)}
        gradients = _expected_gradients(rank)
        (out / f"rank{rank}.json").write_text(json.dumps(report))
        if rank == 0:
            torch.save(gradients, out / "gradients.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
