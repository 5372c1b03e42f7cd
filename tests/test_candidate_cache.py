"""One shared, content-keyed candidate cache: reused across output folders, new keys on change."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import save_tiny_llama  # noqa: E402
from smpq.spec import QuantSpec  # noqa: E402
from smpq.transformer.run import RunSettings, run_ptq  # noqa: E402
from smpq.transformer.scores import candidate_key, parse_candidates  # noqa: E402

CANDS = "int2g32,int4g32,int8g32"
SMALL = RunSettings(block=32, calib_blocks=2, val_blocks=2, test_blocks=2)


def _files(cache) -> set[str]:
    return {p.name for p in (cache / "candidates").glob("*.safetensors")}


@pytest.mark.parametrize("backend", ["rtn", "gptq"])
def test_second_output_folder_builds_no_candidates(tmp_path, backend):
    model = save_tiny_llama(tmp_path / "llama")
    settings = replace(SMALL, cache_dir=str(tmp_path / "cache"))
    first = run_ptq(str(model), "avg_bits=4", backend, "uniform", tmp_path / "a", CANDS,
                    settings=settings)
    n_files = len(_files(tmp_path / "cache"))
    assert first["candidates_built"] == first["layers"] * 3 == n_files
    assert not (tmp_path / "a" / "cache").exists()  # nothing per output folder
    second = run_ptq(str(model), "avg_bits=4", backend, "uniform", tmp_path / "b", CANDS,
                     settings=settings)
    assert second["candidates_built"] == 0
    assert second["candidates_loaded"] == second["layers"] * 3
    assert len(_files(tmp_path / "cache")) == n_files
    assert json.loads((tmp_path / "b" / "policy.json").read_text()) == json.loads(
        (tmp_path / "a" / "policy.json").read_text())


@pytest.mark.parametrize("backend", ["rtn", "gptq"])
def test_changed_weight_rebuilds_what_depends_on_it(tmp_path, backend):
    model = save_tiny_llama(tmp_path / "llama")
    settings = replace(SMALL, cache_dir=str(tmp_path / "cache"))
    run_ptq(str(model), "avg_bits=4", backend, "uniform", tmp_path / "a", CANDS,
            settings=settings)
    before = _files(tmp_path / "cache")
    m = transformers.LlamaForCausalLM.from_pretrained(str(model))
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight[0, 0] += 0.125
    m.save_pretrained(str(model))
    again = run_ptq(str(model), "avg_bits=4", backend, "uniform", tmp_path / "b", CANDS,
                    settings=settings)
    # RTN candidates depend on their own layer only: one layer x 3 formats are new; GPTQ's
    # also on their Hessians, i.e. on every weight upstream: all are rebuilt
    new = 3 if backend == "rtn" else again["layers"] * 3
    assert again["candidates_built"] == new
    assert len(_files(tmp_path / "cache") - before) == new


def test_candidate_key_changes_with_one_weight_and_with_the_spec():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    int4, int2 = parse_candidates("int4g32,int2g32")[1], parse_candidates("int2g32,int4g32")[0]
    key = candidate_key(w, int4, "rtn")
    assert key == candidate_key(w.clone(), int4, "rtn")  # content, not identity
    bumped = w.clone()
    bumped[3, 17] = torch.nextafter(bumped[3, 17], torch.tensor(float("inf")))  # one ulp
    assert candidate_key(bumped, int4, "rtn") != key
    assert candidate_key(w.reshape(16, 32), int4, "rtn") != key  # same bytes, other shape
    assert candidate_key(w, int2, "rtn") != key
    assert candidate_key(w, QuantSpec(bits=4, symmetric=True, granularity="group",
                                      group_size=32), "rtn") != key
    assert candidate_key(w, int4, "gptq") != key
    assert candidate_key(w, int4, "rtn", "calib-digest") != key
