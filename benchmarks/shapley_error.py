"""RMSE of Shapley estimators against known truth, as a function of value evaluations.

Why: SMPQ spends one supernet validation pass per coalition, so the estimator that reaches a
given accuracy in fewer evaluations wins. Two synthetic games with known Shapley values:

* ``smooth40`` -- 40 players, additive + sparse pairwise + sparse triple terms (a Harsanyi
  dividend game), truth in closed form: phi_i = w_i + sum_k J_ik / 2 + sum_{T containing i} K_T / 3.
  No collapse, so tau=0.5 truncation is a pure bias/variance trade here.
* ``collapse18`` -- 6 layers x 3 bit-width candidates, accuracy drops to chance as soon as a layer
  has no candidate left (the SMPQ situation); truth by exact enumeration of 2^18 coalitions.

Methods at equal evaluation budgets: plain / antithetic / truncated (tau=0.5; walked in chunks
of 8, the default, and of 1, which saves the most evaluations but serialises the evaluator)
permutation sampling from ``smpq.shapley``, and shapiq's PermutationSamplingSV and KernelSHAP
when shapiq is installed.
Writes ``benchmarks/results/shapley_error.{json,md}`` atomically. Run:
``.venv/bin/python benchmarks/shapley_error.py [--seeds 10]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    from smpq.shapley import ShapleyConfig, exact_shapley, permutation_shapley
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from smpq.shapley import ShapleyConfig, exact_shapley, permutation_shapley

log = logging.getLogger("shapley_error")
RESULTS = Path(__file__).resolve().parent / "results"
TAU = 0.5  # Shapley-NAS truncation threshold


@dataclass(frozen=True)
class Game:
    name: str
    n: int
    value_fn: Callable[[np.ndarray], np.ndarray]
    truth: np.ndarray
    budgets: tuple[int, ...]
    note: str


def smooth_game(n: int = 40, seed: int = 0) -> Game:
    """Polynomial game with closed-form Shapley values (each dividend split equally)."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.005, 0.03, n)
    j = np.triu(rng.normal(0.0, 0.004, (n, n)) * (rng.random((n, n)) < 0.15), 1)
    j = j + j.T
    triples = np.array([rng.choice(n, 3, replace=False) for _ in range(80)])
    k = rng.normal(0.0, 0.006, len(triples))
    truth = w + j.sum(axis=1) / 2
    np.add.at(truth, triples.ravel(), np.repeat(k / 3, 3))

    def value_fn(masks: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(masks).astype(float)
        return 0.1 + x @ w + 0.5 * np.einsum("bi,ik,bk->b", x, j, x) + x[:, triples].prod(2) @ k

    return Game("smooth40", n, value_fn, truth, (160, 640, 2560, 10240),
                "additive + pairwise + triple terms, closed-form truth, no collapse")


def collapse_game(layers: int = 6, candidates: int = 3, seed: int = 0) -> Game:
    """Accuracy = chance if any layer lost all candidates, else a product of layer qualities."""
    rng = np.random.default_rng(seed)
    quality = rng.uniform(0.80, 0.99, (layers, candidates))
    n = layers * candidates

    def value_fn(masks: np.ndarray) -> np.ndarray:
        m = np.atleast_2d(masks).reshape(-1, layers, candidates)
        best = np.where(m, quality, 0.0).max(axis=2) + 0.01 * np.maximum(m.sum(2) - 1, 0)
        alive = m.any(axis=2).all(axis=1)
        return np.where(alive, 0.1 + 0.8 * np.minimum(best.prod(axis=1), 1.0), 0.1)

    truth = exact_shapley(value_fn, n).estimate
    return Game("collapse18", n, value_fn, truth, (72, 288, 1152, 4608),
                f"{layers} layers x {candidates} candidates, chance level once a layer is empty, "
                "truth by exact enumeration")


def supernet_game(seed: int = 0) -> Game:
    """The real SMPQ game on a small supernet: v(S) = validation accuracy with only S active.

    An MLP (hidden 32, 16) trained on digits; its three layers hold W{2,8} x A{4,8} (12
    players, Shapley-NAS semantics: no renormalisation, empty layer outputs zero). All 4,096
    coalitions are evaluated once, so the truth is exact and the samplers read a table.
    """
    import torch

    from smpq.apply import calibrate_
    from smpq.cnn.data import get_splits
    from smpq.cnn.models import build_model
    from smpq.cnn.pipeline import calibration_batches
    from smpq.cnn.supernet import Supernet
    from smpq.cnn.train import TrainConfig, train
    from smpq.cnn.values import SubsetValue, stack_dataset
    from smpq.spec import act_spec, weight_spec

    torch.set_num_threads(1)
    splits = get_splits("digits")
    model = build_model("mlp", splits.input_shape, splits.num_classes, seed=seed, hidden=(32, 16))
    train(model, splits.train, TrainConfig(epochs=5, seed=seed))
    net = Supernet(model, [weight_spec(2), weight_spec(8)], [act_spec(4), act_spec(8)])
    calibrate_(model, calibration_batches(splits.train, 256))
    x, y = stack_dataset(splits.val)
    value = SubsetValue(net, x, y, metric="acc")
    n = net.n_players
    codes = np.arange(2**n)
    masks = ((codes[:, None] >> np.arange(n)) & 1).astype(bool)
    table = value(masks)
    weights = 1 << np.arange(n)

    def value_fn(m: np.ndarray) -> np.ndarray:
        return table[np.atleast_2d(m).astype(np.int64) @ weights]

    truth = exact_shapley(value_fn, n).estimate
    return Game("supernet12", n, value_fn, truth, (48, 192, 768, 3072),
                "real supernet (MLP on digits, 3 layers x W{2,8} x A{4,8}), v = validation "
                "accuracy, truth by exact enumeration of all 4,096 coalitions")


def run_ours(game: Game, budget: int, seed: int, **kw: object) -> tuple[np.ndarray, int]:
    # Cap permutations too: once memoisation has seen every coalition a (truncated) sampler
    # can reach, new permutations cost no evaluations and the budget alone would never stop it.
    cfg = ShapleyConfig(permutations=2 * budget, max_evaluations=budget, seed=seed, **kw)
    res = permutation_shapley(game.value_fn, game.n, cfg)
    return res.estimate, res.evaluations


def shapiq_runner(cls_name: str) -> Callable[..., tuple[np.ndarray, int]]:
    def run(game: Game, budget: int, seed: int) -> tuple[np.ndarray, int]:
        import shapiq

        calls = [0]

        def counted(masks: np.ndarray) -> np.ndarray:
            calls[0] += np.atleast_2d(masks).shape[0]
            return game.value_fn(masks)

        approx = getattr(shapiq, cls_name)(n=game.n, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = approx.approximate(budget, counted)
        return np.array([values[(i,)] for i in range(game.n)]), calls[0]

    return run


def methods(with_shapiq: bool) -> dict[str, Callable[..., tuple[np.ndarray, int]]]:
    out: dict[str, Callable[..., tuple[np.ndarray, int]]] = {
        "plain": lambda g, b, s: run_ours(g, b, s),
        "antithetic": lambda g, b, s: run_ours(g, b, s, antithetic=True),
        f"truncated tau={TAU}": lambda g, b, s: run_ours(g, b, s, truncation=TAU),
        f"truncated tau={TAU} chunk=1": lambda g, b, s: run_ours(
            g, b, s, truncation=TAU, truncation_chunk=1
        ),
    }
    if with_shapiq:
        out["shapiq PermutationSamplingSV"] = shapiq_runner("PermutationSamplingSV")
        out["shapiq KernelSHAP"] = shapiq_runner("KernelSHAP")
    return out


def shapiq_status() -> str | None:
    """None when shapiq is usable, else the reason it is skipped."""
    try:
        import shapiq  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means skip
        return f"shapiq not importable ({type(exc).__name__}: {exc}); shapiq rows skipped"
    return None


def evaluate(games: list[Game], seeds: int, with_shapiq: bool) -> list[dict]:
    rows = []
    for game in games:
        for budget in game.budgets:
            plain_rmse = None
            for name, run in methods(with_shapiq).items():
                start = time.perf_counter()
                rmse, used = [], []
                for seed in range(seeds):
                    estimate, evaluations = run(game, budget, seed)
                    rmse.append(float(np.sqrt(np.mean((estimate - game.truth) ** 2))))
                    used.append(evaluations)
                mean = float(np.mean(rmse))
                plain_rmse = mean if name == "plain" else plain_rmse
                rows.append({
                    "game": game.name, "method": name, "budget": budget,
                    "evaluations": float(np.mean(used)), "rmse_mean": mean,
                    "rmse_std": float(np.std(rmse, ddof=1)) if seeds > 1 else 0.0,
                    "ratio_to_plain": mean / plain_rmse if plain_rmse else None,
                    "seconds": time.perf_counter() - start,
                })
                log.info("%s %s budget=%d rmse=%.3g", game.name, name, budget, mean)
    return rows


def markdown(rows: list[dict], games: list[Game], seeds: int, note: str | None) -> str:
    lines = ["# Shapley estimator error vs value evaluations", "",
             f"RMSE over players against the true Shapley values, mean ± std over {seeds} seeds. "
             "`evaluations` = mean real value-function calls used (budget is a hard cap; "
             "ours starts a permutation only if its worst case fits).", ""]
    if note:
        lines += [f"Note: {note}", ""]
    for game in games:
        lines += [f"## {game.name} (n={game.n}): {game.note}", "",
                  "| method | budget | evaluations | RMSE mean ± std | ratio to plain |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for r in (r for r in rows if r["game"] == game.name):
            ratio = f"{r['ratio_to_plain']:.2f}" if r["ratio_to_plain"] is not None else "-"
            lines.append(f"| {r['method']} | {r['budget']} | {r['evaluations']:.0f} | "
                         f"{r['rmse_mean']:.2e} ± {r['rmse_std']:.1e} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.",
                                     delete=False, encoding="utf-8") as tmp:
        tmp.write(text)
        tmp.flush()
        os.fsync(tmp.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp.name, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared
    os.replace(tmp.name, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--no-shapiq", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    note = "skipped by --no-shapiq" if args.no_shapiq else shapiq_status()
    started = time.perf_counter()
    games = [smooth_game(), collapse_game(), supernet_game()]
    rows = evaluate(games, args.seeds, with_shapiq=note is None)
    report = {
        "seeds": args.seeds, "tau": TAU, "shapiq_note": note,
        "games": [{"name": g.name, "n": g.n, "note": g.note, "budgets": list(g.budgets),
                   "value_full": float(g.value_fn(np.ones((1, g.n), bool))[0]),
                   "value_empty": float(g.value_fn(np.zeros((1, g.n), bool))[0])}
                  for g in games],
        "rows": rows, "seconds": time.perf_counter() - started,
    }
    md = markdown(rows, games, args.seeds, note)
    write_atomic(args.out_dir / "shapley_error.json", json.dumps(report, indent=2) + "\n")
    write_atomic(args.out_dir / "shapley_error.md", md)
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
