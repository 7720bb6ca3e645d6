"""Median time of each part of a sampled weight gradient (SampleW) on one linear's backward.

    python3 benchmarks/samplew_parts.py [rows] [ratio]

For weights of the sizes in the mnist-vit and MiniLM blocks, prints the dense weight-gradient
product beside each part SampleW adds (row norms, the keep-probability solve, Bernoulli draws,
the kept indices, gathers) and the product on the kept rows. Why small layers keep exact weight
gradients (``VCASConfig.min_weight_numel``): the added parts cost about as much as they save.
"""

import statistics
import sys
import time

import torch

from vcas.sampling import bernoulli_weights, capped_proportional_probs


def median_us(fn, repeats: int = 200) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main(rows: int, ratio: float) -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    for fan_in, fan_out in [(128, 128), (128, 256), (256, 128), (384, 384), (384, 1536)]:
        x, g = torch.randn(rows, fan_in), torch.randn(rows, fan_out)
        scores = torch.linalg.vector_norm(g, dim=1) * torch.linalg.vector_norm(x, dim=1)
        probs = capped_proportional_probs(scores, ratio * rows)
        weights = bernoulli_weights(probs, generator)
        kept = torch.nonzero(weights).squeeze(1)
        g_kept, x_kept = g.index_select(0, kept), x.index_select(0, kept)
        parts = {
            "dense dW": lambda: g.t() @ x,
            "input norms": lambda: torch.linalg.vector_norm(x, dim=1, dtype=torch.float32),
            "probs": lambda: capped_proportional_probs(scores, ratio * rows),
            "bernoulli": lambda: bernoulli_weights(probs, generator),
            "nonzero": lambda: torch.nonzero(weights).squeeze(1),
            "gathers": lambda: (g.index_select(0, kept) * weights.index_select(0, kept).unsqueeze(1),
                                x.index_select(0, kept)),
            "kept dW": lambda: g_kept.t() @ x_kept,
        }
        times = {name: median_us(fn) for name, fn in parts.items()}
        added = sum(t for name, t in times.items() if name not in ("dense dW", "kept dW"))
        print(f"{fan_in:4d} x {fan_out:4d}, {rows} rows, nu {ratio}: "
              + ", ".join(f"{name} {t:.0f}" for name, t in times.items())
              + f" us; SampleW total {added + times['kept dW']:.0f} us vs dense {times['dense dW']:.0f} us")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3200, float(sys.argv[2]) if len(sys.argv) > 2 else 0.2)
