"""HAWQ-v2/v3 style sensitivity: Hutchinson Hessian traces times quantization perturbation.

For a searched layer with weight W (P entries), HAWQ-v2 scores a weight candidate b by the
second-order loss change in its *average-trace* form,

    s_w(b) = Tr(H_W) / P * ||Q_b(W) - W||^2        (= Tr(H_W) * mse_W(b))

where H_W is the Hessian of the loss w.r.t. W (the 1/2 of the Taylor term is dropped from
every score alike). Activations get the analogous term on the layer's input x: a zero tensor
e is added to x (a forward pre-hook), the Hessian w.r.t. e is the Hessian w.r.t. x with the
upstream network held fixed, and

    s_a(b) = Tr(H_x) / numel(x) * ||Q_b(x) - x||^2   (= Tr(H_x) * mse_x(b))

with x the batch tensor of a batch-mean loss, so both terms are loss units and independent
of the batch size. Upstream layers stay in float when mse_x is measured (one-layer view).

Traces come from Hutchinson's estimator, Tr(H_ll) = E[v_l' (H v)_l], with one Rademacher
vector v over every weight and every input at once: the cross-block terms v_l' H_lk v_k have
mean zero, so one Hessian-vector product (double backprop) per draw serves every layer, at
the price of some extra variance that the standard errors include. Draws cycle through fixed
labelled calibration batches; the estimate stops at the end of a full cycle once every
layer's relative standard error is below `tol` (or after `max_iters` draws).
The policy is the exact budgeted allocation with scores -(s_w + s_a).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from smpq.apply import quantizable_layers
from smpq.cnn.search.common import StrategyResult
from smpq.cnn.search.derive import derive_budgeted
from smpq.cnn.search.harness import Meter, SearchCost, SearchSpace, labelled_batches
from smpq.cost import Budget, ModelCost
from smpq.errors import SmpqError
from smpq.observers import ActQuantizer
from smpq.primitives import fake_quantize
from smpq.spec import LayerChoice, QuantSpec

__all__ = ["HawqSensitivity", "HutchinsonConfig", "TraceEstimate", "hawq", "hawq_sensitivity",
           "hutchinson_traces"]

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class HutchinsonConfig:
    """Stopping rule and data of the trace estimate."""

    tol: float = 0.05  # relative standard error every layer's trace must reach
    min_iters: int = 8
    max_iters: int = 200
    n_samples: int = 512  # calibration images (the ones calibration_batches draws)
    batch_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.tol > 0:
            raise SmpqError(f"tol must be positive, got {self.tol}")
        if not 2 <= self.min_iters <= self.max_iters:
            raise SmpqError("need 2 <= min_iters <= max_iters")


@dataclass(frozen=True)
class TraceEstimate:
    """Per-layer Hessian traces (weights, and layer inputs when asked) with standard errors."""

    names: tuple[str, ...]
    weight: np.ndarray
    weight_stderr: np.ndarray
    act: np.ndarray | None
    act_stderr: np.ndarray | None
    iterations: int
    converged: bool

    def to_dict(self) -> dict:
        def arr(a):
            return None if a is None else [float(v) for v in a]

        return {"names": list(self.names), "weight": arr(self.weight),
                "weight_stderr": arr(self.weight_stderr), "act": arr(self.act),
                "act_stderr": arr(self.act_stderr), "iterations": self.iterations,
                "converged": self.converged}


def _rademacher(shape: torch.Size, gen: torch.Generator) -> Tensor:
    return torch.randint(0, 2, shape, generator=gen).to(torch.float32) * 2 - 1


def _hvp_draw(model: nn.Module, layers: Sequence[nn.Module], batch: Batch,
              gen: torch.Generator, acts: bool) -> np.ndarray:
    """One Hutchinson draw v_l' (H v)_l per weight, then per layer input."""
    eps: dict[int, Tensor] = {}

    def hook(i):
        def pre(mod, args):
            eps[i] = torch.zeros_like(args[0], requires_grad=True)
            return (args[0] + eps[i], *args[1:])

        return pre

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(layers)] if acts else []
    try:
        loss = F.cross_entropy(model(batch[0]), batch[1])
    finally:
        for h in handles:
            h.remove()
    if acts and len(eps) != len(layers):
        raise SmpqError("every searched layer must run exactly once per forward pass")
    params = [m.weight for m in layers] + ([eps[i] for i in range(len(layers))] if acts else [])
    grads = torch.autograd.grad(loss, params, create_graph=True)
    vs = [_rademacher(p.shape, gen) for p in params]
    live = [k for k, g in enumerate(grads) if g.requires_grad]
    out = np.zeros(len(params))
    if live:
        hv = torch.autograd.grad([grads[k] for k in live], params,
                                 grad_outputs=[vs[k] for k in live], allow_unused=True)
        for k, h in enumerate(hv):
            if h is not None:
                out[k] = float((vs[k] * h).sum())
    return out


def hutchinson_traces(
    model: nn.Module,
    batches: Sequence[Batch],
    names: Sequence[str],
    cfg: HutchinsonConfig = HutchinsonConfig(),
    *,
    acts: bool = True,
) -> TraceEstimate:
    """Hessian traces of the mean cross-entropy w.r.t. each named layer's weight (and input).

    The model is copied and put in eval mode; the target is the Hessian averaged over
    `batches` (equal-size batches weigh equally).
    """
    if not batches:
        raise SmpqError("the trace estimate needs at least one batch")
    work = copy.deepcopy(model).eval()
    mods = quantizable_layers(work)
    missing = [n for n in names if n not in mods]
    if missing:
        raise SmpqError(f"unknown layer(s): {', '.join(missing)}")
    for p in work.parameters():
        p.requires_grad_(False)
    layers = [mods[n] for n in names]
    for m in layers:
        m.weight.requires_grad_(True)
    gen = torch.Generator().manual_seed(cfg.seed)
    draws: list[np.ndarray] = []
    converged = False
    for k in range(cfg.max_iters):
        draws.append(_hvp_draw(work, layers, batches[k % len(batches)], gen, acts))
        n = k + 1
        if n >= cfg.min_iters and n % len(batches) == 0:
            arr = np.asarray(draws)
            se = arr.std(axis=0, ddof=1) / np.sqrt(n)
            if np.all(se < cfg.tol * np.abs(arr.mean(axis=0))):
                converged = True
                break
    arr = np.asarray(draws)
    mean, se = arr.mean(axis=0), arr.std(axis=0, ddof=1) / np.sqrt(len(arr))
    L = len(layers)
    return TraceEstimate(tuple(names), mean[:L], se[:L], mean[L:] if acts else None,
                         se[L:] if acts else None, len(arr), converged)


@torch.no_grad()
def _weight_mse(model: nn.Module, names: Sequence[str], specs: Sequence[QuantSpec]) -> np.ndarray:
    """(layers, candidates) mean squared weight error of each candidate's quantizer."""
    mods = quantizable_layers(model)
    return np.array([[float((fake_quantize(mods[n].weight, s) - mods[n].weight).pow(2).mean())
                      for s in specs] for n in names])


@torch.no_grad()
def _act_mse(model: nn.Module, names: Sequence[str], specs: Sequence[QuantSpec],
             batches: Sequence[Tensor]) -> np.ndarray:
    """(layers, candidates) mean squared input error with the calibrated activation quantizers.

    The quantizers are calibrated exactly as `calibrate_` does (float activations, MSE range),
    on the same batches the error is then measured on.
    """
    work = copy.deepcopy(model).eval()
    mods = quantizable_layers(work)
    quants = {n: [ActQuantizer(s, method="mse") for s in specs] for n in names}
    sums = {n: np.zeros(len(specs)) for n in names}
    counts = dict.fromkeys(names, 0)
    phase = {"calibrate": True}

    def hook(name):
        def pre(mod, args):
            x = args[0]
            for j, q in enumerate(quants[name]):
                if phase["calibrate"]:
                    q.observe(x)
                else:
                    sums[name][j] += float((q(x) - x).pow(2).sum())
            if not phase["calibrate"]:
                counts[name] += x.numel()

        return pre

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        for x in batches:
            work(x)
        for qs in quants.values():
            for q in qs:
                q.finish_calibration()
        phase["calibrate"] = False
        for x in batches:
            work(x)
    finally:
        for h in handles:
            h.remove()
    return np.stack([sums[n] / max(counts[n], 1) for n in names])


@dataclass(frozen=True)
class HawqSensitivity:
    """Per-layer, per-candidate expected loss increase (weights and activations)."""

    traces: TraceEstimate
    weight_mse: np.ndarray  # (layers, weight candidates)
    act_mse: np.ndarray  # (layers, activation candidates)
    cost: SearchCost

    def sensitivity(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        t = self.traces
        return {n: (t.weight[i] * self.weight_mse[i], t.act[i] * self.act_mse[i])
                for i, n in enumerate(t.names)}


def hawq_sensitivity(
    model: nn.Module,
    train_set: Dataset,
    names: Sequence[str],
    w_specs: Sequence[QuantSpec],
    a_specs: Sequence[QuantSpec],
    cfg: HutchinsonConfig = HutchinsonConfig(),
) -> HawqSensitivity:
    """Traces and quantization errors on the calibration images (seeded by cfg.seed)."""
    meter = Meter()
    batches = labelled_batches(train_set, cfg.n_samples, cfg.batch_size, cfg.seed)
    traces = hutchinson_traces(model, batches, names, cfg, acts=True)
    w_mse = _weight_mse(model, names, w_specs)
    a_mse = _act_mse(model, names, a_specs, [x for x, _ in batches])
    return HawqSensitivity(traces, w_mse, a_mse, meter.cost())


def hawq(
    model: nn.Module,
    cost: ModelCost,
    budget: Budget,
    train_set: Dataset,
    val_set: Dataset | None,
    w_specs: Sequence[QuantSpec],
    a_specs: Sequence[QuantSpec],
    fixed: Mapping[str, LayerChoice | None] | None = None,
    *,
    cfg: HutchinsonConfig = HutchinsonConfig(),
    sensitivity: HawqSensitivity | None = None,
) -> StrategyResult:
    """HAWQ-v2 allocation: minimise the summed second-order loss increase within the budget.

    Pass a precomputed `sensitivity` (same model and candidates) to reuse it across budgets;
    its cost is still charged to the result. Only calibration images of `train_set` are
    used; `val_set` is accepted for the strategies' common signature and not looked at.
    """
    del val_set
    space = SearchSpace.build(cost, w_specs, a_specs, fixed)
    sens = sensitivity or hawq_sensitivity(model, train_set, space.names, w_specs, a_specs, cfg)
    meter = Meter()  # the allocation; the sensitivity's own cost is added below
    if sens.traces.names != space.names:
        raise SmpqError("the sensitivity was measured on other layers than this search")
    table = sens.sensitivity()
    scores = {n: (-sw, -sa) for n, (sw, sa) in table.items()}
    d = derive_budgeted(cost, scores, w_specs, a_specs, budget, space.fixed, space.fixed)
    info = {"traces": sens.traces.to_dict(), "reused_sensitivity": sensitivity is not None,
            "sensitivity": {n: {"w": sw.tolist(), "a": sa.tolist()} for n, (sw, sa)
                            in table.items()}, **d.summary()}
    return meter.result("hawq", d.policy, info, extra=sens.cost)
