"""GPTQ (Frantar et al. 2022): column-wise quantization with Hessian-based error feedback.

For a weight W (out, in) and the proxy Hessian H = 2/N X^T X of its inputs, columns are
quantized one at a time; the rounding error of column j, scaled by the Cholesky factor U of
H^-1 (H^-1 = U^T U, U upper), is pushed onto the not-yet-quantized columns:

    err = (w_j - q_j) / U[j, j];   W[:, j:] -= err U[j, j:]

which is the OBS update with the inverse Hessian of the remaining columns, without ever
re-inverting. Updates of columns beyond the current block of `blocksize` columns are applied
lazily, once per block (a rank-`blocksize` matmul); this does not change the result.

Details follow the paper and its reference code: dampening `percdamp * mean(diag H)` on the
diagonal (retried x10 when the factorisation fails), dead inputs (diag H == 0) get a unit
diagonal and a zeroed weight column, optional act-order (descending diag H, undone at the end).

Scales: per-channel / per-tensor ones are computed once before the loop from W (after dead
columns are zeroed: they never affect the output). Group scales are computed when a group
starts, from the *current* (error-updated) weights of its columns. Deviation from the
reference code: that code reads the group from the stale block-start copy `W` (so the result
depends on `blocksize`); here the exact current weights are used, so blocking never changes
the result. With act-order the groups are consecutive columns in processing order (the
reference's `g_idx`); `static_groups=True` instead fixes contiguous groups' scales from W
before the loop, which keeps the usual contiguous layout under act-order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from smpq.errors import SmpqError
from smpq.primitives import choose_qparams, fake_quantize
from smpq.spec import Granularity, QuantSpec

__all__ = [
    "GPTQConfig",
    "GPTQResult",
    "PreparedHessian",
    "gptq_quantize",
    "gptq_quantize_weight",
    "prepare_hessian",
]

log = logging.getLogger(__name__)

_DAMP_RETRIES = 6


@dataclass(frozen=True)
class GPTQConfig:
    """blocksize: lazy-update block width; percdamp: diagonal dampening relative to mean(diag H).

    act_order: quantize columns by descending diag H (large-activation inputs first, while many
    columns remain to absorb their error). static_groups: group scales fixed from W upfront.
    """

    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    static_groups: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int):
            raise SmpqError(f"blocksize must be an integer, got {self.blocksize!r}")
        if self.blocksize < 1:
            raise SmpqError(f"blocksize must be positive, got {self.blocksize}")
        if not (math.isfinite(self.percdamp) and self.percdamp >= 0):
            raise SmpqError(f"percdamp must be a finite number >= 0, got {self.percdamp}")


@dataclass(frozen=True)
class PreparedHessian:
    """The format-independent part of GPTQ; reuse it for every spec tried on one layer.

    hinv_upper: U with (H + damp I)^-1 = U^T U, rows/columns in processing order.
    perm: processing order (original column of each position), None for the natural order.
    dead: inputs with diag H == 0, in the original order.
    """

    hinv_upper: Tensor
    perm: Tensor | None
    dead: Tensor
    damp: float


@dataclass(frozen=True)
class GPTQResult:
    """weight: fake-quantized W (input shape and dtype).

    loss: sum of the OBS losses (w - q)^2 / (2 U_jj^2), which equals 1/2 tr(dW H_d dW^T) for
    the damped Hessian H_d (i.e. ||X dW^T||^2 / N up to dampening).
    scale / zero_point: (out or 1, n_groups); column c uses `scale[:, group_index[c]]`.
    """

    weight: Tensor
    loss: float
    scale: Tensor
    zero_point: Tensor | None
    group_index: Tensor


def _inverse_cholesky_upper(h: Tensor, damp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor U of (h + damp I)^-1, raising the dampening if h is too singular.

    With J the reversal permutation and J h J = L L^T, U = J L^-1 J: one Cholesky and one
    triangular solve instead of the reference's Cholesky, inverse and second Cholesky (same U;
    `cholesky_inverse` measured >50x slower on this project's CPU machines).
    """
    base = torch.diagonal(h).mean().item()
    tries = [damp] + [max(damp, 1e-6 * base) * 10**k for k in range(1, _DAMP_RETRIES)]
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for d in tries:
        flipped = h.flip(0, 1) + d * eye
        chol, info = torch.linalg.cholesky_ex(flipped)
        if info.item() == 0:
            return torch.linalg.solve_triangular(chol, eye, upper=False).flip(0, 1), d
        log.warning("Hessian not positive definite with dampening %.3g; retrying", d)
    raise SmpqError(
        f"the Hessian is not positive definite even with dampening {tries[-1]:.3g}; "
        "check the calibration data"
    )


@torch.no_grad()
def prepare_hessian(h: Tensor, config: GPTQConfig = GPTQConfig()) -> PreparedHessian:
    """Dead inputs, act-order permutation, dampening and the Cholesky factor of H^-1.

    Factorised in h's dtype (float16/bfloat16 are promoted to float32).
    """
    if h.dim() != 2 or h.shape[0] != h.shape[1] or h.shape[0] == 0:
        raise SmpqError(f"a Hessian must be a non-empty square matrix, got {tuple(h.shape)}")
    if not torch.isfinite(h).all():
        raise SmpqError("the Hessian has NaN or infinite entries; check the calibration data")
    dt = torch.float64 if h.dtype == torch.float64 else torch.float32
    hh = h.detach().to(dt).clone()
    diag = hh.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    if (diag < 0).any():
        raise SmpqError("the Hessian has a negative diagonal entry; it is not X^T X")
    perm = None
    if config.act_order:
        perm = torch.argsort(diag, descending=True, stable=True)
        hh = hh[perm][:, perm]
    damp = config.percdamp * hh.diagonal().mean().item()
    upper, damp = _inverse_cholesky_upper(hh, damp)
    return PreparedHessian(hinv_upper=upper, perm=perm, dead=dead, damp=damp)


def _column_spec(spec: QuantSpec) -> QuantSpec:
    """The same format with one scale per row: how a single column (out, 1) is quantized."""
    return replace(spec, granularity=Granularity.CHANNEL, group_size=None)


def _upfront_qparams(
    w: Tensor, spec: QuantSpec, cspec: QuantSpec, static_groups: bool
) -> tuple[list, list, list[int]]:
    """Scales fixed before the loop: per tensor, per channel, or per contiguous static group.

    Returns per-group scales and zero points and the group of each original column; empty
    lists for dynamic groups (filled in during the loop).
    """
    n = w.shape[1]
    if spec.granularity is Granularity.GROUP:
        if not static_groups:
            return [], [], []
        gs = int(spec.group_size)
        qps = [choose_qparams(w[:, a : a + gs], cspec) for a in range(0, n, gs)]
        return [s for s, _ in qps], [z for _, z in qps], [c // gs for c in range(n)]
    s, z = choose_qparams(w, spec if spec.granularity is Granularity.TENSOR else cspec)
    return [s], [z], [0] * n


def _current_columns(
    wt: Tensor, w1: Tensor, err1: Tensor, u: Tensor, i1: int, i: int, end: int
) -> Tensor:
    """Up-to-date weights (out, k) of positions [i1 + i, end), with pending lazy updates."""
    i2 = i1 + w1.shape[0]
    cur = w1[i : min(end, i2) - i1]
    if end > i2:
        cur = torch.cat([cur, wt[i2:end] - u[i1:i2, i2:end].T @ err1])
    return cur.T


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run the per-column loop on one intra-op thread, restoring the setting afterwards.

    Its ops are small and memory-bound; on a busy 2-core machine, multi-threading them was
    measured ~15x slower (threads waiting on each other), while the blocked matmuls between
    column loops keep every thread.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _quantize_column(col: Tensor, cspec: QuantSpec, scale: Tensor, zp: Tensor | None) -> Tensor:
    return fake_quantize(col.unsqueeze(1), cspec, scale, zp).squeeze(1)


@dataclass
class _Groups:
    """Quantization parameters during the loop: one entry per group, filled on the fly when
    `dynamic`; `of_position[p]` is the group of the p-th processed column."""

    scales: list
    zero_points: list
    of_position: list[int]
    dynamic: bool
    size: int


def _plan_groups(
    w: Tensor, spec: QuantSpec, cspec: QuantSpec, order: list[int], static: bool
) -> _Groups:
    n = w.shape[1]
    scales, zps, orig_group = _upfront_qparams(w, spec, cspec, static)
    if orig_group:
        return _Groups(scales, zps, [orig_group[c] for c in order], False, n)
    gs = int(spec.group_size)
    ng = -(-n // gs)
    return _Groups([None] * ng, [None] * ng, [p // gs for p in range(n)], True, gs)


def _quantize_columns(
    wt: Tensor, u: Tensor, cspec: QuantSpec, groups: _Groups, blocksize: int
) -> tuple[Tensor, Tensor]:
    """The GPTQ loop on W^T (in, out) in processing order: (Q^T, per-row loss sums)."""
    n, out_f = wt.shape
    qt = torch.empty_like(wt)
    loss_rows = wt.new_zeros(out_f)
    gs = groups.size
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        w1 = wt[i1:i2].clone()
        err1 = wt.new_zeros(i2 - i1, out_f)
        u1 = u[i1:i2, i1:i2]
        with _single_thread():
            for i in range(i2 - i1):
                p, k = i1 + i, groups.of_position[i1 + i]
                if groups.dynamic and p % gs == 0:
                    cur = _current_columns(wt, w1, err1, u, i1, i, min(p + gs, n))
                    groups.scales[k], groups.zero_points[k] = choose_qparams(cur, cspec)
                col = w1[i]
                q = _quantize_column(col, cspec, groups.scales[k], groups.zero_points[k])
                qt[p] = q
                err = (col - q) / u1[i, i]
                loss_rows += err.square()
                w1[i:].addr_(u1[i, i:], err, alpha=-1.0)
                err1[i] = err
        if i2 < n:
            wt[i2:].addmm_(u[i1:i2, i2:].T, err1, alpha=-1.0)
    return qt, loss_rows


@torch.no_grad()
def gptq_quantize(
    w: Tensor,
    h: Tensor | PreparedHessian,
    spec: QuantSpec,
    config: GPTQConfig = GPTQConfig(),
) -> GPTQResult:
    """GPTQ-quantize W (out, in) given H (in, in) or a `prepare_hessian` result.

    With a prepared Hessian its dampening and act-order are used (config's are ignored).
    Runs in float32 (float64 for a float64 W).
    """
    if w.dim() != 2:
        raise SmpqError(f"GPTQ expects a 2-D weight (out, in), got shape {tuple(w.shape)}")
    if spec.is_block:
        raise SmpqError(f"GPTQ with GGUF format {spec.fmt} is not supported (llama.cpp picks "
                        "block scales itself); use the rtn backend")
    prep = h if isinstance(h, PreparedHessian) else prepare_hessian(h, config)
    n = w.shape[1]
    if tuple(prep.hinv_upper.shape) != (n, n):
        raise SmpqError(
            f"Hessian of shape {tuple(prep.hinv_upper.shape)} does not match weight in={n}"
        )
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32
    W = w.detach().to(dt).clone()
    W[:, prep.dead.to(W.device)] = 0.0
    cspec = _column_spec(spec)
    order = list(range(n)) if prep.perm is None else prep.perm.tolist()
    groups = _plan_groups(W, spec, cspec, order, config.static_groups)
    # Transposed (in, out): a column of W is a contiguous row, so per-column updates are fast.
    wt = W.T[torch.tensor(order, device=W.device)].contiguous()
    u = prep.hinv_upper.to(W.device, dt)
    qt, loss_rows = _quantize_columns(wt, u, cspec, groups, config.blocksize)

    group_index = torch.empty(n, dtype=torch.long)
    group_index[torch.tensor(order)] = torch.tensor(groups.of_position, dtype=torch.long)
    if prep.perm is not None:
        qt = qt[torch.argsort(prep.perm).to(qt.device)]
    zps = groups.zero_points
    return GPTQResult(
        weight=qt.T.contiguous().to(w.dtype),
        loss=float(loss_rows.sum().item()) / 2.0,
        scale=torch.cat(groups.scales, dim=1),
        zero_point=None if zps[0] is None else torch.cat(zps, dim=1),
        group_index=group_index,
    )


def gptq_quantize_weight(
    w: Tensor,
    h: Tensor | PreparedHessian,
    spec: QuantSpec,
    config: GPTQConfig = GPTQConfig(),
) -> Tensor:
    """Only the fake-quantized weight of `gptq_quantize`."""
    return gptq_quantize(w, h, spec, config).weight
