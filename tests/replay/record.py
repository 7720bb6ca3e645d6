"""Record (or replay) short training runs of both controllers: every step's loss, each
parameter's gradient (its norm and its sum), and the ratios after every step.

The test ``tests/test_replay.py`` replays the runs recorded in ``runs.json``: the ratios must be
identical, the losses and gradients equal to a relative 1e-5 (CPUs with other vector units round
the same products differently in the last bits), so a change of structure cannot silently change
what training computes. Rewrite the recording only for an intended change of behaviour, in the
commit that makes it.

    python3 tests/replay/record.py            # rewrite runs.json (only for an intended change)
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vcas
from models import TinyTransformer, token_batch

RUNS = {
    "adaptive": dict(controller="adaptive", update_every=4, min_weight_numel=0, recompute_below=0.0,
                     seed=3),
    "paper": dict(controller="paper", update_every=3, min_weight_numel=0, recompute_below=0.0,
                  seed=5, s_step=0.05),
}
STEPS = 24
OUTPUT = Path(__file__).with_name("runs.json")


def gradient_summary(model: torch.nn.Module) -> dict[str, list[float]]:
    """Each parameter's gradient as ``[norm, sum]`` (in float64): a changed computation moves
    them far beyond rounding."""
    return {name: [float(param.grad.double().norm()), float(param.grad.double().sum())]
            for name, param in model.named_parameters() if param.grad is not None}


def run(name: str) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = TinyTransformer(dim=16, depth=3, dropout=0.1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        ctl = vcas.attach(model, vcas.VCASConfig(**RUNS[name]))

        def loss_fn(batch):
            return F.cross_entropy(model(batch[0]), batch[1])

        calibration = (token_batch(n=12, seed=1000 + i) for i in itertools.count())
        steps = []
        for step in range(STEPS):
            loss = loss_fn(token_batch(n=12, seed=step))
            loss.backward()
            steps.append({"loss": float(loss.detach()), "grads": gradient_summary(model)})
            optimizer.step()
            optimizer.zero_grad()
            ctl.maybe_calibrate(loss_fn, calibration)
            stats = ctl.stats()
            steps[-1].update(s=stats["s"], act=stats["act_ratios"], weight=stats["weight_ratios"])
        ctl.detach()
        return {"config": RUNS[name], "steps": steps}
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    OUTPUT.write_text(json.dumps({name: run(name) for name in RUNS}, indent=1) + "\n")
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
