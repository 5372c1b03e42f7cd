"""Other tools' allocators, run on a session's model and calibration text for comparison.

Only the allocation is taken from a peer: its per-layer formats are mapped back to the
session's candidates and re-quantized with the session's own backend, so a comparison
differs in the allocation alone.

| peer       | package                                                | what runs             |
|------------|--------------------------------------------------------|-----------------------|
| autoscheme | `auto-round==0.16.1` (`--no-deps`) + accelerate,       | Intel AutoRound's     |
|            | datasets, py-cpuinfo                                   | AutoScheme, `iters=0` |

AutoScheme scores each option per layer with its delta-loss estimate (gradients on the
calibration text) and solves its own knapsack on average bits. It reads text, not tokens: the
session's calibration blocks are decoded into a JSONL file it loads as a local dataset
(`nsamples` blocks of `seqlen` tokens). It runs on a deep copy of the model (it frees
weights as it goes), offline, and with HOME and XDG_CACHE_HOME pointed at a fresh temporary
folder for the call, so its per-scheme score cache (~/.cache/auto_round) starts empty (its
wall time is a cold run, like ours) and the user's own cache is never read, changed or deleted.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from smpq.errors import SmpqError
from smpq.spec import Granularity, QuantSpec

__all__ = ["AUTOSCHEME_INSTALL", "PEER_METHODS", "autoscheme_allocation", "autoscheme_options",
           "autoscheme_strategy", "check_autoscheme", "private_home"]

PEER_METHODS = ("autoscheme",)  # `smpq ptq --method` names run by `autoscheme_strategy`
_HOME_VARS = ("HOME", "XDG_CACHE_HOME")

AUTOSCHEME_INSTALL = ("pip install --no-deps auto-round==0.16.1 && "
                      "pip install accelerate datasets py-cpuinfo")


def autoscheme_options(specs: tuple[QuantSpec, ...]) -> list[tuple[int, int, bool]]:
    """(bits, group size, symmetric) per candidate; AutoScheme takes integer group formats."""
    out = []
    for s in specs:
        if s.fmt != "int" or s.granularity is not Granularity.GROUP:
            raise SmpqError(f"AutoScheme takes integer group formats, not {s.label}")
        out.append((s.bits, int(s.group_size), s.symmetric))
    if len({b for b, _, _ in out}) != len(out):
        raise SmpqError("AutoScheme needs candidates with distinct bit widths")
    return out


@contextlib.contextmanager
def private_home(folder: Path) -> Iterator[None]:
    """HOME and XDG_CACHE_HOME set to `folder` (so ~/.cache is folder/.cache) for the block,
    restored after: a peer's caches stay out of the user's own."""
    saved = {k: os.environ.get(k) for k in _HOME_VARS}
    (folder / ".cache").mkdir(parents=True, exist_ok=True)
    os.environ["HOME"] = str(folder)
    os.environ["XDG_CACHE_HOME"] = str(folder / ".cache")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def autoscheme_allocation(session: Any, avg_bits: list[float], *, batch_size: int = 8
                          ) -> tuple[dict[float, dict[str, str]], dict]:
    """({target: {layer: candidate key}}, cost) of AutoScheme at each `avg_bits` target
    (weights only, no scale overhead, as smpq's avg_bits) on the session's calibration
    blocks. Its scores are computed once for all targets, so `cost` covers them all."""
    try:
        from auto_round import AutoRound, AutoScheme
        from auto_round.schemes import QuantizationScheme
    except ImportError as e:
        raise SmpqError(f"AutoScheme needs auto-round ({AUTOSCHEME_INSTALL}): {e}") from None
    from smpq.transformer.mixed import spec_key

    if session.kind != "causal_lm":
        raise SmpqError("AutoScheme is run on causal LMs only")
    opts = autoscheme_options(session.specs)
    by_bits = {b: spec_key(s) for (b, _, _), s in zip(opts, session.specs, strict=True)}
    calib = session.calib
    os.environ.setdefault("AR_DISABLE_DATASET_SUBPROCESS", "1")
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    if session.swapper is not None:
        session.swapper.restore()
    with tempfile.TemporaryDirectory(prefix="smpq_autoscheme_") as tmp, \
            private_home(Path(tmp) / "home"):  # a cold cache of its own; the user's untouched
        data = Path(tmp) / "calibration.jsonl"
        # decoded blocks re-tokenise to about the same length; a margin of calibration text
        # (the next block's start) keeps each sample >= seqlen tokens (shorter ones are dropped)
        with data.open("w", encoding="utf-8") as f:
            for i, b in enumerate(calib):
                extra = calib[(i + 1) % len(calib)][:32]
                f.write(json.dumps({"text": session.tokenizer.decode(list(b) + list(extra))})
                        + "\n")
        schemes = [QuantizationScheme(bits=b, group_size=g, sym=sym, data_type="int",
                                      act_bits=16) for b, g, sym in opts]
        start = time.perf_counter()
        model = copy.deepcopy(session.model)
        targets = [float(b) for b in avg_bits]
        scheme = AutoScheme(avg_bits=targets[0], options=schemes,
                            ignore_scale_zp_bits=True, nsamples=len(calib),
                            seqlen=int(calib.shape[1]), batch_size=batch_size)
        quiet = logging.getLogger("auto_round")
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                ar = AutoRound(model, session.tokenizer, scheme=scheme, iters=0,
                               nsamples=len(calib), seqlen=int(calib.shape[1]),
                               dataset=str(data), device_map="cpu",
                               enable_torch_compile=False)
                ar.post_init()  # scores every option once (cached), solves targets[0]
                configs = {targets[0]: copy.deepcopy(ar.layer_config)}
                gen = ar.scheme_generator
                for t in targets[1:]:  # the cached scores, another knapsack
                    gen.auto_scheme.avg_bits = t
                    configs[t] = gen.get_layer_config()
        finally:
            quiet.setLevel(level)
        seconds = time.perf_counter() - start
    del model
    out: dict[float, dict[str, str]] = {}
    for target in targets:
        config = configs[target]
        out[target] = {}
        for name in session.linears:
            bits = (config.get(name) or {}).get("bits")
            if bits not in by_bits:
                raise SmpqError(f"AutoScheme gave layer {name!r} bits {bits!r}, not a "
                                "candidate")
            out[target][name] = by_bits[bits]
    return out, {"seconds": seconds, "forward_passes": None, "backward_passes": None}


def check_autoscheme(budget: Any, candidates: Any) -> float:
    """The avg_bits target of `smpq ptq --method autoscheme`, checked before the model loads:
    auto-round installed (scripts/install_peers.sh), a budget of one avg_bits limit, integer
    group candidates of distinct bit widths."""
    import importlib.util

    from smpq.transformer.mixed import parse_candidates

    if importlib.util.find_spec("auto_round") is None:
        raise SmpqError("--method autoscheme needs Intel's auto-round: run "
                        "scripts/install_peers.sh once")
    cons = list(budget.constraints)
    if len(cons) != 1 or cons[0].metric != "avg_bits" or cons[0].reference is not None:
        raise SmpqError(f"AutoScheme solves one avg_bits target (e.g. avg_bits=3), not {budget}")
    autoscheme_options(parse_candidates(candidates))
    return float(cons[0].value)


def autoscheme_strategy(p: Any) -> Any:
    """A transformer strategy (SearchProblem -> StrategyResult) around AutoScheme: its
    per-layer allocation (share groups not respected: it decides each layer alone) in
    `info["assignment"]`, its cost in `info["search_cost"]`."""
    from smpq.policy import Policy
    from smpq.spec import LayerChoice
    from smpq.strategy import StrategyResult
    from smpq.transformer.mixed import spec_key

    s = p.model
    target = check_autoscheme(p.budget, [spec_key(x) for x in s.specs])
    found, cost = autoscheme_allocation(s, [target])
    assignment = found[target]
    by_key = {spec_key(x): x for x in s.specs}
    policy = Policy({n: LayerChoice(by_key[k], None) for n, k in assignment.items()}, meta={
        "method": "autoscheme", "backend": s.backend, "budget": str(p.budget),
        "model": s.model_name, "candidates": list(by_key), "seed": p.seed})
    return StrategyResult("autoscheme", policy, float(cost["seconds"]), 0, 0.0,
                          {"search_cost": cost, "assignment": assignment})
