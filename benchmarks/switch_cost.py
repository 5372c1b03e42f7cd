"""Configuration-switch cost vs one forward pass, on the SMPQ supernet of the default task.

A Shapley search evaluates thousands of configurations; switching one must cost a tiny
fraction of the forward pass that scores it. Reports medians over repeats, as ratios.

    python benchmarks/switch_cost.py            # writes benchmarks/results/switch_cost.{json,md}
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from smpq.apply import calibrate_
from smpq.cnn.data import get_splits
from smpq.cnn.models import build_model
from smpq.cnn.pipeline import calibration_batches
from smpq.cnn.supernet import Supernet
from smpq.fileio import atomic_write_text
from smpq.spec import act_spec, weight_spec

OUT = Path(__file__).parent / "results"


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model_name: str, repeats: int = 30, seed: int = 0) -> dict:
    splits = get_splits("digits")
    model = build_model(model_name, splits.input_shape, splits.num_classes, seed=seed).eval()
    bits = (2, 3, 4, 8)
    net = Supernet(model, [weight_spec(b) for b in bits], [act_spec(b) for b in bits])
    calibrate_(model, calibration_batches(splits.train, 256))
    xval = torch.stack([splits.val[i][0] for i in range(len(splits.val))])
    rng = np.random.default_rng(seed)
    masks = rng.random((repeats, net.n_players)) < 0.7

    it = iter(range(10**9))

    def switch():
        net.set_mask(masks[next(it) % repeats])

    with torch.no_grad():
        t_switch = _median_time(switch, repeats * 10)
        net.set_all_active()  # warm and cold forwards below use the same (full) configuration
        model(xval)  # warm the weight cache
        t_fwd_val = _median_time(lambda: model(xval), repeats)
        t_fwd_64 = _median_time(lambda: model(xval[:64]), repeats)

        def switch_and_forward():
            switch()
            model(xval)

        t_both = _median_time(switch_and_forward, repeats)
        net.set_all_active()
        # cold: a weight change forces every candidate's quantized weight to be recomputed
        def cold():
            for p in model.parameters():
                p.add_(0.0)  # bumps the version counter, the cache must refresh
            model(xval)

        t_cold = _median_time(cold, max(5, repeats // 3))
    return {
        "model": model_name, "players": net.n_players, "layers": len(net.layers),
        "val_images": len(xval), "switch_us": t_switch * 1e6,
        "forward_val_ms": t_fwd_val * 1e3, "forward_64_ms": t_fwd_64 * 1e3,
        "switch_plus_forward_ms": t_both * 1e3, "forward_after_weight_change_ms": t_cold * 1e3,
        "switch_over_forward_val": t_switch / t_fwd_val,
        "switch_over_forward_64": t_switch / t_fwd_64,
        "cache_speedup": t_cold / t_fwd_val,
    }


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # small models; extra threads only spin on a shared machine
    rows = [measure(m) for m in ("small_resnet", "resnet20")]
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": sys.version.split()[0]}
    atomic_write_text(OUT / "switch_cost.json", json.dumps({"meta": meta, "rows": rows}, indent=2))
    cols = ["model", "layers", "players", "switch_us", "forward_val_ms", "forward_64_ms",
            "switch_over_forward_val", "switch_over_forward_64", "cache_speedup"]
    lines = [
        "# Configuration switch cost (supernet, W{2,3,4,8} x A{2,3,4,8} per layer)", "",
        f"torch {meta['torch']}, {meta['threads']} threads; medians of repeated timings; "
        "forward = the digits validation split (360 images) or a batch of 64; "
        "forwards with every branch active.", "",
        "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
    ]
    for r in rows:
        cells = [f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "cache_speedup = forward time when every candidate's quantized weight must be "
              "recomputed (after a weight update) / forward time with the cache warm."]
    atomic_write_text(OUT / "switch_cost.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
