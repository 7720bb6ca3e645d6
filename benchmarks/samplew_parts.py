"""Median time of each part of a sampled weight gradient (SampleW) on one linear's backward.

    python3 benchmarks/samplew_parts.py [rows] [ratio] [repeats]

For weights of the sizes in the mnist-vit and MiniLM blocks, prints the dense weight-gradient
product beside each part SampleW adds (the input's row norms, which the forward takes, the
keep-probability solve, the Bernoulli draw of the kept rows, the gathers) and the product on
the kept rows. Each part is timed twice: warm (called in a loop) and cold (after a 32 MB pass
that evicts the caches, as the model's other kernels do between two layers' backward). Cold,
the small ops of SampleW cost two to three times what they cost warm on a CPU; that is why
small layers keep exact weight gradients (``VCASConfig.min_weight_numel``).
"""

import statistics
import sys
import time

import torch

from vcas.sampling import bernoulli_keep, capped_proportional_probs


def median_us(fn, before=None, repeats: int = 200) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main(rows: int, ratio: float, repeats: int) -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    flush = torch.zeros(8 * 1024 * 1024)  # 32 MB
    for fan_in, fan_out in [(128, 128), (128, 256), (256, 128), (384, 384), (384, 1536)]:
        x, g = torch.randn(rows, fan_in), torch.randn(rows, fan_out)
        scores = torch.linalg.vector_norm(g, dim=1) * torch.linalg.vector_norm(x, dim=1)
        probs = capped_proportional_probs(scores, ratio * rows)
        kept, weights = bernoulli_keep(probs, generator)
        g_kept, x_kept = g.index_select(0, kept), x.index_select(0, kept)
        parts = {
            "dense dW": lambda: g.t() @ x,
            "input norms": lambda: torch.linalg.vector_norm(x, dim=1, dtype=torch.float32),
            "probs": lambda: capped_proportional_probs(scores, ratio * rows),
            "bernoulli": lambda: bernoulli_keep(probs, generator),
            "gathers": lambda: (g.index_select(0, kept) * weights.unsqueeze(1), x.index_select(0, kept)),
            "kept dW": lambda: g_kept.t() @ x_kept,
        }
        for label, before in (("warm", None), ("cold", lambda: flush.add_(1.0))):
            times = {name: median_us(fn, before, repeats) for name, fn in parts.items()}
            total = sum(t for name, t in times.items() if name != "dense dW")
            print(f"{fan_in:4d} x {fan_out:4d}, {rows} rows, nu {ratio}, {label}: "
                  + ", ".join(f"{name} {t:.0f}" for name, t in times.items())
                  + f" us; SampleW total {total:.0f} us vs dense {times['dense dW']:.0f} us")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3200, float(sys.argv[2]) if len(sys.argv) > 2 else 0.2,
         int(sys.argv[3]) if len(sys.argv) > 3 else 200)
