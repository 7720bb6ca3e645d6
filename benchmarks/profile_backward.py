"""Where one backward's time goes: torch.profiler tables of the exact and the vcas backward of
a ``vcas bench`` preset at one keep ratio (act = weight), after warm-up steps, on one thread.

    python3 benchmarks/profile_backward.py [RATIO] [PRESET]    (default: 0.5 minilm)

Prints, per variant, the ops by self CPU time, then the vcas backward's element-wise, copy,
gather and norm ops grouped by input shape.
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

import vcas
from vcas_lab.bench.measure import FAST, make_settings
from vcas_lab.bench.presets import PRESETS

OVERHEAD_OPS = ("aten::mul", "aten::copy_", "aten::index_select", "aten::fill_", "aten::linalg_vector_norm")


def main(ratio: float = 0.5, preset_name: str = "minilm") -> None:
    torch.set_num_threads(1)
    preset = PRESETS[preset_name]
    workload = preset.build(preset, preset.batch, preset.seq, preset.layers)
    exact, fast = make_settings(workload, [ratio], vcas.VCASConfig(seed=0), variants=(FAST,))

    def loss_of(setting):
        setting.activate()
        for parameter in setting.model.parameters():
            parameter.grad = None
        return workload.loss_fn(setting.model, workload.inputs)

    for _ in range(4):  # compact blocks verify themselves on their first uses
        loss_of(fast).backward()
        loss_of(exact).backward()
    for setting in (exact, fast):
        loss = loss_of(setting)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            loss.backward()
        print("=====", setting.label)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=45))
    events = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in OVERHEAD_OPS]
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:30]:
        print(f"{event.key:28s} {event.self_cpu_time_total / 1e3:9.1f} ms  n={event.count:4d}  "
              f"{str(event.input_shapes)[:110]}")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 0.5, sys.argv[2] if len(sys.argv) > 2 else "minilm")
