"""The strategy registry: names per kind, errors, dispatch by compare, PTQSession and CLI."""

from __future__ import annotations

import itertools
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import typer
from torch import nn

from smpq import strategy
from smpq.cost import Budget, ModelCost, trace_costs
from smpq.errors import SmpqError
from smpq.policy import Policy
from smpq.spec import act_spec, weight_spec
from smpq.strategy import SearchProblem, StrategyResult

CNN = ("shapley-loop", "uniform", "hawq", "oat_high", "oat_low", "greedy", "random", "smpq",
       "dmpq", "oracle", "evolution", "clado")
TRANSFORMER = ("shapley-loop", "shapley", "shapley_pairwise", "shapley_literal", "uniform",
               "hessian", "fisher", "gradxdw", "relerr", "random", "local", "evopress")


@pytest.fixture
def registered():
    """Register test strategies; removed again afterwards so other tests see the built-ins."""
    added: list[tuple[str, str]] = []

    def add(name: str, kind: str, fn, listed: bool = True):
        strategy.register(name, kind=kind, listed=listed)(fn)
        added.append((name, kind))
        return fn

    yield add
    for name, kind in added:
        strategy.unregister(name, kind)


def test_every_strategy_is_registered_in_order():
    assert strategy.names("cnn") == CNN
    # the oracle and the equal-budget baselines (evolution, clado) are not listed
    assert strategy.names("cnn", listed_only=True) == CNN[:-3]
    assert strategy.names("transformer") == TRANSFORMER
    for kind, names in (("cnn", CNN), ("transformer", TRANSFORMER)):
        assert all(callable(strategy.get(n, kind)) for n in names)


def test_unknown_names_and_kinds_list_the_known_ones():
    with pytest.raises(SmpqError,
                       match="unknown method 'bogus'; known: shapley-loop, uniform, hawq, "):
        strategy.get("bogus", "cnn")
    with pytest.raises(SmpqError, match="known: shapley-loop, shapley, shapley_pairwise"):
        strategy.get("smpq", "transformer")
    with pytest.raises(SmpqError, match="unknown strategy kind 'rnn'; known: cnn, transformer"):
        strategy.names("rnn")


def test_registering_a_taken_name_fails():
    with pytest.raises(SmpqError, match="already registered"):
        strategy.register("hawq", kind="cnn")(lambda p: None)
    assert strategy.get("hawq", "cnn").__name__ == "hawq_strategy"


def test_importing_smpq_does_not_load_the_strategies():
    code = ("import sys, smpq, smpq.strategy; "
            "print(any(m in sys.modules for m in "
            "('smpq.cnn.search.baselines', 'smpq.transformer.strategies')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_problem_validates_its_parts():
    cost = ModelCost({})
    with pytest.raises(SmpqError, match="Budget"):
        SearchProblem(None, cost, "bitops=3", (weight_spec(4),))
    with pytest.raises(SmpqError, match="QuantSpec"):
        SearchProblem(None, cost, None, (4,))


@pytest.fixture(scope="module")
def mlp():
    import torch

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                        nn.Linear(8, 4))
    return net, trace_costs(net, torch.zeros(1, 1, 4, 4))


def test_compare_run_method_dispatches_a_registered_strategy(registered, mlp):
    from smpq.cnn.search import SearchConfig
    from smpq.compare import compare_methods, run_method

    net, cost = mlp
    seen: list[SearchProblem] = []

    def halves(p: SearchProblem) -> StrategyResult:
        seen.append(p)
        pol = Policy.uniform(p.cost.names, p.w_specs[0].bits, p.a_specs[-1].bits,
                             pinned=p.fixed)
        return StrategyResult("halves", pol, 1.5, evaluations=3)

    registered("test_halves", "cnn", halves)
    splits = SimpleNamespace(train="TRAIN", val="VAL", test="TEST")
    cfg = SearchConfig(w_bits=(2, 4), a_bits=(3, 8), seed=7)
    fixed = {cost.names[0]: None}
    res, outcome = run_method("test_halves", net, splits, cost, Budget.parse("avg_bits=4"),
                              fixed, cfg, n_evaluations=11)
    assert outcome is None and res.name == "halves" and res.evaluations == 3
    (p,) = seen
    assert p.model is net and (p.train, p.val) == ("TRAIN", "VAL")  # never the test split
    assert p.w_specs == (weight_spec(2), weight_spec(4))
    assert p.a_specs == (act_spec(3), act_spec(8))
    assert p.seed == 7 and p.fixed == fixed and str(p.budget) == "avg_bits=4"
    assert p.options["n_evaluations"] == 11 and p.options["config"] is cfg
    assert res.policy.bits_table()[cost.names[1]] == (2, 8)
    assert res.policy.layers[cost.names[0]] is None
    assert "test_halves" in compare_methods()
    with pytest.raises(SmpqError, match="unknown method 'nope'"):
        run_method("nope", net, splits, cost, Budget.parse("avg_bits=4"), fixed, cfg)


def test_registered_uniform_is_the_best_uniform_pair(mlp):
    """Through the registry, 'uniform' picks the most expensive pair under the budget
    (enumerated here) and names it as the comparison tables do."""
    net, cost = mlp
    bits = (2, 3, 4, 8)
    budget = Budget.parse("bitops=uniform:4/4")
    limit = budget.limits(cost, {})["bitops"]
    fits = [(cost.metrics(Policy.uniform(cost.names, w, a))["bitops"], -abs(w - a), w, a)
            for w, a in itertools.product(bits, bits)]
    want = max(f for f in fits if f[0] <= limit * (1 + 1e-9))[2:]
    problem = SearchProblem(net, cost, budget, [weight_spec(b) for b in bits],
                            [act_spec(b) for b in bits])
    res = strategy.get("uniform", "cnn")(problem)
    assert res.name == f"uniform {want[0]}/{want[1]}"
    assert set(res.policy.bits_table().values()) == {want}


def test_supernet_strategies_refuse_non_standard_candidates(mlp):
    net, cost = mlp
    grouped = weight_spec(4, "group", 8)  # not what the supernet builds from 4 bits
    problem = SearchProblem(net, cost, Budget.parse("avg_bits=4"), (grouped,), (act_spec(4),))
    for name in ("smpq", "dmpq", "uniform"):
        with pytest.raises(SmpqError, match="standard formats"):
            strategy.get(name, "cnn")(problem)


def _fake_session(n_groups: int, sizes: np.ndarray, limit: float):
    """Just what PTQSession.allocate and the allocators read (no model, no data)."""
    specs = tuple(weight_spec(b) for b in (2, 4, 8))
    cost = ModelCost.from_linears({f"l{g}": nn.Linear(4, 4) for g in range(n_groups)})
    costs = {"size": [sizes[g].astype(float) for g in range(n_groups)]}
    return SimpleNamespace(
        cost=cost, specs=specs, groups=[[f"l{g}"] for g in range(n_groups)], backend="rtn",
        model_name="fake", progress=lambda *a: None,
        budget_costs=lambda budget, resolved=None: (costs, {"size": limit}, None))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ptq_session_allocate_dispatches_through_the_registry(seed):
    """'hessian' allocates its scores by the exact MILP (brute force here), 'uniform' takes the
    highest level that fits for every group."""
    from smpq.transformer.run import PTQSession

    rng = np.random.default_rng(seed)
    n_groups = 4
    sizes = np.sort(rng.uniform(1, 10, (n_groups, 3)), axis=1)
    limit = float(sizes[:, 1].sum() + rng.uniform(-2, 2))
    session = _fake_session(n_groups, sizes, limit)
    scores = tuple(np.sort(rng.normal(size=3)) for _ in range(n_groups))
    budget = Budget.parse("avg_bits=4")  # the fake session's budget_costs ignores it
    feasible = [c for c in itertools.product(range(3), repeat=n_groups)
                if sum(sizes[g, k] for g, k in enumerate(c)) <= limit + 1e-9]
    best = max(feasible, key=lambda c: sum(scores[g][k] for g, k in enumerate(c)))
    alloc = PTQSession.allocate(session, "hessian", scores, budget)
    assert alloc.choice == best
    level = max((k for k in range(3) if sizes[:, k].sum() <= limit + 1e-9), default=None)
    if level is not None:
        assert PTQSession.allocate(session, "uniform", scores, budget) == (level,) * n_groups
    with pytest.raises(SmpqError, match="unknown method 'smpq'"):
        PTQSession.allocate(session, "smpq", scores, budget)


def test_ptq_session_allocate_uses_a_registered_transformer_strategy(registered):
    from smpq.transformer.run import PTQSession

    session = _fake_session(2, np.ones((2, 3)), 10.0)

    def top(p: SearchProblem) -> StrategyResult:
        choice = (len(p.w_specs) - 1,) * len(p.model.groups)
        return StrategyResult("top", Policy({}), 0.0,
                              detail=SimpleNamespace(allocation=choice))

    registered("test_top", "transformer", top)
    assert PTQSession.allocate(session, "test_top", None, Budget.parse("avg_bits=8")) == (2, 2)


def _option(command: str, name: str):
    from smpq.cli import app

    cmd = typer.main.get_command(app).commands[command]
    return next(p for p in cmd.params if p.name == name)


def test_cli_method_lists_come_from_the_registry(monkeypatch, capsys, registered, tmp_path):
    assert _option("compare", "methods").default == \
        "shapley-loop,uniform,hawq,oat_high,oat_low,greedy,random,smpq,dmpq"
    assert _option("ptq", "method").help == ("shapley-loop, shapley, shapley_pairwise, "
                                             "shapley_literal, "
                                             "uniform, hessian, fisher, gradxdw, relerr, "
                                             "random, local or evopress.")
    assert _option("compare", "methods").default == ",".join(
        strategy.names("cnn", listed_only=True))
    # a strategy registered later is accepted and listed by `smpq compare`
    registered("test_listed", "cnn", lambda p: None)
    from smpq.cli import main

    monkeypatch.setattr(sys, "argv", ["smpq", "compare", "--methods", "test_listed,bogus",
                                      "--checkpoint", str(tmp_path / "none")])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "unknown method(s) ['bogus']; known: shapley-loop, uniform, hawq, oat_high, oat_low, " \
           "greedy, random, smpq, dmpq, test_listed" in err.replace("\n", "")
