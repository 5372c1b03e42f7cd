"""A GGUF that llama.cpp runs: convert, quantize with a policy's types, measure perplexity.

The tools come from `scripts/build_llamacpp.sh` (llama.cpp as vendored in the
llama-cpp-python 0.3.36 sdist): `bin/llama-quantize`, `bin/llama-perplexity` and the
converter `src/convert_hf_to_gguf.py` with its `conversion/` package and `gguf-py`. They are
found in `$SMPQ_LLAMACPP` or `~/.cache/smpq/llama.cpp-0.3.36`; nothing here is needed by
`make test`.

    folder --convert_hf--> f32 GGUF (cached by content) --quantize(policy)--> GGUF
           --perplexity--> llama-perplexity's final estimate on a text file

`quantize` refuses, before running anything, a plan whose types llama.cpp would silently
replace (k-quants on rows not divisible by 256, overrides under an unquantized base type):
`smpq.export.targets.llama_cpp_fallbacks` with the real tensor shapes. After quantizing it
reads the file back and checks every planned tensor's stored type. Tool output goes to a log
file next to the result; a failure is one line naming the log.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smpq.errors import SmpqError
from smpq.export.targets import (
    GGML_BLOCKS,
    ggml_bits_per_weight,
    llama_cpp_fallbacks,
    llama_cpp_tensor_types,
    parse_tensor_type_args,
)
from smpq.fileio import atomic_write_text
from smpq.policy import Policy

__all__ = [
    "BUILD_SCRIPT",
    "DEFAULT_TOOLS_DIR",
    "ENV_VAR",
    "GGUF_PPL_CHUNKS",
    "base_ggml_type",
    "check_gguf_export",
    "convert_hf",
    "eval_text_file",
    "find_tools",
    "gguf_report",
    "gguf_shapes",
    "gguf_summary",
    "LlamaCppTools",
    "parse_perplexity",
    "perplexity",
    "plan_types",
    "ptq_gguf_export",
    "quantize",
    "tensor_type_file",
]

ENV_VAR = "SMPQ_LLAMACPP"
DEFAULT_TOOLS_DIR = "~/.cache/smpq/llama.cpp-0.3.36"
BUILD_SCRIPT = "scripts/build_llamacpp.sh"
CONVERT_VERSION = 1  # part of the converted-GGUF cache key: bump when convert_hf changes
GGUF_PPL_CHUNKS = 16  # llama-perplexity chunks of 512 tokens: ~1 min for SmolLM2 on 2 cores
_SPECIAL = {"token_embd": "--token-embedding-type", "output": "--output-tensor-type"}


@dataclass(frozen=True)
class LlamaCppTools:
    """Paths of one llama.cpp build (see the module docstring)."""

    root: Path

    @property
    def quantize(self) -> Path:
        return self.root / "bin" / "llama-quantize"

    @property
    def perplexity(self) -> Path:
        return self.root / "bin" / "llama-perplexity"

    @property
    def converter(self) -> Path:
        return self.root / "src" / "convert_hf_to_gguf.py"

    @property
    def gguf_py(self) -> Path:
        return self.root / "src" / "gguf-py"

    def missing(self) -> list[Path]:
        paths = (self.quantize, self.perplexity, self.converter, self.gguf_py)
        return [p for p in paths if not p.exists()]


def find_tools(root: str | os.PathLike | None = None) -> LlamaCppTools:
    """The llama.cpp build in `root`, $SMPQ_LLAMACPP or the default folder; one-line error if
    it is missing."""
    where = root or os.environ.get(ENV_VAR) or DEFAULT_TOOLS_DIR
    tools = LlamaCppTools(Path(where).expanduser())
    missing = tools.missing()
    if missing:
        raise SmpqError(f"llama.cpp tools not found in {tools.root} (missing {missing[0].name}):"
                        f" build them once with {BUILD_SCRIPT} (or set ${ENV_VAR})")
    return tools


def _tail(log: Path, n: int = 1) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def _run(cmd: Sequence[str | os.PathLike], log: Path, what: str,
         env: Mapping[str, str] | None = None) -> float:
    """Run a tool with its output in `log`; a failure is one SmpqError line. Returns seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        try:
            rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=dict(env) if env else None
                                ).returncode
        except OSError as exc:  # not executable, wrong architecture, ...
            raise SmpqError(f"cannot run {what} ({cmd[0]}): {exc}; rebuild with "
                            f"{BUILD_SCRIPT}") from None
    if rc != 0:
        raise SmpqError(f"{what} failed (exit {rc}): {_tail(log)} (full output in {log})")
    return time.perf_counter() - start


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


# -- convert ----------------------------------------------------------------------------------

_MODEL_FILES = re.compile(r"(config\.json|generation_config\.json|.*\.safetensors|.*\.bin|"
                          r"tokenizer.*|special_tokens_map\.json|vocab\.json|merges\.txt)")


def _folder_key(folder: Path, outtype: str) -> str:
    """sha256 over the files the converter reads (weights, config, tokenizer), names included."""
    from smpq.transformer.smollm2 import file_sha256

    files = sorted(p for p in folder.iterdir() if p.is_file() and _MODEL_FILES.fullmatch(p.name))
    if not any(p.name == "config.json" for p in files):
        raise SmpqError(f"{folder} has no config.json: not a Hugging Face model folder")
    h = hashlib.sha256(f"convert v{CONVERT_VERSION} {outtype}\n".encode())
    for p in files:
        h.update(f"{p.name} {file_sha256(p)}\n".encode())
    return h.hexdigest()[:16]


def convert_hf(folder: str | os.PathLike, cache_dir: str | os.PathLike = ".cache/smpq",
               outtype: str = "f32", tools: LlamaCppTools | None = None) -> Path:
    """The folder as a GGUF written by llama.cpp's own convert_hf_to_gguf.py (cached under
    <cache_dir>/gguf/<key>-<outtype>.gguf, key = content hash; written aside, then renamed)."""
    if outtype not in ("f32", "f16", "bf16"):
        raise SmpqError(f"convert to f32, f16 or bf16, got {outtype!r}")
    tools = tools or find_tools()
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise SmpqError(f"model folder not found: {folder}")
    root = Path(cache_dir).expanduser() / "gguf"
    final = root / f"{_folder_key(folder, outtype)}-{outtype}.gguf"
    if final.is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(final)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tools.gguf_py), str(tools.converter.parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, tools.converter, folder, "--outfile", tmp, "--outtype", outtype]
    try:
        _run(cmd, final.with_suffix(".log"), "convert_hf_to_gguf.py", env)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


# -- plan -------------------------------------------------------------------------------------


def _pattern(base: str) -> str:
    return f"^{re.escape(base + '.weight')}$"


def _type_lines(plan: Mapping[str, str]) -> str:
    return "".join(f"{_pattern(name)}={typ}\n" for name, typ in plan.items())


def tensor_type_file(policy: Policy, arch: str = "llama") -> str:
    """`--tensor-type-file` text of a policy: one anchored `PATTERN=TYPE` per line."""
    args, _ = llama_cpp_tensor_types(policy, arch)
    return _type_lines(parse_tensor_type_args(args))


def _tensors(path: str | os.PathLike) -> list[Any]:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise SmpqError("reading GGUF files needs the gguf package: pip install gguf") from None
    return list(GGUFReader(str(path)).tensors)


def gguf_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """{base name: shape in torch order (rows, cols)} of a GGUF's '*.weight' tensors."""
    out = {}
    for t in _tensors(path):
        if t.name.endswith(".weight"):  # GGUF stores ne order (columns first)
            out[t.name[: -len(".weight")]] = tuple(int(d) for d in reversed(t.shape))
    return out


def base_ggml_type(base_type: str) -> str:
    """The ggml type of a llama-quantize base type: itself, or a mix's ('q4_k_m' -> 'q4_k')."""
    name = base_type.lower()
    for cand in (name, re.sub(r"_(s|m|l)$", "", name)):
        if cand in GGML_BLOCKS:
            return cand
    raise SmpqError(f"unknown llama-quantize type {base_type!r}; e.g. q8_0, q4_k_m, q3_k_m")


def _checked(plan: dict[str, str], shapes: Mapping[str, Sequence[int]],
             base_type: str) -> dict[str, str]:
    replaced = llama_cpp_fallbacks(shapes, plan, base_ggml_type(base_type))
    if replaced:
        name, r = next(iter(replaced.items()))
        cols = shapes[name][-1] if len(shapes[name]) else 0
        raise SmpqError(
            f"llama.cpp would silently replace {len(replaced)} of {len(plan)} planned tensor "
            f"types (e.g. {name}: {r.requested} -> {r.actual or 'unchanged'}, {cols} columns, "
            f"base type {base_type}); use formats whose block divides the row length "
            f"(32-block types such as q4_0/iq4_nl, or k-quants only on rows divisible by 256)")
    return plan


def plan_types(policy: Policy | Mapping[str, str], shapes: Mapping[str, Sequence[int]],
               arch: str = "llama", base_type: str = "q8_0") -> dict[str, str]:
    """{GGUF base name: ggml type} llama.cpp will store exactly, or a one-line SmpqError.

    `policy`: a Policy or a plan {GGUF base name: ggml type}. With tied embeddings the GGUF
    has no `output`: a request for it applies to `token_embd` (which llama.cpp then uses as
    the output layer), unless both ask for different types.
    """
    if isinstance(policy, Policy):
        args, _ = llama_cpp_tensor_types(policy, arch)
        policy = parse_tensor_type_args(args)
    plan = {k: v.lower() for k, v in policy.items()}
    if "output" in plan and "output" not in shapes and "token_embd" in shapes:
        out_type = plan.pop("output")
        if plan.setdefault("token_embd", out_type) != out_type:
            raise SmpqError(f"tied embeddings: the output layer ({out_type}) and the token "
                            f"embedding ({plan['token_embd']}) must share one type")
    return _checked(plan, shapes, base_type)


# -- quantize ---------------------------------------------------------------------------------


def gguf_summary(path: str | os.PathLike) -> dict[str, Any]:
    """File bytes, tensor bytes, parameters, bits per weight (tensor data, all tensors) and
    {tensor base name: stored type} of a GGUF file."""
    tensors = _tensors(path)
    n_params = sum(int(t.n_elements) for t in tensors)
    n_bytes = sum(int(t.n_bytes) for t in tensors)
    types = {t.name.removesuffix(".weight"): t.tensor_type.name.lower() for t in tensors
             if t.name.endswith(".weight")}
    return {"file_bytes": Path(path).stat().st_size, "tensor_bytes": n_bytes,
            "params": n_params, "bits_per_weight": 8 * n_bytes / max(n_params, 1),
            "types": types, "type_counts": dict(Counter(types.values()))}


def quantize(src_gguf: str | os.PathLike, policy: Policy | Mapping[str, str],
             out_path: str | os.PathLike, base_type: str = "q8_0", arch: str = "llama",
             tools: LlamaCppTools | None = None, threads: int | None = None) -> dict[str, Any]:
    """llama-quantize `src_gguf` (f32/f16) into `out_path` with the policy's per-tensor types.

    `policy`: a Policy or an explicit plan {GGUF base name: ggml type}. Refuses a plan llama.cpp
    would change (see `plan_types`); writes `<out>.tensor_types.txt` and `<out>.log` beside
    the result; returns `gguf_summary` of the file plus the plan and the seconds taken."""
    tools = tools or find_tools()
    src, out = Path(src_gguf), Path(out_path)
    shapes = gguf_shapes(src)
    plan = plan_types(policy, shapes, arch, base_type)
    out.parent.mkdir(parents=True, exist_ok=True)
    type_file = out.with_name(out.name + ".tensor_types.txt")
    atomic_write_text(type_file, _type_lines(plan))
    flags: list[str] = ["--tensor-type-file", str(type_file)] if plan else []
    for name, flag in _SPECIAL.items():
        if name in plan:
            flags += [flag, plan[name]]
    tmp = _tmp(out)
    cmd = [tools.quantize, *flags, src, tmp, base_type.upper(), str(threads or _threads())]
    try:
        seconds = _run(cmd, out.with_name(out.name + ".log"), "llama-quantize")
        summary = gguf_summary(tmp)
        wrong = {n: (t, summary["types"].get(n)) for n, t in plan.items()
                 if summary["types"].get(n) != t}
        if wrong:
            name, (want, got) = next(iter(wrong.items()))
            raise SmpqError(f"llama-quantize stored {len(wrong)} tensors in another type than "
                            f"planned (e.g. {name}: {want} -> {got})")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    summary["file_bytes"] = out.stat().st_size
    return {**summary, "path": str(out), "base_type": base_type.lower(), "plan": plan,
            "planned_bits_per_weight": _planned_bpw(plan, shapes), "seconds": seconds}


def _planned_bpw(plan: Mapping[str, str], shapes: Mapping[str, Sequence[int]]) -> float | None:
    n = sum(_numel(shapes[k]) for k in plan)
    if not n:
        return None
    return sum(ggml_bits_per_weight(t) * _numel(shapes[k]) for k, t in plan.items()) / n


def _numel(shape: Sequence[int]) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def _threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)


# -- perplexity -------------------------------------------------------------------------------

_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+|nan|inf) \+/- ([0-9.]+|nan|inf)")
_CHUNKS = re.compile(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)")


def parse_perplexity(text: str) -> dict[str, float | int]:
    """{"perplexity", "stderr", "chunks", "ctx"} from llama-perplexity's output."""
    final = _FINAL.findall(text)
    if not final:
        raise SmpqError("llama-perplexity printed no final estimate")
    out: dict[str, float | int] = {"perplexity": float(final[-1][0]),
                                   "stderr": float(final[-1][1])}
    chunks = _CHUNKS.findall(text)
    if chunks:
        out["chunks"], out["ctx"] = int(chunks[-1][0]), int(chunks[-1][1])
    return out


def perplexity(gguf: str | os.PathLike, text_file: str | os.PathLike, ctx: int = 512,
               chunks: int | None = GGUF_PPL_CHUNKS, tools: LlamaCppTools | None = None,
               threads: int | None = None, log: str | os.PathLike | None = None
               ) -> dict[str, Any]:
    """llama-perplexity of a GGUF on a text file (the first `chunks` windows of `ctx` tokens;
    each window scores its second half, llama.cpp's protocol), plus the file's size."""
    tools = tools or find_tools()
    gguf, text = Path(gguf), Path(text_file)
    if not text.is_file():
        raise SmpqError(f"text file not found: {text}")
    log_path = Path(log) if log else gguf.with_name(gguf.name + ".perplexity.log")
    cmd = [tools.perplexity, "-m", gguf, "-f", text, "-c", str(ctx),
           "-t", str(threads or _threads())]
    if chunks is not None:
        cmd += ["--chunks", str(chunks)]
    for attempt in range(3):  # llama.cpp's logger is asynchronous: on a loaded machine its
        seconds = _run(cmd, log_path, "llama-perplexity")  # last lines can be lost at exit
        try:
            out = parse_perplexity(log_path.read_text(errors="replace"))
            break
        except SmpqError:
            if attempt == 2:
                raise SmpqError(f"llama-perplexity printed no final estimate in 3 runs: "
                                f"{_tail(log_path)} (full output in {log_path})") from None
    return {**out, "file_bytes": gguf.stat().st_size, "seconds": seconds, "log": str(log_path)}


# -- smpq ptq --export gguf -------------------------------------------------------------------


def _llama_columns(folder: Path) -> dict[str, int]:
    """Row lengths of a Llama's projections from its config.json (no weights read)."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # the model loader names the problem
    if not isinstance(cfg, dict):
        return {}
    if cfg.get("model_type") != "llama":
        raise SmpqError(f"--export gguf supports Llama-architecture models, got "
                        f"{cfg.get('model_type')!r} in {folder / 'config.json'}")
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    cols = {"hidden_size": hidden, "intermediate_size": cfg.get("intermediate_size")}
    if heads and cfg.get("head_dim"):
        cols["attention width"] = heads * cfg["head_dim"]
    return {k: int(v) for k, v in cols.items() if isinstance(v, int)}


def check_gguf_export(model: str, candidates: Any, cache_dir: str | os.PathLike = ".cache/smpq"
                      ) -> LlamaCppTools:
    """Before any expensive step of `smpq ptq --export gguf`: the tools exist, the model is a
    Llama (smollm2-135m or a Hugging Face folder), and every candidate format maps to a ggml
    type llama.cpp stores as is on every row length of the model; one-line error otherwise."""
    from smpq.export.targets import gguf_type
    from smpq.transformer.mixed import parse_candidates

    if model in ("tiny-lm", "minilm"):
        raise SmpqError(f"--export gguf needs a Llama-architecture Hugging Face model "
                        f"(smollm2-135m or a folder), not {model}")
    specs = parse_candidates(candidates)
    tools = find_tools()
    from smpq.transformer.models import resolve_model

    columns = _llama_columns(resolve_model(model, cache_dir)[0])
    for spec in specs:
        typ, _ = gguf_type(spec)
        block = GGML_BLOCKS[typ][0]
        bad = [(k, c) for k, c in columns.items() if c % block]
        if bad:
            raise SmpqError(
                f"--export gguf: candidate {spec.label} becomes {typ} (blocks of {block}), "
                f"which llama.cpp cannot store on rows of {bad[0][1]} ({bad[0][0]}) and would "
                f"silently replace; choose candidates with 32-element blocks (e.g. int4g32, "
                f"int8g32, q4_0, q5_0, q8_0, iq4_nl)")
    return tools


def eval_text_file(source: str, cache_dir: str | os.PathLike = ".cache/smpq") -> Path:
    """The test split as one text file for llama-perplexity (articles or files joined by a
    blank line), cached by content under <cache_dir>/gguf/."""
    if source == "wikipedia":
        from smpq.transformer.wiki import wiki_corpus

        texts = wiki_corpus()["test"]
    elif source == "stdlib":
        from smpq.transformer.data import stdlib_corpus

        texts = stdlib_corpus()["test"]
    else:
        raise SmpqError(f"unknown text source {source!r} for llama-perplexity")
    text = "\n\n".join(texts) + "\n"
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    path = Path(cache_dir).expanduser() / "gguf" / f"test-{source}-{key}.txt"
    if not path.is_file():
        atomic_write_text(path, text)
    return path


def ptq_gguf_export(model: str, policy: Policy, exports: str | os.PathLike, text_source: str,
                    cache_dir: str | os.PathLike = ".cache/smpq", base_type: str = "q8_0",
                    chunks: int | None = GGUF_PPL_CHUNKS, progress: Any = None
                    ) -> dict[str, Any]:
    """`smpq ptq --export gguf` after the allocation: convert (cached), quantize with the
    policy's types into <exports>/model.gguf, llama-perplexity on the test text."""
    from smpq.transformer.models import resolve_model

    step = progress or (lambda stage, done, total: None)
    tools = find_tools()
    step("gguf convert", 0, 3)
    src = convert_hf(resolve_model(model, cache_dir)[0], cache_dir, "f32", tools)
    step("gguf quantize", 1, 3)
    q = quantize(src, policy, Path(exports) / "model.gguf", base_type, "llama", tools)
    step("llama-perplexity", 2, 3)
    ppl = perplexity(q["path"], eval_text_file(text_source, cache_dir), chunks=chunks,
                     tools=tools)
    step("llama-perplexity", 3, 3)
    keep = ("file_bytes", "tensor_bytes", "params", "bits_per_weight", "planned_bits_per_weight",
            "base_type", "type_counts")
    return {"file": "exports/model.gguf", **{k: q[k] for k in keep},
            "llama_perplexity": ppl["perplexity"], "llama_perplexity_stderr": ppl["stderr"],
            "chunks": ppl.get("chunks"), "ctx": ppl.get("ctx"), "text": f"{text_source} test",
            "source_gguf": str(src), "seconds": {"quantize": q["seconds"],
                                                 "perplexity": ppl["seconds"]}}


def gguf_report(g: Mapping[str, Any]) -> str:
    """One terminal line of `ptq_gguf_export`'s result."""
    return (f"gguf: {g['file']} {g['file_bytes'] / 1e6:.1f} MB, {g['bits_per_weight']:.3f} bits "
            f"per weight (base {g['base_type']}), llama-perplexity {g['llama_perplexity']:.4f}"
            f" +/- {g['llama_perplexity_stderr']:.4f} ({g['chunks']} x {g['ctx']} tokens of the "
            f"{g['text']} text)")
