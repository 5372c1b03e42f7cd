"""SMPQ and DMPQ (EdMIPS) searches over one supernet, with a shared epoch loop.

Schedule (both methods; `epochs` in total, the first `warmup` train weights only):
    warmup epochs:  train the shared weights with every branch active
    search epochs:  SMPQ  Shapley estimation -> per-layer standardise -> momentum -> alpha,
                          then one epoch of weight training
                    DMPQ  one epoch of joint SGD on weights and alpha with the expected-BitOps
                          complexity term (EdMIPS)
The state is checkpointed after every epoch (safetensors for tensors, JSON for the rest), so
a killed run resumes from the last finished epoch and reaches the same result. Every random
draw is seeded from (seed, epoch), so a resumed run needs no saved generator state.

Choices the paper leaves open (documented in docs, configurable here):
- a layer with no active branch outputs zero (Shapley-NAS) — `empty="float"` falls back to FP;
- inactive branches get mixing weight 0 without renormalisation (Shapley-NAS); with BatchNorm
  in eval mode this shrinks a layer's output as branches go, so accuracy collapses after a few
  removals and truncation ends most permutations early. `renormalise=True` (ours) rescales
  the active weights to sum 1, so a removal changes the mixture's quality, not its scale;
- the value is validation accuracy; `value="neg_loss"` is smoother;
- the exact budgeted derivation uses the EMA of the raw (unstandardised) Shapley estimates,
  which keep their magnitude across layers; alpha is only comparable within a layer.

Why one module past ~400 lines: both methods share the epoch loop, the resumable checkpoint
and the final derivation, and the schedule above is easiest to check with the loop that runs it
on the same page; the configuration dataclass with its validation is about a fifth of it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import Tensor, nn
from torch.utils.data import Dataset

from smpq.apply import calibrate_, quantizable_layers
from smpq.cnn.search.derive import Derivation, argmax_within_budget, derive_budgeted
from smpq.cnn.supernet import Supernet
from smpq.cnn.values import SubsetValue, stack_dataset
from smpq.cost import Budget, ModelCost
from smpq.errors import SmpqError
from smpq.fileio import atomic_write_text, read_json
from smpq.policy import Policy
from smpq.shapley import ShapleyConfig, conservative, permutation_shapley, standardise
from smpq.spec import LayerChoice, act_spec, weight_spec

__all__ = ["METHODS", "SearchConfig", "SearchOutcome", "search"]

log = logging.getLogger(__name__)
METHODS = ("smpq", "dmpq")
STATE_FILE, TENSORS_FILE = "state.json", "state.safetensors"  # TENSORS_FILE: older checkpoints
TENSORS_PATTERN, MANIFEST_KEY = "tensors.{}.safetensors", "tensors"


@dataclass(frozen=True)
class SearchConfig:
    """Everything that defines a search run (part of its checkpoint fingerprint)."""

    method: str = "smpq"
    w_bits: tuple[int, ...] = (2, 3, 4, 8)
    a_bits: tuple[int, ...] = (2, 3, 4, 8)
    epochs: int = 8
    warmup: int | None = None  # default: half of the epochs (Shapley-NAS)
    batch_size: int = 64
    lr: float = 1e-3  # shared weights (Adam), starting from the float model
    # SMPQ
    permutations: int = 10
    truncation: float | None = 0.5
    antithetic: bool = False
    value: str = "acc"
    val_samples: int | None = None  # how many validation images v(S) looks at (None = all)
    momentum: float = 0.8
    alpha_lr: float = 0.1
    score: str = "mean"  # or "conservative": mean - std of the marginals (Shapley-NAS)
    empty: str = "zero"
    renormalise: bool = False  # ours: rescale active mixing weights to sum 1 (see module doc)
    # DMPQ (EdMIPS)
    arch_lr: float = 0.01
    # both: weight of the complexity term (DMPQ: in the loss; SMPQ: in the alpha update)
    complexity_weight: float | None = None
    derive: str = "milp"  # or "argmax" (repaired by the exact allocation if over budget)
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SmpqError(f"unknown search method {self.method!r}; known: {', '.join(METHODS)}")
        for name in ("w_bits", "a_bits"):
            bits = tuple(getattr(self, name))
            object.__setattr__(self, name, bits)
            if not bits or len(set(bits)) != len(bits) or any(not 1 <= b <= 8 for b in bits):
                raise SmpqError(f"{name} must be distinct integers in [1, 8], got {bits}")
        if self.epochs < 1:
            raise SmpqError("epochs must be >= 1")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise SmpqError(f"warmup must be in [0, epochs), got {self.warmup_epochs}")
        if self.permutations < 1 or (self.antithetic and self.permutations % 2):
            raise SmpqError("permutations must be >= 1 (and even with antithetic)")
        if self.value not in ("acc", "neg_loss"):
            raise SmpqError("value must be 'acc' or 'neg_loss'")
        if self.score not in ("mean", "conservative"):
            raise SmpqError("score must be 'mean' or 'conservative'")
        if self.derive not in ("milp", "argmax"):
            raise SmpqError("derive must be 'milp' or 'argmax'")
        if self.truncation is not None and not 0 < self.truncation < 1:
            raise SmpqError("truncation must be in (0, 1) or None")

    @property
    def warmup_epochs(self) -> int:
        return self.epochs // 2 if self.warmup is None else self.warmup

    @property
    def lam(self) -> float:
        """Complexity weight. Default: EdMIPS's term only where it is the budget mechanism.

        With argmax derivation (EdMIPS) the complexity term is what steers DMPQ towards the
        budget (0.1, with expected BitOps normalised by the budget's limit). The exact MILP
        derivation enforces the budget itself, so there the default is 0 for both methods:
        alpha then records accuracy preferences only, and the allocator spends the budget.
        """
        if self.complexity_weight is not None:
            return self.complexity_weight
        return 0.1 if self.method == "dmpq" and self.derive == "argmax" else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["w_bits"], d["a_bits"] = list(self.w_bits), list(self.a_bits)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SearchConfig:
        known = {f.name for f in fields(cls)}
        extra = set(d) - known
        if extra:
            raise SmpqError(f"unknown search config field(s): {sorted(extra)}")
        return cls(**d)


@dataclass
class SearchOutcome:
    policy: Policy
    derivation: Derivation
    contributions: dict
    history: list[dict]
    seconds: float
    forward_seconds: float
    evaluations: int
    supernet: Supernet = field(repr=False)


# -- helpers -------------------------------------------------------------------------------

def _expected_bitops(net: Supernet, cost: ModelCost) -> Tensor:
    """EdMIPS complexity: sum_l MACs_l * E[w_l] * E[a_l] under softmax(alpha)."""
    wb = torch.tensor([s.bits for s in net.w_specs], dtype=torch.float32)
    ab = torch.tensor([s.bits for s in net.a_specs], dtype=torch.float32)
    total = torch.zeros(())
    for name, layer in net.layers.items():
        ew = (torch.softmax(layer.alpha_w, 0) * wb).sum()
        ea = (torch.softmax(layer.alpha_a, 0) * ab).sum()
        total = total + cost.layers[name].macs * ew * ea
    return total


def _loader(ds: Dataset, batch_size: int, seed: int, epoch: int):
    from smpq.cnn.data import make_loader

    return make_loader(ds, batch_size, shuffle=True, seed=seed * 10_007 + epoch)


def _train_epoch(net: Supernet, ds: Dataset, cfg: SearchConfig, epoch: int, opt_w, opt_a=None,
                 cost: ModelCost | None = None, norm: float = 1.0) -> float:
    model = net.model
    model.train()
    net.set_all_active()
    total, n = 0.0, 0
    for x, y in _loader(ds, cfg.batch_size, cfg.seed, epoch):
        loss = F.cross_entropy(model(x), y)
        if opt_a is not None and cfg.lam > 0:
            loss = loss + cfg.lam * _expected_bitops(net, cost) / norm
        opt_w.zero_grad(set_to_none=True)
        if opt_a is not None:
            opt_a.zero_grad(set_to_none=True)
        loss.backward()
        opt_w.step()
        if opt_a is not None:
            opt_a.step()
        total += loss.item() * len(y)
        n += len(y)
    model.eval()
    return total / max(n, 1)


def _per_layer(net: Supernet, vec: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out, i = {}, 0
    nw, na = len(net.w_specs), len(net.a_specs)
    for name in net.layers:
        out[name] = (vec[i:i + nw].copy(), vec[i + nw:i + nw + na].copy())
        i += nw + na
    return out


def _cost_penalty(net: Supernet) -> np.ndarray:
    """Per player, its bits standardised within its group (for the SMPQ complexity term)."""
    bits = np.array([p.spec.bits for p in net.players], dtype=float)
    return standardise(bits, net.groups())


# -- checkpoints ---------------------------------------------------------------------------
# One checkpoint is state.json plus the tensor file it names. The tensor file is content
# addressed (tensors.<sha256 prefix>.safetensors) and written first; state.json, written last
# by one atomic rename, is the commit point and records the file's full hash. A kill at any
# moment therefore leaves the previous state.json naming the previous tensors, both intact;
# older tensor files are deleted only after the new state.json is in place.

def _fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` durable (POSIX; a no-op where directories cannot open)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save(ckpt: Path, model: nn.Module, state: dict, optims: dict) -> None:
    from smpq.fileio import atomic_write_bytes

    ckpt.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    for oname, opt in optims.items():
        for pid, st in opt.state_dict()["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"opt.{oname}.{pid}.{k}"] = v.detach().contiguous()
    data = save_tensors(tensors)
    digest = hashlib.sha256(data).hexdigest()
    name = TENSORS_PATTERN.format(digest[:16])
    atomic_write_bytes(ckpt / name, data)
    _fsync_dir(ckpt)  # the tensor file exists on disk before state.json can name it
    atomic_write_text(ckpt / STATE_FILE,
                      json.dumps({**state, MANIFEST_KEY: {"file": name, "sha256": digest}}) + "\n")
    _fsync_dir(ckpt)
    for old in [*ckpt.glob(TENSORS_PATTERN.format("*")), ckpt / TENSORS_FILE]:
        if old.name != name:
            old.unlink(missing_ok=True)


def _read_checkpoint(ckpt: Path) -> tuple[dict, dict[str, Tensor]]:
    """(state, tensors) of a complete checkpoint, or an SmpqError saying what is wrong."""
    try:
        state = read_json(ckpt / STATE_FILE, "checkpoint")
    except SmpqError as exc:
        raise SmpqError(f"unreadable {exc}; "
                        "start without --resume") from None
    if not isinstance(state, dict):
        raise SmpqError(f"checkpoint {ckpt / STATE_FILE} is not a JSON object; "
                        "start without --resume")
    manifest = state.pop(MANIFEST_KEY, None)
    if not isinstance(manifest, dict):  # written before tensor files were named in state.json
        return state, load_file(str(ckpt / TENSORS_FILE))
    path = ckpt / str(manifest.get("file", ""))
    try:
        data = path.read_bytes()
    except OSError:
        raise SmpqError(f"checkpoint {ckpt} is incomplete: {path.name} is missing; "
                        "start without --resume") from None
    if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        raise SmpqError(f"checkpoint {ckpt} is damaged: {path.name} does not match the hash in "
                        f"{STATE_FILE}; start without --resume")
    return state, load_tensors(data)


def _load(ckpt: Path, model: nn.Module, optims: dict) -> dict:
    state, tensors = _read_checkpoint(ckpt)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for oname, opt in optims.items():
        sd = opt.state_dict()
        groups = sd["param_groups"]
        n_params = sum(len(g["params"]) for g in groups)
        new_state = {}
        for pid in range(n_params):
            prefix = f"opt.{oname}.{pid}."
            st = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if st:
                new_state[pid] = st
        opt.load_state_dict({"state": new_state, "param_groups": groups})
    return state


# -- the search ----------------------------------------------------------------------------

def search(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    cost: ModelCost,
    budget: Budget,
    cfg: SearchConfig,
    *,
    fixed: dict[str, LayerChoice | None] | None = None,
    calib: list[Tensor] | None = None,
    out: Path | None = None,
    resume: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> SearchOutcome:
    """Run SMPQ or DMPQ on a copy of `model`; return the derived policy and what it learned.

    `fixed` pins layers (e.g. first/last at 8/8); they are not searched. With `out`, state is
    checkpointed to out/checkpoint after every epoch; `resume` continues from it.
    """
    fixed = dict(fixed or {})
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    work = copy.deepcopy(model)
    found = quantizable_layers(work)
    unknown = sorted(set(fixed) - set(found))
    if unknown:
        raise SmpqError(f"cannot pin {', '.join(unknown)}: not a quantizable layer of the model")
    names = [n for n in found if n not in fixed]
    if not names:
        raise SmpqError(f"nothing left to search: all {len(found)} quantizable layer(s) "
                        f"({', '.join(found)}) are pinned; pin fewer (--no-pin) or see "
                        "`smpq layers` for the modules that are skipped and why")
    w_specs = [weight_spec(b) for b in cfg.w_bits]
    a_specs = [act_spec(b) for b in cfg.a_bits]
    fixed_policy = Policy(fixed) if fixed else None
    # fail early on an impossible budget, before any training
    pairs = [LayerChoice(w, a) for w in w_specs for a in a_specs]
    budget.ensure_feasible(cost, {**{n: pairs for n in names},
                                  **{n: [c] for n, c in fixed.items()}}, fixed)
    net = Supernet(work, w_specs, a_specs, layers=names, fixed=fixed_policy, empty=cfg.empty,
                   renormalise=cfg.renormalise)
    if calib is None:
        from smpq.cnn.pipeline import calibration_batches

        calib = calibration_batches(train_set, seed=cfg.seed)
    calibrate_(work, calib)
    xv, yv = stack_dataset(val_set, cfg.val_samples)
    value = SubsetValue(net, xv, yv, metric=cfg.value)
    weights = [p for n, p in work.named_parameters() if not n.endswith(("alpha_w", "alpha_a"))]
    opt_w = torch.optim.Adam(weights, lr=cfg.lr)
    optims = {"w": opt_w}
    opt_a = None
    if cfg.method == "dmpq":
        for p in net.alpha_parameters():
            p.requires_grad_(True)
        opt_a = torch.optim.Adam(net.alpha_parameters(), lr=cfg.arch_lr)
        optims["a"] = opt_a
    norm = float(budget.limits(cost, fixed).get("bitops") or
                 sum(lc.macs * 64 for lc in cost.layers.values()))
    n = net.n_players
    st = {"epoch": 0, "momentum": [0.0] * n, "raw_ema": [0.0] * n, "history": [],
          "estimates": None, "evaluations": 0, "forward_seconds": 0.0, "seconds": 0.0,
          "config": cfg.to_dict(), "budget": str(budget), "layers": names}
    ckpt = out / "checkpoint" if out is not None else None
    if resume:
        if ckpt is None or not (ckpt / STATE_FILE).is_file():
            raise SmpqError(f"nothing to resume: no checkpoint in {ckpt}")
        st = _load(ckpt, work, optims)
        if st["config"] != cfg.to_dict() or st["layers"] != names or st["budget"] != str(budget):
            raise SmpqError("the checkpoint was made with another configuration; "
                            "use the same options or start without --resume")
        log.info("resuming after epoch %d", st["epoch"])
    penalty = _cost_penalty(net)
    for epoch in range(st["epoch"], cfg.epochs):
        t0 = time.perf_counter()
        fwd0, evals = value.forward_seconds, 0
        searching = epoch >= cfg.warmup_epochs
        if searching and cfg.method == "smpq":
            res = _estimate(net, value, cfg, epoch, progress)
            evals = res.evaluations
            phi = res.estimate if cfg.score == "mean" else conservative(res)
            z = standardise(phi, net.groups()) - cfg.lam * penalty
            mom = cfg.momentum * np.asarray(st["momentum"]) + (1 - cfg.momentum) * z
            net.set_alphas(net.alphas() + cfg.alpha_lr * mom)
            raw = np.asarray(st["raw_ema"])
            raw = res.estimate.copy() if st["estimates"] is None else (
                cfg.momentum * raw + (1 - cfg.momentum) * res.estimate)
            st["momentum"], st["raw_ema"] = mom.tolist(), raw.tolist()
            st["estimates"] = _result_dict(res)
            st["biased"] = bool(st.get("biased")) or res.biased  # truncated in some epoch
        loss = _train_epoch(net, train_set, cfg, epoch, opt_w,
                            opt_a if searching else None, cost, norm)
        net.set_all_active()
        val = value.score()
        st["evaluations"] += evals + 1
        st["forward_seconds"] += value.forward_seconds - fwd0
        secs = time.perf_counter() - t0
        st["seconds"] += secs
        alphas = _per_layer(net, net.alphas())
        st["history"].append({
            "epoch": epoch, "phase": "search" if searching else "warmup", "train_loss": loss,
            "val_acc" if cfg.value == "acc" else "val_value": val, "evaluations": evals,
            "seconds": secs,
            "alpha": {k: {"alpha_w": w.tolist(), "alpha_a": a.tolist()}
                      for k, (w, a) in alphas.items()},
        })
        st["epoch"] = epoch + 1
        if progress:
            progress("epoch", epoch + 1, cfg.epochs)
        if ckpt is not None:
            _save(ckpt, work, st, optims)
    return _finish(net, cost, budget, cfg, fixed, st, value, start)


def _estimate(net, value, cfg, epoch, progress):
    shap = ShapleyConfig(permutations=cfg.permutations, antithetic=cfg.antithetic,
                         truncation=cfg.truncation, truncation_chunk=4, batch_size=8,
                         seed=cfg.seed * 1_000_003 + epoch)
    cb = (lambda done, total: progress("shapley", done, total)) if progress else None
    return permutation_shapley(value, net.n_players, shap, progress=cb)


def _result_dict(res) -> dict:
    def clean(a):
        return [None if not math.isfinite(float(v)) else float(v) for v in np.asarray(a)]

    return {"estimate": clean(res.estimate), "stderr": clean(res.stderr),
            "ci_low": clean(res.ci_low), "ci_high": clean(res.ci_high),
            "n_samples": [int(v) for v in res.n_samples], "evaluations": int(res.evaluations),
            "value_full": float(res.value_full), "biased": bool(res.biased)}


def _finish(net, cost, budget, cfg, fixed, st, value, start) -> SearchOutcome:
    if cfg.method == "smpq" and st["estimates"] is not None:
        milp_scores = _per_layer(net, np.asarray(st["raw_ema"]))
    else:  # DMPQ, or SMPQ without search epochs: log-probabilities under softmax(alpha)
        alpha = _per_layer(net, net.alphas())
        milp_scores = {k: (_log_softmax(w), _log_softmax(a)) for k, (w, a) in alpha.items()}
    argmax_scores = _per_layer(net, net.alphas())
    if cfg.derive == "milp":
        d = derive_budgeted(cost, milp_scores, net.w_specs, net.a_specs, budget, fixed, fixed)
    else:
        d = argmax_within_budget(cost, argmax_scores, net.w_specs, net.a_specs, budget,
                                 fixed, fixed)
    policy = Policy(d.policy.layers, meta={"method": cfg.method, "budget": str(budget),
                                          "search": cfg.to_dict(), **d.summary()})
    contributions = _contributions(net, cfg, st)
    return SearchOutcome(policy=policy, derivation=d, contributions=contributions,
                         history=st["history"], seconds=st["seconds"],
                         forward_seconds=st["forward_seconds"], evaluations=st["evaluations"],
                         supernet=net)


def _log_softmax(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=float)
    m = a.max()
    return a - m - np.log(np.exp(a - m).sum())


def _contributions(net: Supernet, cfg: SearchConfig, st: dict) -> dict:
    players = []
    est = st["estimates"]
    if est is not None:
        for i, p in enumerate(net.players):
            players.append({
                "layer": p.layer, "kind": p.kind, "bits": p.spec.bits, "label": p.label,
                "estimate": est["estimate"][i], "stderr": est["stderr"][i],
                "ci_low": est["ci_low"][i], "ci_high": est["ci_high"][i],
                "n_samples": est["n_samples"][i], "ema": st["raw_ema"][i],
            })
    layers = {
        name: {"w_bits": list(cfg.w_bits), "a_bits": list(cfg.a_bits),
               "alpha_w": w.tolist(), "alpha_a": a.tolist()}
        for name, (w, a) in _per_layer(net, net.alphas()).items()
    }
    # biased: truncation cut some permutation short, so the estimates lean toward the players
    # removed early and their intervals hold only for a monotone value (smpq.shapley)
    return {"method": cfg.method, "value": cfg.value, "players": players, "layers": layers,
            "biased": bool(st.get("biased", False)), "history": st["history"]}
