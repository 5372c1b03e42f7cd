"""Candidate weights and the baseline allocators' scores (per-layer sensitivities).

Candidates: weight formats as short strings (`parse_candidates`: int4g32 = asymmetric int4 in
groups of 32, int8 = per channel, -sym = symmetric, fp4_e2m1g32 = minifloat, q4_k = a GGUF
block format, "gguf" = all of them), ordered by bits. A GGUF format is offered only to layers
whose rows are whole blocks (K-quants: multiples of 256; `allowed_choices` per share group);
the others are never built.
Each (layer, format) is quantized ONCE by the backend and cached as safetensors named by its
content key (`candidate_key`: digest of the layer's float weight and shape, spec, backend, and
the calibration digest for backends that read statistics) in one shared folder, so a killed
run redoes none and runs with other output folders reuse them. Writes go to a temporary name
and are renamed into place: two processes filling one key leave one complete file.

Baselines: each method scores every (group, candidate) -- higher is better -- and all of them are
allocated by the same exact MILP as the Shapley scores (`smpq.alloc.allocate_milp`), so only the
scores differ. dW = Q_k(W) - W is taken from the candidate weights of the chosen backend (the
weights that will be deployed), W the float weight. Score = -(sum of the group's layer errors).

| method  | per-layer error of candidate k                                | data it needs       |
|---------|---------------------------------------------------------------|---------------------|
| uniform | none: the highest single format whose uniform policy fits     | -                   |
| hessian | tr(dW H dW^T), H = 2/N X^T X (the GPTQ layer-wise objective;  | 1 calibration pass  |
|         | HAWQ / Fisher style output error)                             |                     |
| fisher  | sum F * dW^2, F = mean over batches of the squared gradient   | forward + backward  |
|         | of the loss (empirical Fisher, one block per batch)           | per batch           |
| gradxdw | sum abs(G * dW), G = mean gradient (AutoRound AutoScheme)     | same as fisher      |
| relerr  | params * sqrt(tr(dW H dW^T) / tr(W H W^T)) (ExLlamaV2-style   | 1 calibration pass  |
|         | relative output error weighted by the layer's size)           |                     |

Loss for gradients: causal LMs the next-token NLL; encoders (all-MiniLM-L6-v2) the in-batch
contrastive loss it was trained with (MultipleNegativesRankingLoss, cosine x 20) on query /
document pairs -- at the float model an embedding-distance loss would have zero gradient.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smpq.blockformats import BLOCK_FORMATS, available
from smpq.errors import SmpqError
from smpq.fileio import atomic_save_safetensors
from smpq.spec import FLOAT_FORMATS, Granularity, QuantSpec

__all__ = [
    "CONTRASTIVE_SCALE", "DEFAULT_CANDIDATES", "GGUF_CANDIDATES", "LAYER_ERRORS", "METHODS",
    "CachedLayer", "Candidates", "ScoreResult", "allowed_choices",
    "baseline_scores", "build_candidates", "candidate_key", "candidate_path", "contrastive_loss",
    "MOMENTS", "gradient_moments",
    "group_scores", "hessian_errors", "layer_errors", "lm_loss", "parse_candidates",
    "spec_key", "weight_digest",
]

DEFAULT_CANDIDATES = "int2g32,int3g32,int4g32,int8g32"
GGUF_CANDIDATES = ",".join(BLOCK_FORMATS)  # the "gguf" preset: every GGUF block format
_PRESETS = {"gguf": GGUF_CANDIDATES}
CONTRASTIVE_SCALE = 20.0
LossFn = Callable[[nn.Module, Any], Tensor]
Progress = Callable[[str, int, int], None]
_TOKEN = re.compile(r"^(?P<fmt>int(?P<bits>\d+)|fp\d_e\dm\d)(?:g(?P<group>\d+)|(?P<gran>ch|t))?"
                    r"(?P<sym>-sym|-asym)?$")


# ----------------------------------------------------------------------------- candidates


def spec_key(spec: QuantSpec) -> str:
    """Canonical candidate string (parse_candidates reads it back): int is asymmetric unless
    '-sym'; no suffix = per channel, 'g32' = groups of 32, 't' = per tensor."""
    if spec.is_block:
        return spec.fmt
    base = f"int{spec.bits}" if spec.fmt == "int" else spec.fmt
    gran = {Granularity.GROUP: f"g{spec.group_size}", Granularity.CHANNEL: "",
            Granularity.TENSOR: "t"}[spec.granularity]
    return base + gran + ("-sym" if spec.fmt == "int" and spec.symmetric else "")


def _parse_one(token: str) -> QuantSpec:
    name = token.strip().lower()
    if name in BLOCK_FORMATS:
        return QuantSpec(bits=BLOCK_FORMATS[name].nominal_bits, fmt=name)
    m = _TOKEN.match(name)
    if not m:
        raise SmpqError(f"cannot read candidate {token!r}; write e.g. int4g32, int8, int4g128-sym, "
                        f"fp4_e2m1g32, a GGUF type ({', '.join(BLOCK_FORMATS)}) or gguf")
    fmt = "int" if m["bits"] else m["fmt"]
    if fmt != "int" and fmt not in FLOAT_FORMATS:
        known = ", ".join(FLOAT_FORMATS)
        raise SmpqError(f"unknown format in {token!r}; known: int<bits>, {known}")
    bits = int(m["bits"]) if m["bits"] else FLOAT_FORMATS[fmt].bits
    gran = "group" if m["group"] else {"t": "tensor", None: "channel", "ch": "channel"}[m["gran"]]
    symmetric = fmt != "int" or m["sym"] == "-sym"
    if fmt != "int" and m["sym"] == "-asym":
        raise SmpqError(f"minifloat candidate {token!r} cannot be asymmetric")
    group = int(m["group"]) if m["group"] else None
    return QuantSpec(bits=bits, fmt=fmt, symmetric=symmetric, granularity=Granularity(gran),
                     group_size=group)


def parse_candidates(text: str | Sequence[str | QuantSpec]) -> tuple[QuantSpec, ...]:
    """At least two distinct weight formats, ordered by bits (stable): the precision ladder."""
    if isinstance(text, str):
        text = ",".join(_PRESETS.get(t.strip().lower(), t) for t in text.split(","))
    items = [t for t in text.split(",") if t.strip()] if isinstance(text, str) else list(text)
    specs = [s if isinstance(s, QuantSpec) else _parse_one(str(s)) for s in items]
    keys = [spec_key(s) for s in specs]
    if len(set(keys)) != len(keys):
        raise SmpqError(f"candidates repeat a format: {keys}")
    if len(specs) < 2:
        raise SmpqError(f"need at least two candidate formats, got {keys}")
    return tuple(sorted(specs, key=lambda s: s.bits))


def _fits(spec: QuantSpec, layer: nn.Module) -> bool:
    """Whether `layer`'s weight rows (dim 1 onwards) hold whole blocks of a GGUF format."""
    return not spec.is_block or available(spec.fmt, layer.weight[0].numel())


def allowed_choices(linears: Mapping[str, nn.Module], groups: Sequence[Sequence[str]],
                    specs: Sequence[QuantSpec]) -> tuple[tuple[int, ...], ...]:
    """Per share group, the candidate indices every member can store (all for int/minifloat;
    a GGUF format only where each member's row length is a whole number of its blocks)."""
    out = []
    for group in groups:
        ks = tuple(k for k, s in enumerate(specs) if all(_fits(s, linears[n]) for n in group))
        if not ks:
            rows = sorted({linears[n].weight[0].numel() for n in group})
            raise SmpqError(f"no candidate format can store group {group[0]!r} (row lengths "
                            f"{rows}); add a 32-block GGUF type or an int format")
        out.append(ks)
    return tuple(out)


class CachedLayer(Mapping[str, Tensor]):
    """One layer's candidate weights, {candidate key: tensor}, read from the candidate cache
    on each access (`loader(key)`), so only the weights in use are in RAM. The file is read
    into memory and closed (no mmap: touched mapped pages would count in RSS); in-memory
    entries (`tensors`, a run without a cache folder) are returned as they are."""

    def __init__(self, dtype: torch.dtype, paths: Mapping[str, Path] | None = None,
                 tensors: Mapping[str, dict[str, Tensor]] | None = None) -> None:
        self.dtype, self._paths, self._tensors = dtype, dict(paths or {}), dict(tensors or {})

    def _read(self, key: str) -> dict[str, Tensor]:
        if key in self._tensors:
            return self._tensors[key]
        if key not in self._paths:
            raise KeyError(key)
        return _read_file(self._paths[key])

    def __getitem__(self, key: str) -> Tensor:
        return self._read(key)["weight"].to(self.dtype)

    def extras(self, key: str) -> dict[str, Tensor]:
        """What the backend stored beside the weight (GPTQ: "scale", "zero_point")."""
        return {k: v for k, v in self._read(key).items() if k != "weight"}

    def loader(self, key: str) -> Callable[[], Tensor]:
        """A zero-argument function giving this candidate's weight (for `WeightSwapper`)."""
        if key not in self:
            raise KeyError(key)
        return lambda: self[key]

    def __contains__(self, key: object) -> bool:
        return key in self._tensors or key in self._paths

    def __iter__(self) -> Iterator[str]:
        return iter([*self._tensors, *(k for k in self._paths if k not in self._tensors)])

    def __len__(self) -> int:
        return len(set(self._tensors) | set(self._paths))


class _LayerExtras(Mapping[str, dict[str, Tensor]]):
    def __init__(self, layer: CachedLayer) -> None:
        self._layer = layer

    def __getitem__(self, key: str) -> dict[str, Tensor]:
        if key not in self._layer:
            raise KeyError(key)
        return self._layer.extras(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._layer)

    def __len__(self) -> int:
        return len(self._layer)


class _Extras(Mapping[str, Mapping[str, dict[str, Tensor]]]):
    """{layer: {candidate key: extras}} read through `CachedLayer.extras`."""

    def __init__(self, weights: Mapping[str, CachedLayer]) -> None:
        self._weights = weights

    def __getitem__(self, name: str) -> Mapping[str, dict[str, Tensor]]:
        return _LayerExtras(self._weights[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)


@dataclass(frozen=True, eq=False)
class Candidates:
    """Fake-quantized weights per layer and candidate key (`weights[layer][key]`, read from the
    shared cache on access: `CachedLayer`), plus the scales GPTQ used (`extras[layer][key]`:
    {"scale", "zero_point"}) so the chosen ones export exactly."""

    specs: tuple[QuantSpec, ...]
    weights: dict[str, CachedLayer]
    built: int
    loaded: int
    seconds: float

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(spec_key(s) for s in self.specs)

    @property
    def extras(self) -> Mapping[str, Mapping[str, dict[str, Tensor]]]:
        return _Extras(self.weights)

    def loaders(self) -> dict[str, dict[str, Callable[[], Tensor]]]:
        """{layer: {key: loader}}: what `WeightSwapper` takes to read candidates lazily."""
        return {n: {k: layer.loader(k) for k in layer} for n, layer in self.weights.items()}


def weight_digest(w: Tensor) -> str:
    """sha256 of a weight's shape and float32 bytes: the layer part of a candidate key."""
    h = hashlib.sha256(json.dumps(list(w.shape)).encode())
    h.update(w.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def candidate_key(w: Tensor | str, spec: QuantSpec, backend: str, context: str = "") -> str:
    """Content key of one candidate weight: the float weight (or its `weight_digest`), the
    spec, the backend and `context` (the calibration digest for backends that read stats)."""
    digest = w if isinstance(w, str) else weight_digest(w)
    h = hashlib.sha256(json.dumps([digest, spec.to_dict(), backend, context],
                                  sort_keys=True).encode())
    return h.hexdigest()[:32]


def candidate_path(cache_dir: str | Path, key: str) -> Path:
    """Where the candidate with content key `key` lives in a shared cache folder."""
    return Path(cache_dir) / f"{key}.safetensors"


def _quantize(w: Tensor, spec: QuantSpec, backend: str, stats: Mapping | None) -> dict[str, Tensor]:
    from smpq.backends import get_backend, gptq_quantize, require_stat

    if backend == "gptq":  # keep GPTQ's scales: its weights are not on RTN's grid
        res = gptq_quantize(w, require_stat(stats, "hessian", "GPTQ"), spec)
        out = {"weight": res.weight, "scale": res.scale}
        return out | ({"zero_point": res.zero_point} if res.zero_point is not None else {})
    return {"weight": get_backend(backend)(w.clone(), spec, stats)}


def _read_file(path: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file, copied out of a plain read (no mapping kept)."""
    from safetensors.torch import load

    return load(path.read_bytes())


def _cached_ok(path: Path, fingerprint: str) -> bool:
    """Whether `path` is a complete candidate file for `fingerprint` (header check only: its
    tensors are read when used)."""
    import safetensors

    if not path.is_file():
        return False
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("fingerprint") == fingerprint
    except Exception:  # a truncated file from a kill: recompute it
        return False


def _save_cached(path: Path, tensors: dict[str, Tensor], fingerprint: str) -> None:
    atomic_save_safetensors({k: v.contiguous() for k, v in tensors.items()}, path,
                            metadata={"fingerprint": fingerprint})


def build_candidates(
    linears: Mapping[str, nn.Linear], specs: Sequence[QuantSpec], backend: str = "rtn",
    stats: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
    cache_dir: str | Path | None = None, context: str = "", progress: Progress | None = None,
    allowed: Mapping[str, Sequence[int]] | None = None,
) -> Candidates:
    """Quantize every (layer, spec) once; reuse `cache_dir` entries with the same content key
    (`candidate_key`: float weight, spec, backend, `context` e.g. a calibration digest), which
    may come from any earlier run, whatever its output folder.

    `stats` may be a callable, called only if something must be computed (resume skips it).
    `allowed` ({layer: spec indices}, default all) limits what is built: a layer's weights
    then hold only its allowed keys."""
    from smpq.backends import BACKENDS

    if backend not in BACKENDS:
        raise SmpqError(f"unknown PTQ backend {backend!r}; known: {', '.join(BACKENDS)}")
    start, built, loaded = time.perf_counter(), 0, 0
    weights: dict[str, CachedLayer] = {}
    resolved: Mapping[str, Any] | None = None if callable(stats) else stats
    todo = {n: [k for k in range(len(specs)) if allowed is None or k in allowed[n]]
            for n in linears}
    total, done = sum(len(v) for v in todo.values()), 0
    for name, layer in linears.items():
        w = layer.weight.detach()
        digest = weight_digest(w) if cache_dir else ""
        paths: dict[str, Path] = {}
        kept: dict[str, dict[str, Tensor]] = {}
        for j in todo[name]:
            spec = specs[j]
            key = spec_key(spec)
            fp = candidate_key(digest, spec, backend, context) if cache_dir else ""
            path = candidate_path(cache_dir, fp) if cache_dir else None
            if path is not None and _cached_ok(path, fp):
                loaded += 1
            else:
                if resolved is None and callable(stats):
                    resolved = stats()
                tensors = _quantize(w, spec, backend, (resolved or {}).get(name))
                if path:  # written and dropped: read back when used
                    _save_cached(path, tensors, fp)
                else:
                    kept[key] = tensors
                built += 1
            if path is not None:
                paths[key] = path
            done += 1
            if progress:
                progress("candidates", done, total)
        weights[name] = CachedLayer(w.dtype, paths, kept)
    return Candidates(tuple(specs), weights, built, loaded, time.perf_counter() - start)


# ----------------------------------------------------------------------------- baselines


@dataclass(frozen=True)
class ScoreResult:
    """Per group one score per candidate (higher is better) and what computing them cost.

    `errors[layer][k]` is the raw per-layer error (lower is better; empty for uniform);
    passes count sweeps over the calibration batches that the method itself needs."""

    method: str
    scores: tuple[np.ndarray, ...]
    errors: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    forward_passes: int = 0
    backward_passes: int = 0


def lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """Mean next-token NLL of a Hugging Face causal LM on token blocks (B, T)."""
    return model(input_ids=batch, labels=batch, use_cache=False).loss


def _pooled(model: nn.Module, enc: Mapping[str, Tensor]) -> Tensor:
    out = model(**enc)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1)


def contrastive_loss(model: nn.Module, batch: tuple[Mapping[str, Tensor], Mapping[str, Tensor]]
                     ) -> Tensor:
    """In-batch InfoNCE of (queries, documents): document i is query i's positive."""
    q, d = _pooled(model, batch[0]), _pooled(model, batch[1])
    logits = CONTRASTIVE_SCALE * q @ d.T
    return F.cross_entropy(logits, torch.arange(len(logits)))


MOMENTS = ("grad", "grad_sq")


def gradient_moments(
    model: nn.Module, linears: Mapping[str, nn.Linear], batches: Iterable[Any], loss_fn: LossFn,
    keys: Sequence[str] = MOMENTS,
) -> tuple[dict[str, dict[str, Tensor]], int]:
    """Mean gradient ("grad") and mean squared gradient ("grad_sq") of each weight over the
    batches (float model); `keys` picks which (one costs a float32 copy of the weights).

    Each weight's gradient is folded into its sums as soon as backward has it, then freed
    (a post-accumulate-grad hook), so the gradients of the whole model never coexist; no
    `.grad` is changed, dropout is off (eval mode) and requires_grad is restored.
    Returns (moments, n_batches)."""
    unknown = set(keys) - set(MOMENTS)
    if unknown or not keys:
        raise SmpqError(f"gradient moments are {', '.join(MOMENTS)}; got {list(keys)}")
    params = [m.weight for m in linears.values()]
    flags = [p.requires_grad for p in params]
    sums = [{k: torch.zeros_like(p, dtype=torch.float32) for k in keys} for p in params]
    was_training, n, previous = model.training, 0, [p.grad for p in params]

    def fold(acc: dict[str, Tensor]) -> Callable[[Tensor], None]:
        def hook(p: Tensor) -> None:
            g = p.grad.float()
            if "grad" in acc:
                acc["grad"].add_(g)
            if "grad_sq" in acc:
                acc["grad_sq"].addcmul_(g, g)
            p.grad = None
        return hook

    model.eval()
    handles = []
    try:
        for p, acc in zip(params, sums, strict=True):
            p.requires_grad_(True)
            p.grad = None
            handles.append(p.register_post_accumulate_grad_hook(fold(acc)))
        with torch.enable_grad():
            for batch in batches:
                torch.autograd.backward(loss_fn(model, batch), inputs=params)
                n += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        for p, flag, grad in zip(params, flags, previous, strict=True):
            p.requires_grad_(flag)
            p.grad = grad
    if n == 0:
        raise SmpqError("gradient scores need at least one calibration batch")
    for acc in sums:
        for t in acc.values():
            t.div_(n)
    return dict(zip(linears, sums, strict=True)), n


def _hessian(stats: Mapping[str, Any] | None, name: str, method: str) -> Tensor:
    h = None if stats is None else (stats.get(name) or {}).get("hessian")
    if h is None:
        raise SmpqError(f"{method} scores need calibration Hessians "
                        f"(smpq.backends.collect_input_stats); none for layer {name!r}")
    return h


def hessian_errors(w: Tensor, qs: Sequence[Tensor], h: Tensor) -> list[float]:
    """tr(dW H dW^T) of each candidate weight in `qs` against the float weight `w`."""
    h = h.double()
    return [float(((d @ h) * d).sum()) for d in (q.double() - w.double() for q in qs)]


def _output_errors(name: str, w: Tensor, qs: Sequence[Tensor], stats: Mapping | None,
                   method: str) -> list[float]:
    """tr(dW H dW^T) per candidate. A token embedding (stats with "token_freq" f) is a lookup
    of one-hot inputs: H = 2 diag(f) over its rows, so the error is 2 sum_t f_t |dW_t|^2, plus
    the output layer's tr(dW H dW^T) when it shares the tensor ("head_hessian")."""
    st = (stats or {}).get(name) or {}
    if "token_freq" not in st:
        return hessian_errors(w, qs, _hessian(stats, name, method))
    f = st["token_freq"].double().to(w.device)
    out = [2.0 * float((f[:, None] * (q.double() - w).square()).sum()) for q in qs]
    if st.get("head_hessian") is not None:
        out = [a + b for a, b in zip(out, hessian_errors(w, qs, st["head_hessian"]), strict=True)]
    return out


def _hessian_errors(name: str, w: Tensor, qs: Sequence[Tensor], stats: Mapping | None,
                    moments: Mapping | None) -> list[float]:
    return _output_errors(name, w, qs, stats, "hessian")


def _relerr_errors(name: str, w: Tensor, qs: Sequence[Tensor], stats: Mapping | None,
                   moments: Mapping | None) -> list[float]:
    base = _output_errors(name, w, [torch.zeros_like(w)], stats, "relerr")[0]
    return [w.numel() * math.sqrt(max(e, 0.0) / max(base, 1e-30))
            for e in _output_errors(name, w, qs, stats, "relerr")]


def _moment(method: str, key: str, name: str, moments: Mapping | None) -> Tensor:
    if moments is None or name not in moments:
        raise SmpqError(f"{method} scores need gradient moments for layer {name!r}")
    return moments[name][key]


def _fisher_errors(name: str, w: Tensor, qs: Sequence[Tensor], stats: Mapping | None,
                   moments: Mapping | None) -> list[float]:
    g = _moment("fisher", "grad_sq", name, moments)
    return [float((g * (q.double() - w).square()).sum()) for q in qs]


def _gradxdw_errors(name: str, w: Tensor, qs: Sequence[Tensor], stats: Mapping | None,
                    moments: Mapping | None) -> list[float]:
    g = _moment("gradxdw", "grad", name, moments)
    return [float((g * (q.double() - w)).abs().sum()) for q in qs]


# Per-layer error of each baseline (the table in the module docstring), in METHODS order.
LAYER_ERRORS: dict[str, Callable[..., list[float]]] = {
    "hessian": _hessian_errors, "fisher": _fisher_errors, "gradxdw": _gradxdw_errors,
    "relerr": _relerr_errors,
}
METHODS = ("uniform", *LAYER_ERRORS)


def layer_errors(method: str, linears: Mapping[str, nn.Linear], candidates: Candidates, *,
                 stats: Mapping[str, Any] | None = None,
                 moments: Mapping[str, Mapping[str, Tensor]] | None = None
                 ) -> dict[str, list[float]]:
    """Per layer, per candidate (ladder order) the method's error; lower is better."""
    if method not in LAYER_ERRORS:
        raise SmpqError(f"unknown score method {method!r}; known: {', '.join(METHODS)}")
    fn = LAYER_ERRORS[method]
    out = {}
    for name, layer in linears.items():
        w = layer.weight.detach().double()
        built = [k for k in candidates.keys if k in candidates.weights[name]]
        errs = dict(zip(built, fn(name, w, [candidates.weights[name][k] for k in built], stats,
                                  moments), strict=True))
        out[name] = [errs.get(k, math.nan) for k in candidates.keys]  # nan: not allowed here
    return out


def group_scores(errors: Mapping[str, Sequence[float]],
                 groups: Sequence[Sequence[str]]) -> tuple[np.ndarray, ...]:
    """Score of (group, candidate) = -(sum of its layers' errors)."""
    return tuple(-np.sum([np.asarray(errors[n], float) for n in g], axis=0) for g in groups)


def baseline_scores(
    method: str, linears: Mapping[str, nn.Linear], groups: Sequence[Sequence[str]],
    candidates: Candidates, *, stats: Mapping[str, Any] | None = None,
    moments: Mapping[str, Mapping[str, Tensor]] | None = None, n_grad_batches: int = 0,
) -> ScoreResult:
    """Scores of one baseline. `linears` must hold the FLOAT weights (swapper restored).

    hessian/relerr need `stats` (collect_input_stats), fisher/gradxdw `moments`
    (gradient_moments, over `n_grad_batches`). uniform's scores are the candidate ranks; its
    allocation is `smpq.alloc.uniform_choice`, not the MILP."""
    if method not in METHODS:
        raise SmpqError(f"unknown score method {method!r}; known: {', '.join(METHODS)}")
    start = time.perf_counter()
    if method == "uniform":
        ranks = np.arange(len(candidates.specs), dtype=float)
        return ScoreResult(method, tuple(ranks.copy() for _ in groups))
    errors = layer_errors(method, linears, candidates, stats=stats, moments=moments)
    grad = method in ("fisher", "gradxdw")
    return ScoreResult(method, group_scores(errors, groups), errors,
                       time.perf_counter() - start,
                       forward_passes=n_grad_batches if grad else 1,
                       backward_passes=n_grad_batches if grad else 0)
