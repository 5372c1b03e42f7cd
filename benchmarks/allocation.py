"""shapley-loop vs its baselines at equal evaluation budgets: exhaustive oracles and large spaces.

    python benchmarks/allocation.py                 # everything (oracle, large, report)
    python benchmarks/allocation.py --part oracle   # one part into .cache/smpq/allocation/
    python benchmarks/allocation.py --part report   # merge the parts into results/
    python benchmarks/allocation.py --quick         # smoke run: 1 seed, small settings

Part 1 (exhaustive oracles on digits MLPs, W{2,3,4} x A{3,4}): every policy's post-training
value (-KL to the float model and accuracy on validation) is computed once per net by a
depth-first pass that reuses each prefix's activations (checked against `PolicyEvaluator`
on random policies), cached, and served to every method through a table-backed evaluator;
so every method at every budget and seed sees exactly the values a real search would. Budgets
follow BENCHMARKS.md. Regret in validation and test accuracy points to the best feasible
policy by validation accuracy, and on the search objective (-log KL) to the best by it.
Part 2 (small_resnet on digits, W{2,3,4,8} x A{2,3,4,8}, 16^7 policies): the best policy each
method finds at evaluation budgets 100/300/1000, reference = the best any method found.
Random and evolution are run once at the largest budget and read at each smaller one (their
first n evaluations are a run with budget n); shapley-loop runs once per budget; CLADO is
deterministic (one run per budget, shared by seeds). Writes results/allocation.{json,md,png}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from pareto import _clean, budget_facts, load_fp, make_budgets, sensitivities
from smpq import strategy
from smpq.cnn.data import get_splits
from smpq.cnn.search.baselines import HutchinsonConfig, SearchSpace
from smpq.cnn.search.engine_search import _engine_value
from smpq.cnn.search.harness import PolicyEvaluator, cost_tables
from smpq.errors import SmpqError
from smpq.fileio import atomic_write_text
from smpq.spec import act_spec, weight_spec
from smpq.strategy import SearchProblem

log = logging.getLogger("allocation")
RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(".cache/smpq")
SEARCHERS = ("shapley-loop", "random", "evolution", "clado")
NATURAL = ("uniform", "hawq", "oat_high", "oat_low", "greedy")
DEFAULT = "shapley-loop"


@dataclass(frozen=True)
class Settings:
    seeds: tuple[int, ...] = (0, 1, 2)
    fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    uniform_refs: tuple[str, ...] = ("3/3", "4/4")
    oracle_nets: tuple[tuple[int, ...], ...] = ((48, 32, 32, 32, 32, 32, 24), (32,) * 8)
    oracle_w: tuple[int, ...] = (2, 3, 4)
    oracle_a: tuple[int, ...] = (3, 4)
    oracle_evals: int = 300
    large_bits: tuple[int, ...] = (2, 3, 4, 8)
    large_budgets: tuple[str, ...] = ("50% to 3/3", "uniform 3/3")
    large_evals: tuple[int, ...] = (100, 300, 1000)
    hutchinson: HutchinsonConfig = field(default_factory=HutchinsonConfig)


QUICK = Settings(seeds=(0,), fractions=(0.5,), uniform_refs=("3/3",),
                 oracle_nets=((32, 24, 24, 24, 16),), oracle_evals=40,
                 large_budgets=("50% to 3/3",), large_evals=(30, 60),
                 hutchinson=HutchinsonConfig(max_iters=16, n_samples=256))


# -- evaluators -----------------------------------------------------------------------------

class Recorder:
    """A PolicyEvaluator stand-in that logs every distinct policy one method asks for."""

    def __init__(self, base):
        self.base, self.space = base, base.space
        self.log: list[tuple[tuple[int, ...], str, float]] = []
        self._seen: set = set()
        self.forward_seconds = 0.0

    def value(self, choice, metric: str = "acc") -> float:
        key = tuple(int(k) for k in choice)
        f0 = self.base.forward_seconds
        v = float(self.base.value(key, metric))
        if (key, metric) not in self._seen:
            self._seen.add((key, metric))
            self.log.append((key, metric, v))
            self.forward_seconds += self.base.forward_seconds - f0
        return v

    def values(self, choices, metric: str = "acc") -> np.ndarray:
        return np.array([self.value(c, metric) for c in np.atleast_2d(choices)], dtype=float)

    @property
    def calls(self) -> int:
        return len(self.log)


class TableEvaluator:
    """Values looked up in a net's oracle table (dense over every policy, product order)."""

    def __init__(self, space: SearchSpace, table: dict[str, np.ndarray]):
        self.space, self.table = space, table
        self.shape = (space.n_pairs,) * len(space.names)
        self.forward_seconds = 0.0

    def value(self, choice, metric: str = "acc") -> float:
        if metric not in self.table:
            raise SmpqError(f"the oracle table holds no {metric!r}")
        return float(self.table[metric][np.ravel_multi_index(tuple(choice), self.shape)])

    def values(self, choices, metric: str = "acc") -> np.ndarray:
        c = np.atleast_2d(np.asarray(choices, dtype=np.int64))
        return self.table[metric][np.ravel_multi_index(tuple(c.T), self.shape)]


@torch.no_grad()
def mlp_table(ev: PolicyEvaluator) -> dict[str, np.ndarray]:
    """neg_kl and acc of every policy of an MLP's space, depth first over shared prefixes."""
    space, seq = ev.space, ev.net.model.net
    idx = [int(n.split(".")[-1]) for n in space.names]
    bounds = [*idx, len(seq)]
    ref = ev.reference_logp()
    p_ref = ref.exp()
    n_l, n_p = len(idx), space.n_pairs
    kl = np.empty(n_p ** n_l)
    acc = np.empty(n_p ** n_l)
    masks = [(np.arange(len(space.w_specs)) == i, np.arange(len(space.a_specs)) == j)
             for i in range(len(space.w_specs)) for j in range(len(space.a_specs))]
    x = ev.x
    for m in seq[:idx[0]]:
        x = m(x)

    def walk(d: int, x: torch.Tensor, code: int) -> None:
        layer = seq[idx[d]]
        for k in range(n_p):
            layer.set_active(*masks[k])
            h = x
            for m in seq[bounds[d]:bounds[d + 1]]:
                h = m(h)
            c = code * n_p + k
            if d + 1 < n_l:
                walk(d + 1, h, c)
            else:
                logq = torch.log_softmax(h, dim=1)
                kl[c] = -float((p_ref * (ref - logq)).sum(dim=1).mean())
                acc[c] = float((h.argmax(1) == ev.y).float().mean())

    walk(0, x, 0)
    return {"neg_kl": kl, "acc": acc}


def cached_table(ev: PolicyEvaluator, key: str) -> tuple[dict[str, np.ndarray], dict]:
    path = CACHE / "allocation" / f"oracle-{key}.npz"
    if path.is_file():
        data = np.load(path)
        table, seconds = {"neg_kl": data["neg_kl"], "acc": data["acc"]}, float(data["seconds"])
    else:
        start = time.perf_counter()
        table = mlp_table(ev)
        seconds = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, seconds=seconds, **table)
    # check against the real evaluator on random policies (exact up to float rounding)
    rng = np.random.default_rng(0)
    shape = (ev.space.n_pairs,) * len(ev.space.names)
    codes = rng.integers(0, len(table["acc"]), 40)
    picks = np.stack(np.unravel_index(codes, shape), axis=1)
    err = {m: float(np.max(np.abs(ev.values(picks, m) - table[m][codes]))) for m in table}
    if max(err.values()) > 1e-5:
        raise SmpqError(f"oracle table disagrees with PolicyEvaluator: {err}")
    return table, {"seconds": seconds, "check_max_abs_err": err, "checked": len(codes)}


# -- running methods ------------------------------------------------------------------------

def kl_value(v):
    return _engine_value(np.asarray(v, dtype=float), "neg_kl")


def curve(rec: Recorder, tables) -> list[float]:
    """Best -log KL over the feasible policies among the first i+1 evaluations."""
    got = [(c, v) for c, m, v in rec.log if m == "neg_kl"]
    if not got:
        return []
    ok = tables.feasible(np.array([c for c, _ in got]))
    vals = np.where(ok, kl_value([v for _, v in got]), -np.inf)
    return [round(float(x), 5) for x in np.maximum.accumulate(vals)]  # -inf: none feasible yet


def _curve(row) -> np.ndarray:
    """A row's curve as floats (JSON keeps -inf as null)."""
    return np.array([-math.inf if x is None else x for x in row["curve"]], dtype=float)


def run(method: str, problem: SearchProblem, base, **options):
    rec = Recorder(base)
    p = replace(problem, options={**problem.options, **options, "evaluator": rec})
    start = time.perf_counter()
    res = strategy.get(method, "cnn")(p)
    res.seconds = time.perf_counter() - start
    return res, rec


def describe(res, space, val_ev, test_acc, tables, budget, cost, fixed) -> dict:
    c = space.choice_of(res.policy)
    return {"evaluations": res.evaluations, "seconds": res.seconds,
            "kl": float(kl_value(val_ev.value(c, "neg_kl"))), "acc": val_ev.value(c, "acc"),
            "test": test_acc(c), "choice": list(c),
            "feasible": bool(tables.feasible(np.array([c]))[0])
            and all(r["ok"] for r in budget.check(cost, res.policy, fixed))}


def make_problem(model, cost, budget, splits, fixed, seed, w, a, sens) -> SearchProblem:
    return SearchProblem(model, cost, budget, [weight_spec(b) for b in w],
                         [act_spec(b) for b in a], train=splits.train, val=splits.val,
                         fixed=fixed, seed=seed, options={"sensitivity": sens,
                                                          "metric": "neg_kl"})


def test_scorer(model, space, splits):
    ev = PolicyEvaluator(model, space, splits.train, splits.test, seed=0)
    return lambda c: ev.value(c, "acc")


# -- part 1 ---------------------------------------------------------------------------------

def oracle_part(splits, s: Settings, save, only: str | None = None) -> dict:
    out: dict = {}
    for i, hidden in enumerate(s.oracle_nets):
        if only is not None and str(i) != only:
            continue
        model, cost, fixed = load_fp(splits, "mlp", {"hidden": list(hidden)})
        w, a = s.oracle_w, s.oracle_a
        space = SearchSpace.build(cost, [weight_spec(b) for b in w], [act_spec(b) for b in a],
                                  fixed)
        ev = PolicyEvaluator(model, space, splits.train, splits.val, seed=0)
        key = hashlib.sha256(json.dumps([hidden, w, a]).encode()).hexdigest()[:12]
        table, tfacts = cached_table(ev, key)
        tev = TableEvaluator(space, table)
        test_acc = test_scorer(model, space, splits)
        shape = (space.n_pairs,) * len(space.names)
        every = np.stack(np.unravel_index(np.arange(len(table["acc"])), shape), axis=1)
        name = f"mlp hidden={list(hidden)}"
        net = {"model": name, "layers": list(space.names), "policies": len(every),
               "table": tfacts, "budgets": {}, "runs": []}
        log.info("oracle net %s: %d policies, table %.0f s", name, len(every), tfacts["seconds"])
        budgets = make_budgets(cost, fixed, w, a, s)
        for label, budget in budgets:
            tables = cost_tables(space, cost, budget)
            mask = tables.feasible(every)
            kls = kl_value(table["neg_kl"])
            b_acc = int(np.argmax(np.where(mask, table["acc"], -np.inf)))
            b_kl = int(np.argmax(np.where(mask, kls, -np.inf)))
            f = budget_facts(space, cost, budget)
            f.update(n_feasible=int(mask.sum()), oracle_acc=float(table["acc"][b_acc]),
                     oracle_test=test_acc(every[b_acc]), oracle_kl=float(kls[b_kl]),
                     kl_best_acc=float(table["acc"][b_kl]), kl_best_test=test_acc(every[b_kl]),
                     median_acc=float(np.median(table["acc"][mask])))
            net["budgets"][label] = f
        for seed in s.seeds:
            sens = sensitivities(model, cost, splits, fixed, seed, s, w, a)
            for label, budget in budgets:
                f = net["budgets"][label]
                tables = cost_tables(space, cost, budget)
                prob = make_problem(model, cost, budget, splits, fixed, seed, w, a, sens)
                for method in (*SEARCHERS, *NATURAL):
                    try:
                        res, rec = run(method, prob, tev, n_evaluations=s.oracle_evals)
                    except SmpqError as exc:
                        net["runs"].append({"method": method, "seed": seed, "budget": label,
                                            "error": str(exc)})
                        continue
                    row = {"method": method, "seed": seed, "budget": label,
                           **describe(res, space, tev, test_acc, tables, budget, cost, fixed)}
                    row.update(regret_val=100 * (f["oracle_acc"] - row["acc"]),
                               regret_test=100 * (f["oracle_test"] - row["test"]),
                               regret_kl=f["oracle_kl"] - row["kl"], curve=curve(rec, tables))
                    net["runs"].append(row)
                log.info("oracle %s seed %d %s: %s", name, seed, label, {
                    r["method"]: round(r.get("regret_val", math.nan), 2) for r in net["runs"]
                    if r["seed"] == seed and r["budget"] == label})
            out[name] = net
            save(out)
    return out


# -- part 2 ---------------------------------------------------------------------------------

def large_part(splits, s: Settings, save, only: str | None = None) -> dict:
    model, cost, fixed = load_fp(splits, "small_resnet")
    w = a = s.large_bits
    space = SearchSpace.build(cost, [weight_spec(b) for b in w], [act_spec(b) for b in a], fixed)
    ev = PolicyEvaluator(model, space, splits.train, splits.val, seed=0)
    test_acc = test_scorer(model, space, splits)
    sens: dict = {}  # measured once, on first use (the deterministic methods share it)
    out = {"model": "small_resnet", "layers": list(space.names),
           "log10_policies": len(space.names) * math.log10(space.n_pairs), "budgets": {},
           "runs": []}
    top = max(s.large_evals)

    def one(label, budget):
        tables = cost_tables(space, cost, budget)
        out["budgets"][label] = budget_facts(space, cost, budget)
        rows = out["runs"]

        def add(method, seed, n, res, rec, curve_=None, label=label, tables=tables,
                budget=budget, rows=rows):
            rows.append({"method": method, "seed": seed, "budget": label, "n": n,
                         **describe(res, space, ev, test_acc, tables, budget, cost, fixed),
                         "curve": curve_ if curve_ is not None else curve(rec, tables)})

        prob0 = make_problem(model, cost, budget, splits, fixed, 0, w, a, sens)
        small = [n for n in s.large_evals if n < top]

        def prefix(method, seed, n_run, reads):  # the first n evaluations are a run with budget n
            prob = make_problem(model, cost, budget, splits, fixed, seed, w, a, sens)
            res, rec = run(method, prob, ev, n_evaluations=n_run)
            full = curve(rec, tables)
            got = [c for c, m, _ in rec.log if m == "neg_kl"]
            for n in reads:
                best = int(np.argmax(full[:n]))
                r = replace(res, policy=space.policy(got[best]), evaluations=min(n, len(got)))
                add(method, seed, n, r, rec, full[:n])
            log.info("large %s seed %d: %s %d kl %.3f (%.0f s)", label, seed, method, n_run,
                     rows[-1]["kl"], res.seconds)

        def ours(seed, n):
            prob = make_problem(model, cost, budget, splits, fixed, seed, w, a, sens)
            res, rec = run(DEFAULT, prob, ev, n_evaluations=n)
            add(DEFAULT, seed, n, res, rec)
            log.info("large %s seed %d: %s n=%d kl %.3f (%.0f s)", label, seed, DEFAULT, n,
                     rows[-1]["kl"], res.seconds)

        def others():
            for n in s.large_evals:  # CLADO: deterministic (the pair subset only when capped)
                try:
                    res, rec = run("clado", prob0, ev, n_evaluations=n, pair_moves=16)
                    for seed in s.seeds:
                        add("clado", seed, n, res, rec)
                except SmpqError as exc:
                    log.info("clado at %d evaluations: %s", n, exc)
            if not sens:
                sens.update(sensitivities(model, cost, splits, fixed, 0, s, w, a))
            for method in NATURAL:
                res, rec = run(method, prob0, ev)
                for seed in s.seeds:
                    add(method, seed, None, res, rec)

        # jobs in priority order, saved after each, so a run cut short still reports
        jobs = []
        for seed in s.seeds:
            jobs += [lambda seed=seed, n=n: ours(seed, n) for n in small[:1]]
            jobs += [lambda seed=seed: prefix("random", seed, top, s.large_evals),
                     lambda seed=seed: prefix("evolution", seed, max(small, default=top),
                                              small or [top])]
            jobs += [lambda seed=seed, n=n: ours(seed, n) for n in small[1:]]
            if seed == s.seeds[0]:
                jobs.append(others)
        for seed in s.seeds:
            if small:
                jobs.append(lambda seed=seed: prefix("evolution", seed, top, [top]))
            jobs.append(lambda seed=seed: ours(seed, top))
        for job in jobs:
            job()
            save(out)

    for label, budget in make_budgets(cost, fixed, w, a, replace(s, fractions=(0.25, 0.5, 0.75),
                                                                 uniform_refs=("3/3", "4/4"))):
        if label in s.large_budgets and (only is None or label == only):
            one(label, budget)
    return out


# -- summary, report, plot ------------------------------------------------------------------

def _rows(runs, **kw):
    return [r for r in runs if "error" not in r and all(r.get(k) == v for k, v in kw.items())]


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _by_seed(runs, method, **kw):
    return {r["seed"]: r for r in _rows(runs, method=method, **kw)}


def summarise(res: dict) -> dict:
    regrets = [_mean([r["regret_val"] for r in _rows(net["runs"], method=DEFAULT, budget=b)])
               for net in res.get("oracle", {}).values() for b in net["budgets"]]
    large = res.get("large") or {"budgets": {}, "runs": []}
    evals = res["settings"]["large_evals"]
    margins: dict[str, list[float]] = {"random": [], "evolution": []}
    to_match: list[float] = []
    unmatched: list[int] = []
    for b in large["budgets"]:
        for n in evals:
            ours = _by_seed(large["runs"], DEFAULT, budget=b, n=n)
            for other in margins:
                theirs = _by_seed(large["runs"], other, budget=b, n=n)
                paired = [100 * (ours[s]["acc"] - theirs[s]["acc"]) for s in ours if s in theirs]
                if paired:
                    margins[other].append(float(np.mean(paired)))
        top = max(evals)
        rnd = _by_seed(large["runs"], "random", budget=b, n=top)
        need = []
        for s, r in rnd.items():  # our longest run on this seed
            mine = [x for x in _rows(large["runs"], method=DEFAULT, budget=b, seed=s)]
            if mine:
                longest = max(mine, key=lambda x: len(x["curve"]))
                hit = np.flatnonzero(_curve(longest) >= r["kl"] - 1e-5)
                need.append(int(hit[0]) + 1 if hit.size else math.inf)
                if not hit.size:
                    unmatched.append(len(longest["curve"]))
        if need:
            to_match.append(float(np.median(need)))
    return {"oracle_regret_max_pt": max((r for r in regrets if r is not None), default=None),
            "large_margin_vs_random_min_pt": min(margins["random"], default=None),
            "large_margin_vs_evolution_min_pt": min(margins["evolution"], default=None),
            "evals_to_match_random_1000": max(to_match, default=None),  # inf -> null
            "_not_matched_within": unmatched,
            "llm_ppl_ratio_vs_best_other_max": _llm_ratio()}


def _llm_ratio() -> float | None:
    """Part 3 (transformers) runs as benchmarks/allocation_llm.py; its summary feeds ours."""
    path = RESULTS / "allocation_llm.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())["summary"]["llm_ppl_ratio_vs_best_other_max"]


def _ms(xs, scale=1.0, nd=2) -> str:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return "-"
    m = scale * np.mean(xs)
    return f"{m:.{nd}f}" + (f" ± {scale * np.std(xs):.{nd}f}" if len(xs) > 1 else "")


def _table(runs, budgets, methods, key, scale=1.0, nd=2, **kw) -> list[str]:
    lines = ["| method | " + " | ".join(budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for m in methods:
        cells = [_ms([r[key] for r in _rows(runs, method=m, budget=b, **kw)], scale, nd)
                 for b in budgets]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = ["# Allocation at equal evaluation budgets: shapley-loop vs baselines", "",
             f"{res['note']}", "", "## Summary", "", "```",
             json.dumps(res["summary"], indent=1), "```", "",
             "`evals_to_match_random_1000`: median over seeds of the evaluations shapley-loop's "
             "longest run needed to reach random's best at the largest evaluation budget (null: "
             "not reached on some seeds; lengths of those runs: "
             f"{res.get('summary_notes', {}).get('not_matched_within', [])}). "
             "`llm_ppl_ratio_vs_best_other_max` comes from the transformer part, "
             "`benchmarks/allocation_llm.py` (tiny LM, RTN, 3 seeds; see allocation_llm.md), "
             "null when that has not been run.", "",
             "Accuracy in points (%), mean ± std over seeds " + str(s["seeds"]) + "; values "
             "are post-training (calibrated fake quantization, calibration seed 0, one "
             "evaluator shared by every method). -log KL: the search objective (higher is "
             "better). `evaluations` counts distinct policies a method scored on validation.",
             ""]
    methods = (*SEARCHERS, *NATURAL)
    for name, net in res.get("oracle", {}).items():
        b = list(net["budgets"])
        t = net["table"]
        lines += [f"## Exhaustive oracle: {name}, {net['policies']} policies", "",
                  f"Table of every policy built in {t['seconds']:.0f} s (depth first, shared "
                  f"prefixes), checked against PolicyEvaluator on {t['checked']} random "
                  f"policies: max abs error {max(t['check_max_abs_err'].values()):.1e}. "
                  f"Every method held to {s['oracle_evals']} evaluations (fewer if natural).",
                  "", "| budget | #feasible | note | oracle val acc | oracle test acc | "
                  "val acc of the KL-best | median val acc |", "|---|---|---|---|---|---|---|"]
        for lab, f in net["budgets"].items():
            note = "degenerate" if f["degenerate"] else "unconstrained" if f["unconstrained"] \
                else ""
            lines.append(f"| {lab} | {f['n_feasible']} | {note or '-'} | "
                         f"{100 * f['oracle_acc']:.2f} | {100 * f['oracle_test']:.2f} | "
                         f"{100 * f['kl_best_acc']:.2f} | {100 * f['median_acc']:.2f} |")
        for title, key, nd in (("Regret in validation accuracy (points)", "regret_val", 2),
                               ("Regret in test accuracy (points)", "regret_test", 2),
                               ("Regret on the objective (-log KL)", "regret_kl", 3),
                               ("Evaluations", "evaluations", 0)):
            lines += ["", f"### {title}", ""] + _table(net["runs"], b, methods, key, nd=nd)
        lines.append("")
    large = res.get("large")
    if large:
        b = list(large["budgets"])
        lines += [f"## Large space: {large['model']}, 10^{large['log10_policies']:.1f} "
                  "policies (W{2,3,4,8} x A{2,3,4,8})", "",
                  "| budget | log10 #feasible | BitOps limit |", "|---|---|---|"]
        for lab, f in large["budgets"].items():
            lines.append(f"| {lab} | {f['log10_feasible']:.2f} | {f['limits']['bitops']:.4g} |")
        for n in s["large_evals"]:
            lines += ["", f"### At {n} evaluations: -log KL / val acc / test acc", "",
                      "| method | " + " | ".join(b) + " |", "|---" * (len(b) + 1) + "|"]
            for m in (*SEARCHERS, *NATURAL):
                cells = []
                for lab in b:
                    rs = _rows(large["runs"], method=m, budget=lab,
                               n=None if m in NATURAL else n)
                    cells.append("-" if not rs else
                                 f"{_ms([r['kl'] for r in rs], nd=3)} / "
                                 f"{_ms([r['acc'] for r in rs], 100, 1)} / "
                                 f"{_ms([r['test'] for r in rs], 100, 1)} "
                                 f"({_ms([r['evaluations'] for r in rs], nd=0)} ev)")
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += ["", "### Paired margin of shapley-loop (points of val acc; -log KL)", "",
                  "| budget | evaluations | vs random | vs evolution | vs clado |",
                  "|---|---|---|---|---|"]
        for lab in b:
            for n in s["large_evals"]:
                ours = _by_seed(large["runs"], DEFAULT, budget=lab, n=n)
                cells = []
                for o in ("random", "evolution", "clado"):
                    th = _by_seed(large["runs"], o, budget=lab, n=n)
                    pa = [(100 * (ours[k]["acc"] - th[k]["acc"]), ours[k]["kl"] - th[k]["kl"])
                          for k in ours if k in th]
                    cells.append("-" if not pa else f"{_ms([p[0] for p in pa])}; "
                                 f"{_ms([p[1] for p in pa], nd=3)}")
                lines.append(f"| {lab} | {n} | " + " | ".join(cells) + " |")
            ref = max(r["kl"] for r in _rows(large["runs"], budget=lab))
            lines.append(f"| {lab} | reference (best any method found) | -log KL {ref:.3f} "
                         "| | |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for name, net in res.get("oracle", {}).items():
        lab = next((b for b in net["budgets"] if b.startswith("50%")), next(iter(net["budgets"])))
        panels.append((f"{name}\n{lab}", net["runs"], lab, net["budgets"][lab]["oracle_kl"]))
    large = res.get("large")
    if large:
        for lab in large["budgets"]:
            panels.append((f"small_resnet, {lab}", large["runs"], lab, None))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), squeeze=False)
    for ax, (title, runs, lab, oracle_kl) in zip(axes[0], panels, strict=True):
        for m in SEARCHERS:
            rs = _rows(runs, method=m, budget=lab)
            if not rs:
                continue
            per_seed = {}
            for r in rs:  # each seed's longest run; a run that stopped early stays flat
                if len(r["curve"]) >= len(per_seed.get(r["seed"], {"curve": ()})["curve"]):
                    per_seed[r["seed"]] = r
            longest = max(len(r["curve"]) for r in rs)
            if m == "clado" or not longest:
                for r in rs:
                    ax.plot(r["evaluations"], r["kl"], "s", color="tab:red",
                            label="clado" if r is rs[0] else None)
                continue
            c = np.array([np.pad(_curve(r), (0, longest - len(r["curve"])), mode="edge")
                          for r in per_seed.values() if r["curve"]])
            c[~np.isfinite(c)] = np.nan
            ax.plot(np.arange(1, longest + 1), np.nanmean(c, axis=0), label=m)
        for m in NATURAL:
            rs = _rows(runs, method=m, budget=lab)
            if rs:
                ax.plot(max([1] + [r["evaluations"] for r in rs]),
                        np.mean([r["kl"] for r in rs]), "x", label=m)
        if oracle_kl is not None:
            ax.axhline(oracle_kl, color="grey", ls="--", lw=1, label="oracle")
        ax.set(xscale="log", xlabel="evaluations (markers at 1: none)",
               ylabel="best -log KL found (mean over seeds)", title=title)
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny settings")
    parser.add_argument("--part", choices=("all", "oracle", "large", "report"), default="all")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--only", default=None,
                        help="oracle: net index (0, 1); large: budget label, e.g. '50%% to 3/3'")
    parser.add_argument("--note", default="", help="what was reduced, for the markdown")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(1)
    s = QUICK if args.quick else Settings()
    parts = CACHE / "allocation"
    parts.mkdir(parents=True, exist_ok=True)
    tag = "-quick" if args.quick else ""
    splits = get_splits("digits")
    for part, fn in (("oracle", oracle_part), ("large", large_part)):
        if args.part in ("all", part):
            slug = "" if args.only is None else "-" + "".join(
                ch if ch.isalnum() else "_" for ch in args.only)
            path = parts / f"{part}{slug}{tag}.json"
            start = time.perf_counter()

            def save(result, path=path, start=start):
                atomic_write_text(path, json.dumps(_clean({
                    "seconds": time.perf_counter() - start, "result": result})) + "\n")

            save(fn(splits, s, save, args.only))
    if args.part in ("all", "report"):
        res = {"summary": {}, "settings": {**asdict(s), "hutchinson": asdict(s.hutchinson)},
               "torch": torch.__version__, "note": ("quick smoke run. " if args.quick else "")
               + args.note}
        for f in sorted(parts.glob(f"oracle*{tag}.json")):
            if tag or not f.stem.endswith("-quick"):
                data = json.loads(f.read_text())
                res.setdefault("oracle", {}).update(data["result"])
                res.setdefault("seconds", {})[f.stem] = data["seconds"]
        for f in sorted(parts.glob(f"large*{tag}.json")):
            if tag or not f.stem.endswith("-quick"):
                data = json.loads(f.read_text())["result"]
                large = res.setdefault("large", {**data, "budgets": {}, "runs": []})
                large["budgets"].update(data["budgets"])
                large["runs"] += data["runs"]
                res.setdefault("seconds", {})[f.stem] = json.loads(f.read_text())["seconds"]
        res["summary"] = summarise(res)
        res["summary_notes"] = {k[1:]: res["summary"].pop(k) for k in list(res["summary"])
                                if k.startswith("_")}
        res = {"summary": res.pop("summary"), **res}
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "allocation.json",
                          json.dumps(_clean(res), indent=1, allow_nan=False) + "\n")
        atomic_write_text(args.out / "allocation.md", markdown(res))
        plot(res, args.out / "allocation.png")
        log.info("wrote %s", args.out / "allocation.md")


if __name__ == "__main__":
    main()
