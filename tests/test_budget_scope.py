"""Budgets over the searched layers only (`metric@searched=...`), checked against hand sums.

The tiny model: l0 kept in float (pinned to None), l1 and l2 searched, l3 pinned at W8/A8,
plus 10 parameters outside the quantizable layers. Weights are symmetric per output channel
with 16-bit scales, so a layer's weight storage is params x bits + out_channels x 16.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from smpq.cnn.search.derive import derive_budgeted
from smpq.cnn.search.harness import SearchSpace, cost_tables
from smpq.cost import Budget, Constraint, LayerCost, ModelCost, Scope
from smpq.errors import SmpqError
from smpq.policy import Policy
from smpq.spec import LayerChoice, act_spec, weight_spec

W = [weight_spec(b) for b in (2, 4, 8)]
A = [act_spec(b) for b in (2, 4, 8)]
PAIRS = [LayerChoice(w, a) for w in W for a in A]
PINNED = {"l0": None, "l3": LayerChoice(weight_spec(8), act_spec(8))}


def tiny_cost() -> ModelCost:
    layers = [LayerCost("l0", "Conv2d", (4, 9), 36, 4, 1000),
              LayerCost("l1", "Linear", (8, 4), 32, 0, 320),
              LayerCost("l2", "Linear", (6, 8), 48, 6, 480),
              LayerCost("l3", "Linear", (2, 6), 12, 2, 12)]
    return ModelCost({lc.name: lc for lc in layers}, other_params=10)


def policy(l1: tuple[int, int], l2: tuple[int, int]) -> Policy:
    def ch(w, a):
        return LayerChoice(weight_spec(w), act_spec(a))

    return Policy({"l0": None, "l1": ch(*l1), "l2": ch(*l2), "l3": PINNED["l3"]})


P = policy((2, 4), (4, 2))
# hand sums for P over the searched layers l1, l2
P_BITOPS = 320 * 2 * 4 + 480 * 4 * 2                       # 6400
P_SIZE = (32 * 2 + 8 * 16) + (48 * 4 + 6 * 16 + 6 * 32)    # 192 + 480 = 672 bits
P_AVG = (32 * 2 + 48 * 4) / (32 + 48)                      # 3.2
# and over everything: l0 in float (32 bits, 32x32 BitOps), l3 at 8/8, 10 other parameters
FULL_BITOPS = 1000 * 32 * 32 + P_BITOPS + 12 * 8 * 8
FULL_SIZE = (36 * 32 + 4 * 32) + P_SIZE + (12 * 8 + 2 * 16 + 2 * 32) + 10 * 32


def test_scoped_metrics_are_the_hand_sums_over_the_searched_layers():
    cost = tiny_cost()
    got = cost.scoped_metrics(P, PINNED)
    assert got["bitops"] == P_BITOPS
    assert got["size"] == P_SIZE
    assert got["avg_bits"] == pytest.approx(P_AVG, rel=1e-12)
    full = cost.metrics(P)
    assert full["bitops"] == FULL_BITOPS and full["size"] == FULL_SIZE


def test_limits_and_check_of_a_scoped_budget():
    cost = tiny_cost()
    bud = Budget.parse("bitops@searched=uniform:3/3,size@searched=84B,avg_bits@searched=3")
    assert bud.limits(cost, PINNED) == {"bitops": 320 * 9 + 480 * 9, "size": 672, "avg_bits": 3}
    rows = {r["metric"]: r for r in bud.check(cost, P, PINNED)}
    assert rows["bitops"]["value"] == P_BITOPS and rows["bitops"]["slack"] == 7200 - P_BITOPS
    assert rows["bitops"]["ok"] and rows["size"]["ok"]  # size exactly at its limit
    assert rows["size"]["slack"] == 0
    assert rows["avg_bits"]["value"] == pytest.approx(P_AVG) and not rows["avg_bits"]["ok"]
    assert rows["bitops"]["constraint"] == "bitops@searched=uniform:3/3"
    # the same budget over the whole model is dominated by the float l0
    whole = Budget.parse("bitops=uniform:3/3").check(cost, P, PINNED)[0]
    assert whole["limit"] == 1000 * 32 * 32 + 7200 + 12 * 64 and whole["value"] == FULL_BITOPS


def test_resolve_moves_the_unsearched_layers_to_the_right_hand_side():
    cost = tiny_cost()
    bud = Budget.parse(f"bitops@searched=uniform:3/3,avg_bits@searched=3,size={FULL_SIZE // 8}B")
    r = bud.resolve(cost, {"l1": PAIRS, "l2": PAIRS}, PINNED, PINNED)
    assert r.unit_limits["bitops"] == pytest.approx(7200)
    assert r.limits["bitops"] == pytest.approx(7200 + 1000 * 1024 + 12 * 64)
    # avg_bits over l1, l2 <= 3  <=>  sum(params x bits) <= 240, in units of / total params
    assert r.unit_limits["avg_bits"] == pytest.approx(240 / 128)
    assert r.unit_limits["size"] == pytest.approx(P_SIZE)  # whole size, less l0, l3, the rest
    assert r.scoped_limits == {"bitops": 7200, "avg_bits": 3}
    assert not r.fits(cost, P)  # avg_bits 3.2 > 3
    assert [row["ok"] for row in r.check(cost, P)] == [True, False, True]


def test_derivation_under_a_scoped_budget_is_the_brute_force_optimum():
    cost = tiny_cost()
    bud = Budget.parse("bitops@searched=uniform:3/3,avg_bits@searched=3.5")
    rng = np.random.default_rng(3)
    scores = {n: (rng.normal(size=3), rng.normal(size=3)) for n in ("l1", "l2")}
    d = derive_budgeted(cost, scores, W, A, bud, PINNED, PINNED)
    best, best_score = None, -np.inf
    for i, j in itertools.product(range(9), repeat=2):  # every (l1, l2) pair of choices
        (w1, a1), (w2, a2) = divmod(i, 3), divmod(j, 3)
        bits = 320 * W[w1].bits * A[a1].bits + 480 * W[w2].bits * A[a2].bits
        avg = (32 * W[w1].bits + 48 * W[w2].bits) / 80
        score = scores["l1"][0][w1] + scores["l1"][1][a1] + scores["l2"][0][w2] + \
            scores["l2"][1][a2]
        if bits <= 7200 and avg <= 3.5 and score > best_score:
            best, best_score = (PAIRS[i], PAIRS[j]), score
    assert (d.policy.layers["l1"], d.policy.layers["l2"]) == best
    assert d.policy.layers["l0"] is None and d.policy.layers["l3"] == PINNED["l3"]


def test_the_oracle_tables_agree_with_the_hand_sums_on_every_policy():
    cost = tiny_cost()
    bud = Budget.parse("bitops@searched=uniform:3/3,avg_bits@searched=3.5")
    space = SearchSpace.build(cost, W, A, PINNED)
    tables = cost_tables(space, cost, bud)
    every = np.array(list(itertools.product(range(9), repeat=2)))
    for choice, ok in zip(every, tables.feasible(every), strict=True):
        (w1, a1), (w2, a2) = divmod(int(choice[0]), 3), divmod(int(choice[1]), 3)
        bits = 320 * W[w1].bits * A[a1].bits + 480 * W[w2].bits * A[a2].bits
        avg = (32 * W[w1].bits + 48 * W[w2].bits) / 80
        assert bool(ok) == (bits <= 7200 and avg <= 3.5), choice


def test_an_unreachable_scoped_limit_is_named_in_its_scope():
    cost = tiny_cost()
    bud = Budget.parse("bitops@searched=1000")  # cheapest: W2/A2 everywhere, 3200
    with pytest.raises(SmpqError, match=r"bitops@searched limit .* cheapest reachable 0\.003"):
        bud.resolve(cost, {"l1": PAIRS, "l2": PAIRS}, PINNED, PINNED)


def test_a_scoped_budget_needs_a_searched_layer():
    cost = tiny_cost()
    everything = {**PINNED, "l1": PAIRS[0], "l2": PAIRS[0]}
    with pytest.raises(SmpqError, match="at least one searched layer"):
        Budget.parse("avg_bits@searched=3").check(cost, P, everything)


@pytest.mark.parametrize("text,canonical", [
    ("bitops=uniform:3/3", "bitops=uniform:3/3"),
    ("bitops@all=uniform:3/3", "bitops=uniform:3/3"),
    ("bitops@searched=uniform:3/3", "bitops@searched=uniform:3/3"),
    (" bitops @ searched = 0.5*uniform:4/4", "bitops@searched=0.5*uniform:4/4"),
    ("size@searched=2KiB,avg_bits=3.5", "size@searched=2048B,avg_bits=3.5"),
    ("size=100", "size=100B"),
    ("bitops@searched=1234567.5", "bitops@searched=1234567.5"),
    ("eff_bits@searched=4.25", "eff_bits@searched=4.25"),
])
def test_string_form_round_trips(text, canonical):
    b = Budget.parse(text)
    assert str(b) == canonical
    assert Budget.parse(str(b)) == b


def test_parsed_scope():
    c = Budget.parse("bitops@searched=uniform:3/3").constraints[0]
    assert c.scope is Scope.SEARCHED and c.reference == (3, 3)
    assert Budget.parse("bitops=uniform:3/3").constraints[0].scope is Scope.ALL


@pytest.mark.parametrize("text", [
    "bitops@=uniform:3/3", "bitops@pinned=1e6", "bitops@searched@all=1", "@searched=3",
    "bitops@SEARCHED=1", "bitops@searched=", "bitops=uniform:3/3,bitops@searched=uniform:4/4",
])
def test_malformed_scope_is_a_user_error(text):
    with pytest.raises(SmpqError):
        Budget.parse(text)


def test_constraint_rejects_an_unknown_scope():
    with pytest.raises(SmpqError, match="unknown budget scope"):
        Constraint("bitops", value=1.0, scope="layers")
