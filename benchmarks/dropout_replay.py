"""What recording and replaying a dropout mask costs on this machine: PyTorch's fused kernel with
its boolean mask against the scaled float noise compact recompute records on a CPU, and plain
``F.dropout`` as the reference, on a MiniLM block's two dropout shapes (batch 32, 128 tokens).

Each round times every variant once, in an order that rotates from round to round (interleaved);
the table gives medians over the rounds, per call, of: the recording forward (output and mask),
and the replay on 17 of the 32 samples with its backward (what a compact backward at keep ratio
about 0.5 runs).

    python3 benchmarks/dropout_replay.py [ROUNDS]    (default 30)
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = {"attention probabilities": (32, 12, 128, 128), "hidden states": (32, 128, 384)}
P = 0.1
KEPT = torch.arange(17) * 31 // 16  # 17 of the 32 samples, spread over the batch


def fused_record(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.native_dropout(x, P, True)


def noise_record(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    noise = torch.empty_like(x).bernoulli_(1 - P).div_(1 - P)
    return x * noise, noise


def plain_record(x: torch.Tensor) -> tuple[torch.Tensor, None]:
    return F.dropout(x, P, training=True), None


def fused_replay(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.native_dropout_backward(x, mask, 1 / (1 - P))


def noise_replay(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x * mask


def replay_with_backward(replay, x: torch.Tensor, mask: torch.Tensor) -> None:
    leaf = x.index_select(0, KEPT).requires_grad_()
    out = replay(leaf, mask.index_select(0, KEPT))
    out.backward(torch.ones_like(out))


def _variants(x: torch.Tensor) -> dict[str, Callable[[], object]]:
    _, bool_mask = fused_record(x)
    _, float_mask = noise_record(x)
    return {
        "plain": lambda: plain_record(x),
        "fused record": lambda: fused_record(x),
        "noise record": lambda: noise_record(x),
        "fused replay": lambda: replay_with_backward(fused_replay, x, bool_mask),
        "noise replay": lambda: replay_with_backward(noise_replay, x, float_mask),
    }


def main(rounds: int = 30) -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians over {rounds} "
          f"interleaved rounds, ms per call")
    print("| tensor | F.dropout forward | fused record | noise record | fused replay + backward | "
          "noise replay + backward |")
    print("|---|---|---|---|---|---|")
    for label, shape in SHAPES.items():
        variants = _variants(torch.randn(shape))
        names = list(variants)
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(rounds + 2):
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            for name in order:
                start = time.perf_counter()
                variants[name]()
                if round_index >= 2:  # two warm-up rounds
                    times[name].append(time.perf_counter() - start)
        medians = [1e3 * statistics.median(times[name]) for name in names]
        print(f"| {label} {tuple(shape)} | " + " | ".join(f"{m:.1f}" for m in medians) + " |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
