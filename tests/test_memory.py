"""Candidate weights read lazily from the cache: bit-exact swaps, bounded LRU, summary fields."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from smpq.memory import current_rss_bytes, model_bytes, peak_rss_bytes
from smpq.transformer.models import linear_layers
from smpq.transformer.scores import build_candidates, gradient_moments, parse_candidates
from smpq.transformer.tiny_lm import TinyLMConfig, build_tiny_lm
from smpq.transformer.values import WeightSwapper

CANDS = "int2g32,int3g32,int4g32,int8g32"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


@pytest.fixture(scope="module")
def lazy(tmp_path_factory):
    """The tiny LM's architecture (random weights), candidates built in memory and through
    the cache folder."""
    torch.manual_seed(0)
    model = build_tiny_lm(TinyLMConfig()).eval()
    linears = linear_layers(model)
    specs = parse_candidates(CANDS)
    eager = build_candidates(linears, specs, "rtn")
    cache = tmp_path_factory.mktemp("cache")
    cached = build_candidates(linears, specs, "rtn", cache_dir=cache)
    again = build_candidates(linears, specs, "rtn", cache_dir=cache)
    return model, linears, eager, cached, again


def _assignments(names, keys):
    yield {n: keys[i % len(keys)] for i, n in enumerate(names)}
    yield {n: keys[-1] for n in names[::2]}
    yield {n: keys[0] for n in names}
    yield {n: keys[(3 * i + 1) % len(keys)] for i, n in enumerate(names[1:])}
    yield {}


def test_cached_candidates_hold_no_weights_and_read_back_exactly(lazy):
    _, linears, eager, cached, again = lazy
    assert again.built == 0 and again.loaded == cached.built == eager.built
    for name in linears:
        layer = cached.weights[name]
        assert set(layer) == set(eager.weights[name]) == set(eager.keys)
        assert not layer._tensors  # nothing kept: every read goes to the file
        for key in eager.keys:
            a, b = layer[key], again.weights[name][key]
            assert torch.equal(a, eager.weights[name][key]) and torch.equal(a, b)
            assert a.data_ptr() != b.data_ptr()  # a fresh copy per read


@pytest.mark.parametrize("cache_bytes", [0, None, 1 << 30])
def test_lazy_swapper_equals_the_precomputed_one(lazy, cache_bytes):
    model, linears, eager, cached, _ = lazy
    floats = {n: m.weight.detach().clone() for n, m in linears.items()}
    lazy_sw = WeightSwapper(model, cached.loaders(), cache_bytes=cache_bytes)
    names = list(linears)
    for assignment in _assignments(names, eager.keys):
        lazy_sw.set(assignment)
        for n, m in linears.items():
            # independent reference: the in-memory build's tensor (or the float weight)
            want = eager.weights[n][assignment[n]] if n in assignment else floats[n]
            assert torch.equal(m.weight, want), (n, assignment.get(n))
        assert lazy_sw.assignment == {n: assignment.get(n) for n in names}
        assert sum(t.numel() * t.element_size() for t in lazy_sw._lru.values()) <= (
            lazy_sw.cache_bytes)
    lazy_sw.update({names[0]: eager.keys[1]})
    lazy_sw.restore()
    for n, m in linears.items():
        assert torch.equal(m.weight, floats[n])
        assert m.weight.data.data_ptr() == lazy_sw._float[n].data_ptr()  # the original back


def test_lru_rereads_only_what_it_dropped(lazy):
    model, linears, _, cached, _ = lazy
    name, key = next(iter(linears)), cached.keys[0]
    calls = []
    layer = cached.weights[name]

    def loader():
        calls.append(1)
        return layer[key]

    size = linears[name].weight.numel() * linears[name].weight.element_size()
    for budget, reads in ((0, 3), (size, 1)):
        calls.clear()
        sw = WeightSwapper(model, {name: {key: loader}}, cache_bytes=budget)
        for _ in range(3):
            sw.set({name: key})
            sw.restore()
        assert len(calls) == reads == sw.loads
        assert len(sw._lru) == (0 if budget == 0 else 1)


def test_lazy_candidate_of_the_wrong_shape_fails_on_swap(lazy):
    from smpq.errors import SmpqError

    model, linears, *_ = lazy
    name = next(iter(linears))
    sw = WeightSwapper(model, {name: {"bad": lambda: torch.zeros(3, 3)}})
    with pytest.raises(SmpqError, match="shape"):
        sw.set({name: "bad"})
    sw.restore()


def test_gradient_moments_computes_only_the_asked_ones(lazy):
    model, linears, *_ = lazy
    blocks = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))

    def loss(m, b):
        logits = m(b).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 b[:, 1:].reshape(-1))

    both, n = gradient_moments(model, linears, list(blocks.split(1)), loss)
    sq, _ = gradient_moments(model, linears, list(blocks.split(1)), loss, keys=("grad_sq",))
    assert n == 2
    name = next(iter(linears))
    w = linears[name].weight
    grads = [torch.autograd.grad(loss(model, b), w)[0] for b in blocks.split(1)]
    assert set(sq[name]) == {"grad_sq"} and set(both[name]) == {"grad", "grad_sq"}
    torch.testing.assert_close(sq[name]["grad_sq"], torch.stack(grads).square().mean(0))
    torch.testing.assert_close(both[name]["grad"], torch.stack(grads).mean(0))
    assert all(m.weight.grad is None for m in linears.values())


def test_memory_readings():
    assert peak_rss_bytes() >= (current_rss_bytes() or 0) > 0
    m = torch.nn.Linear(4, 3)
    assert model_bytes(m) == (12 + 3) * 4


def test_summary_reports_peak_rss_over_model(tmp_path):
    pytest.importorskip("transformers")
    from conftest import save_tiny_llama
    from smpq.transformer.models import load_local
    from smpq.transformer.run import RunSettings, run_ptq

    folder = save_tiny_llama(tmp_path / "llama")
    settings = RunSettings(block=32, calib_blocks=2, val_blocks=2, test_blocks=2)
    s = run_ptq(str(folder), "avg_bits=4", "rtn", "uniform", tmp_path / "out",
                "int2g32,int4g32,int8g32", settings=replace(settings,
                                                            cache_dir=str(tmp_path / "c")))
    params = load_local(folder)[0].parameters()
    assert s["model_bytes"] == sum(p.numel() * p.element_size() for p in params)
    assert isinstance(s["peak_rss_bytes"], int) and 0 < s["peak_rss_bytes"] <= peak_rss_bytes()
    assert s["peak_rss_over_model"] == pytest.approx(s["peak_rss_bytes"] / s["model_bytes"])
