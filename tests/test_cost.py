import math

import pytest

from smpq.cost import Budget, Constraint, trace_costs, weight_bits
from smpq.errors import SmpqError
from smpq.policy import Policy
from smpq.spec import LayerChoice, QuantSpec


def _closed_form(tiny):
    # stem: 1->4, 3x3, 8x8 out; body: 4->8 groups=2, 3x3, stride 2, pad 2, dil 2 -> 4x4 out
    # proj: 8->8 1x1 on 4x4; fc: 128 -> 10
    return {
        "stem": 4 * 8 * 8 * (1 * 9),
        "body.0": 8 * 4 * 4 * (2 * 9),
        "proj": 8 * 4 * 4 * 8,
        "fc": 128 * 10,
    }


def test_macs_match_closed_form(tiny, images):
    cost = trace_costs(tiny, images)
    assert {n: lc.macs for n, lc in cost.layers.items()} == _closed_form(tiny)
    assert cost.layers["body.0"].params == 8 * 2 * 9
    assert cost.other_params == 0


def test_metrics_closed_form(tiny, images):
    cost = trace_costs(tiny, images)
    pol = Policy.uniform(cost.names, 4, 3)
    got = cost.metrics(pol)
    macs = _closed_form(tiny)
    assert got["bitops"] == sum(m * 4 * 3 for m in macs.values())
    assert got["avg_bits"] == pytest.approx(4.0)
    # per-channel symmetric: one 16-bit scale per output channel; biases at 32 bits
    size = 0
    for lc in cost.layers.values():
        size += lc.params * 4 + lc.weight_shape[0] * 16 + lc.bias * 32
    assert got["size"] == size


def test_scale_overhead_per_granularity():
    from smpq.cost import LayerCost

    lc = LayerCost("l", "Linear", (6, 10), 60, 0, 60)
    assert weight_bits(lc, None) == 60 * 32
    assert weight_bits(lc, QuantSpec(4)) == 60 * 4 + 16
    assert weight_bits(lc, QuantSpec(4, granularity="channel")) == 60 * 4 + 6 * 16
    # 10 inputs in groups of 4 -> 3 groups per row (last one padded)
    assert weight_bits(lc, QuantSpec(4, granularity="group", group_size=4)) == 240 + 18 * 16
    assert weight_bits(lc, QuantSpec(4, symmetric=False)) == 240 + (16 + 4)


@pytest.mark.parametrize(
    "text, metric, value, ratio, ref",
    [
        ("bitops=uniform:3/3", "bitops", None, 1.0, (3, 3)),
        ("bitops=0.5*uniform:4/4", "bitops", None, 0.5, (4, 4)),
        ("size=2KiB", "size", 2 * 1024 * 8, 1.0, None),
        ("size=1.5MB", "size", 1.5e6 * 8, 1.0, None),
        ("size=100", "size", 800, 1.0, None),
        ("avg_bits=3.5", "avg_bits", 3.5, 1.0, None),
        ("bitops=1.2e6", "bitops", 1.2e6, 1.0, None),
    ],
)
def test_budget_parse(text, metric, value, ratio, ref):
    c = Constraint.parse(text)
    assert (c.metric, c.value, c.ratio, c.reference) == (metric, value, ratio, ref)


@pytest.mark.parametrize(
    "text, msg",
    [
        ("flops=3", "unknown budget metric"),
        ("bitops", "look like"),
        ("bitops=uniform:9/3", "bits"),
        ("size=3GB", "unit"),
        ("avg_bits=-1", "positive"),
        ("avg_bits=abc", "cannot read"),
        ("avg_bits=3,avg_bits=4", "more than once"),
        ("", "empty"),
    ],
)
def test_budget_parse_errors(text, msg):
    with pytest.raises(SmpqError, match=msg):
        Budget.parse(text)


def test_budget_limits_and_slack(tiny, images):
    cost = trace_costs(tiny, images)
    pinned = {"stem": LayerChoice.bits(8, 8)}
    budget = Budget.parse("bitops=uniform:3/3,avg_bits=4")
    lim = budget.limits(cost, pinned)
    macs = _closed_form(tiny)
    expect = macs["stem"] * 64 + sum(m * 9 for n, m in macs.items() if n != "stem")
    assert lim["bitops"] == expect
    pol = Policy.uniform(cost.names, 2, 4, pinned=pinned)
    rows = {r["metric"]: r for r in budget.check(cost, pol, pinned)}
    assert rows["bitops"]["ok"] and rows["bitops"]["slack"] == expect - cost.metrics(pol)["bitops"]
    assert rows["avg_bits"]["ok"]


def test_infeasible_budget_names_cheapest(tiny, images):
    cost = trace_costs(tiny, images)
    cands = {n: [LayerChoice.bits(w, a) for w in (2, 4) for a in (4, 8)] for n in cost.names}
    cheapest = sum(lc.macs * 8 for lc in cost.layers.values())
    budget = Budget.parse(f"bitops={cheapest * 0.9}")
    with pytest.raises(SmpqError, match="cheapest reachable") as exc:
        budget.ensure_feasible(cost, cands)
    assert f"{cheapest / 1e6:.3f}" in str(exc.value)
    Budget.parse(f"bitops={cheapest}").ensure_feasible(cost, cands)
    assert math.isfinite(cheapest)


def test_eff_bits_counts_scale_overhead():
    from torch import nn

    from smpq.cost import ModelCost

    lin = {"a": nn.Linear(64, 32), "b": nn.Linear(32, 16, bias=False)}
    cost = ModelCost.from_linears(lin)
    g = QuantSpec(4, symmetric=False, granularity="group", group_size=32)
    pol = Policy({"a": LayerChoice(g, None), "b": LayerChoice(QuantSpec(8), None)})
    got = cost.metrics(pol)
    total = 64 * 32 + 32 * 16
    # a: 2048 weights x 4 bits + 32 rows x 2 groups x (16-bit scale + 4-bit zero point)
    expect = (2048 * 4 + 64 * 20 + 512 * 8 + 16) / total
    assert got["eff_bits"] == pytest.approx(expect)
    assert got["avg_bits"] == pytest.approx((2048 * 4 + 512 * 8) / total)
    assert cost.layers["a"].macs == 2048
