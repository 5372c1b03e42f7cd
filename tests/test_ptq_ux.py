"""What a `smpq ptq` user waits for: float references cached across runs, progress per stage
(plain lines when stderr is not a terminal), the report's lines, --method autoscheme's
refusal and --workers/--ray-address. A tiny random Llama folder (byte tokenizer)."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from conftest import save_tiny_llama  # noqa: E402
from smpq.transformer import values  # noqa: E402
from smpq.transformer.run import RunSettings, run_ptq  # noqa: E402

CANDS = "int2g32,int4g32,int8g32"
SMALL = RunSettings(block=32, calib_blocks=4, val_blocks=4, test_blocks=4)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), layers=1, max_positions=64)


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = values.float_reference

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(values, "float_reference", counted)
    return calls


def test_second_run_computes_no_float_reference(monkeypatch, folder, tmp_path):
    settings = replace(SMALL, cache_dir=str(tmp_path / "cache"))
    calls = _counting(monkeypatch)
    first = run_ptq(str(folder), "avg_bits=3", method="fisher", out=tmp_path / "a",
                    candidates=CANDS, settings=settings)
    assert len(calls) == 3  # calib, val, test
    entries = sorted((tmp_path / "cache" / "references").glob("*.safetensors"))
    assert len(entries) == 3
    calls.clear()
    second = run_ptq(str(folder), "avg_bits=3", method="uniform", out=tmp_path / "b",
                     candidates=CANDS, settings=settings)
    assert calls == []  # another method and folder: no float forward
    assert second["float"]["test_perplexity"] == first["float"]["test_perplexity"]
    assert second["references"] == {"computed": 0, "cached": 3}
    # the cached references equal freshly computed ones (an independent full forward)
    from smpq.transformer.run import PTQSession

    s = PTQSession(str(folder), candidates=CANDS, settings=settings)
    model = transformers.LlamaForCausalLM.from_pretrained(str(folder)).eval()
    fresh = values.float_reference(model, s.refs["test"].blocks, batch_size=s.settings.batch_size)
    torch.testing.assert_close(s.refs["test"].logp, fresh.logp, rtol=0, atol=1e-5)
    assert s.refs["test"].nll == pytest.approx(fresh.nll, abs=1e-6)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_reference_entry_is_recomputed(monkeypatch, folder, tmp_path, damage):
    from smpq.transformer.run import PTQSession

    settings = replace(SMALL, cache_dir=str(tmp_path / "cache"))
    calls = _counting(monkeypatch)
    good = PTQSession(str(folder), candidates=CANDS, settings=settings)
    entries = sorted((tmp_path / "cache" / "references").glob("*.safetensors"))
    victim = entries[0]
    raw = bytearray(victim.read_bytes())
    if damage == "flip":
        raw[-5] ^= 0xFF  # inside the last tensor's bytes: loads, but the checksum fails
    else:
        raw = raw[: len(raw) // 2]
    victim.write_bytes(bytes(raw))
    calls.clear()
    again = PTQSession(str(folder), candidates=CANDS, settings=settings)
    assert len(calls) == 1 and again.references_computed == 1
    for k in good.refs:
        assert torch.equal(again.refs[k].logp, good.refs[k].logp), k
    calls.clear()
    PTQSession(str(folder), candidates=CANDS, settings=settings)  # rewritten: now trusted
    assert calls == []


def test_other_text_or_model_is_another_key(monkeypatch, folder, tmp_path):
    from smpq.transformer.run import PTQSession

    settings = replace(SMALL, cache_dir=str(tmp_path / "cache"))
    calls = _counting(monkeypatch)
    PTQSession(str(folder), candidates=CANDS, settings=settings)
    calls.clear()
    PTQSession(str(folder), candidates=CANDS, settings=replace(settings, test_blocks=5))
    assert len(calls) == 1  # only the test split changed
    other = save_tiny_llama(tmp_path / "other", layers=1, max_positions=64)
    with torch.no_grad():
        m = transformers.LlamaForCausalLM.from_pretrained(str(other))
        m.lm_head.weight.mul_(1.01)
        m.save_pretrained(str(other))
    calls.clear()
    PTQSession(str(other), candidates=CANDS, settings=settings)
    assert len(calls) == 3


def _tiny_bert(folder):
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,()_'`*-:")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters)]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    transformers.BertTokenizer(vocab_file=str(folder / "vocab.txt")).save_pretrained(str(folder))
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(str(folder))
    return folder


def test_encoder_references_are_cached(monkeypatch, tmp_path):
    from smpq.transformer.run import PTQSession

    bert = _tiny_bert(tmp_path / "bert")
    settings = replace(SMALL, calib_pairs=4, val_pairs=4, test_pairs=4, max_length=16,
                       cache_dir=str(tmp_path / "cache"))
    calls: list[int] = []
    real = values.embed
    monkeypatch.setattr(values, "embed", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = PTQSession(str(bert), candidates=CANDS, settings=settings)
    assert len(calls) == 5 and first.references_computed == 5  # 3 splits + queries, documents
    calls.clear()
    second = PTQSession(str(bert), candidates=CANDS, settings=settings)
    assert calls == [] and second.references_computed == 0
    model = first.model
    for k in first.refs:  # cached embeddings = a fresh forward of the float model
        torch.testing.assert_close(second.refs[k].embeddings,
                                   real(model, second.refs[k].inputs), rtol=0, atol=1e-6)
    torch.testing.assert_close(second.retrieval.scores, first.retrieval.scores, rtol=0, atol=1e-6)


# -- progress ------------------------------------------------------------------------------

class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_plain_stages_hold_the_first_seconds_then_report_with_times():
    from smpq.cli import PlainStages

    lines: list[str] = []
    clock = _Clock()
    p = PlainStages(lines.append, clock=clock, quiet=10.0, every=30.0)
    p("load", 0, 1)
    clock.t = 2.0
    p("data", 0, 1)
    assert lines == []  # a mistake refused now would print its error alone
    clock.t = 12.0
    p("search", 0, 100)
    assert [x.split("] ")[1] for x in lines] == [
        "load: started", "load: done in 2.0 s", "data: started", "data: done in 10.0 s",
        "search: started (100 steps)"]
    for step in range(1, 50):  # 49 evaluations of 1 s each: a line every 30 s, with an ETA
        clock.t = 12.0 + step
        p("search", step, 100)
    periodic = [x for x in lines if "/100" in x]
    assert len(periodic) == 1 and periodic[0].endswith("search: 30/100 after 30 s, eta 70 s")
    clock.t = 70.0
    p.close()
    assert lines[-1] == "[   70.0s] search: done in 58.0 s"


def test_a_silent_stage_still_gets_a_line_every_period():
    from smpq.cli import PlainStages

    lines: list[str] = []
    clock = _Clock()
    p = PlainStages(lines.append, clock=clock, quiet=10.0, every=30.0)
    p("load", 0, 1)  # e.g. a first-use training: no steps for minutes
    clock.t = 5.0
    p.tick()
    assert lines == []  # still the quiet period
    clock.t = 11.0
    p.tick()
    assert [x.split("] ")[1] for x in lines] == ["load: started"]
    clock.t = 31.0
    p.tick()
    clock.t = 45.0
    p.tick()
    clock.t = 61.5
    p.tick()
    assert [x.split("] ")[1] for x in lines][1:] == ["load: still running after 31 s",
                                                      "load: still running after 62 s"]


def test_a_fast_refusal_prints_only_its_error_and_a_normal_end_flushes():
    from smpq.cli import PlainStages

    lines: list[str] = []
    clock = _Clock()
    p = PlainStages(lines.append, clock=clock)
    p("load", 0, 1)
    assert lines == []  # an exception now leaves nothing printed
    clock.t = 1.0
    p.close()
    assert [x.split("] ")[1] for x in lines] == ["load: started", "load: done in 1.0 s"]


def test_local_reports_under_its_name_and_evaluate_has_steps(folder, tmp_path):
    seen: list[tuple[str, int, int]] = []
    s = run_ptq(str(folder), "avg_bits=3", method="local", out=tmp_path / "o",
                candidates=CANDS, settings=replace(SMALL, cache_dir=str(tmp_path / "c")),
                options={"n_evaluations": 4},
                progress=lambda stage, done, total: seen.append((stage, done, total)))
    stages = [x[0] for x in seen]
    assert "local" in stages and "shapley-loop" not in stages
    assert [x for x in seen if x[0] == "evaluate"] == [("evaluate", 0, 2), ("evaluate", 1, 2),
                                                        ("evaluate", 2, 2)]
    assert s["search_cost"]["evaluations"] <= 4


def test_one_forward_gives_the_test_kl_and_perplexity(folder):
    from smpq.transformer.run import PTQSession

    s = PTQSession(str(folder), candidates=CANDS,
                   settings=replace(SMALL, cache_dir=str(folder / "c")))
    model = s.model
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(0.7)  # some distance from float
    kl, nll = values.kl_and_nll(model, s.refs["test"])
    assert kl > 0
    assert kl == pytest.approx(values.kl_to_float(model, s.refs["test"]), rel=1e-12)
    assert nll == pytest.approx(values.nll(model, s.refs["test"].blocks, 8), rel=1e-12)


# -- the report ----------------------------------------------------------------------------

def _cli(monkeypatch, capsys, *args):
    import sys

    from smpq.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["smpq", "ptq", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def _expected_binding(folder, out) -> list[str]:
    """Brute force: avg_bits binds when every single-group upgrade of the written policy
    breaks the budget (Budget.check on the whole policy, not the group costs)."""
    from smpq.cost import Budget
    from smpq.policy import Policy
    from smpq.spec import LayerChoice
    from smpq.transformer.inputs import model_cost
    from smpq.transformer.mixed import parse_candidates
    from smpq.transformer.models import arch_of, share_groups

    model = transformers.LlamaForCausalLM.from_pretrained(str(folder))
    linears, cost = model_cost(model)
    groups = share_groups(list(linears), arch_of(model), True)
    specs = parse_candidates(CANDS)
    policy = Policy.load(out / "policy.json")
    budget = Budget.parse("avg_bits=3")
    assert all(r["ok"] for r in budget.check(cost, policy))
    for g in groups:
        bits = policy.layers[g[0]].weight.bits
        for spec in specs:
            if spec.bits > bits:
                up = Policy({**policy.layers, **{n: LayerChoice(spec, None) for n in g}})
                if all(r["ok"] for r in budget.check(cost, up)):
                    return []
    return ["avg_bits"]


def test_piped_run_reports_stages_groups_binding_and_test_size(monkeypatch, capsys, folder,
                                                               tmp_path):
    bindings = []
    for method in ("fisher", "local"):
        out = tmp_path / method
        code, stdout, err = _cli(monkeypatch, capsys, "--model", folder, "--method", method,
                                 "--evaluations", "4", "--candidates", CANDS, "--budget",
                                 "avg_bits=3", "--cache", tmp_path / "cache", "--out", out)
        assert code in (0, None), err
        for stage in ("load", "data", "float references", "evaluate", method):
            assert any(f"] {stage}: done in " in x for x in err.splitlines()), (stage, err)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["groups"] == 4 and summary["layers"] == 7
        assert "formats of 4 share groups (7 layers): " in stdout
        blocks = summary["test_size"]
        assert blocks == [64, 128]
        assert "; test text 64x128 tokens)" in stdout
        expected = _expected_binding(folder, out)
        assert summary["binding"] == expected, method
        assert f"binding: {', '.join(expected) or 'none'};" in stdout
        bindings.append(expected)
    assert ["avg_bits"] in bindings  # the check can tell a used-up budget


# -- --method autoscheme -------------------------------------------------------------------

def _never(*args, **kwargs):
    raise AssertionError("the model was loaded before the input was refused")


def test_autoscheme_without_auto_round_is_one_line_before_loading(monkeypatch, capsys, folder,
                                                                  tmp_path):
    import importlib.util

    from smpq.transformer import session as session_mod

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "auto_round" else real(name, *a))
    monkeypatch.setattr(session_mod, "_load", _never)
    code, _, err = _cli(monkeypatch, capsys, "--model", folder, "--method", "autoscheme",
                        "--candidates", CANDS, "--out", tmp_path / "o")
    assert code == 2 and err.startswith("error:") and "scripts/install_peers.sh" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_autoscheme_runs_through_ptq(monkeypatch, capsys, folder, tmp_path):
    """With AutoScheme's answer stubbed (auto-round is not installed here): its per-layer
    allocation is evaluated, written and reported like any method's."""
    import importlib.util

    from smpq.transformer import peers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "auto_round" else real(name, *a))
    with pytest.raises(Exception, match="one avg_bits target"):
        peers.check_autoscheme(__import__("smpq.cost").cost.Budget.parse("size=1MB"), CANDS)

    def fake(session, targets):  # q_proj richer than its fused k/v: groups not kept
        a = {n: ("int4g32" if n.endswith("q_proj") else "int2g32") for n in session.linears}
        return {targets[0]: a}, {"seconds": 1.5, "forward_passes": None,
                                 "backward_passes": None}

    monkeypatch.setattr(peers, "autoscheme_allocation", fake)
    code, stdout, err = _cli(monkeypatch, capsys, "--model", folder, "--method", "autoscheme",
                             "--candidates", CANDS, "--budget", "avg_bits=3", "--cache",
                             tmp_path / "c", "--out", tmp_path / "o")
    assert code in (0, None), err
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["method"] == "autoscheme" and s["choice"] == {"int2g32": 6, "int4g32": 1,
                                                           "int8g32": 0}
    assert all(r["ok"] for r in s["budget_check"]) and s["binding"] == []
    assert "formats of 7 layers (per layer" in stdout and "autoscheme / rtn" in stdout
    from smpq.policy import Policy

    pol = Policy.load(tmp_path / "o" / "policy.json")
    assert pol.layers["model.layers.0.self_attn.q_proj"].weight.bits == 4


# -- --workers / --ray-address -------------------------------------------------------------

@pytest.mark.parametrize("args, msg", [
    (["--method", "fisher", "--workers", "2"],
     "--workers/--ray-address apply to shapley, shapley_pairwise"),
    (["--method", "local", "--ray-address", "127.0.0.1:1"], "local evaluates in this process"),
    (["--method", "shapley", "--ray-address", "127.0.0.1:1"], "127.0.0.1:1"),
])
def test_workers_flags_are_checked_before_loading(monkeypatch, capsys, folder, tmp_path, args,
                                                  msg):
    from smpq.transformer import session as session_mod

    monkeypatch.setattr(session_mod, "_load", _never)
    code, _, err = _cli(monkeypatch, capsys, "--model", folder, "--out", tmp_path / "o", *args)
    assert code == 2 and err.startswith("error:") and msg in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_shapley_values_go_through_the_evaluator(folder, tmp_path):
    from smpq.evaluator import LocalEvaluator
    from smpq.transformer.mixed import MixedConfig

    made: list[LocalEvaluator] = []

    def factory(task):
        made.append(LocalEvaluator(task))
        return made[-1]

    settings = replace(SMALL, cache_dir=str(tmp_path / "c"),
                       shapley=MixedConfig(permutations=2, tolerance=None))
    here = run_ptq(str(folder), "avg_bits=3", method="shapley", out=tmp_path / "a",
                   candidates=CANDS, settings=settings)
    there = run_ptq(str(folder), "avg_bits=3", method="shapley", out=tmp_path / "b",
                    candidates=CANDS, settings=settings, scale=factory)
    assert len(made) == 1 and made[0].calls > 0  # the game's values came from the evaluator
    assert there["choice"] == here["choice"]
    assert there["metrics"] == pytest.approx(here["metrics"], rel=1e-9)


@pytest.mark.parametrize("guided", [False, True])
def test_shapley_loop_batches_go_through_the_evaluator(folder, tmp_path, guided):
    from smpq.evaluator import LocalEvaluator

    made: list[LocalEvaluator] = []

    def factory(task):
        made.append(LocalEvaluator(task))
        return made[-1]

    settings = replace(SMALL, cache_dir=str(tmp_path / "c"))
    opts = {"n_evaluations": 12, "top_k": 2, "guided": guided}
    here = run_ptq(str(folder), "avg_bits=3", out=tmp_path / "a", candidates=CANDS,
                   settings=settings, options=opts)
    there = run_ptq(str(folder), "avg_bits=3", out=tmp_path / "b", candidates=CANDS,
                    settings=settings, options=opts, scale=factory)
    assert len(made) == 1 and made[0].calls > 0  # batches were valued by the evaluator
    if not guided:  # the engine alone: the same values, so the same search
        assert there["choice"] == here["choice"]
        assert there["metrics"] == pytest.approx(here["metrics"], rel=1e-9)
    cost = there["search_cost"]
    assert cost["evaluations"] <= 12 + 4 and cost["block_tokens"] > 0
