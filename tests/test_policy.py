import json

import pytest

from smpq.errors import SmpqError
from smpq.policy import Policy
from smpq.spec import Granularity, LayerChoice, QuantSpec

NAMES = ["stem", "body.0", "proj", "fc"]


def test_json_round_trip(tmp_path):
    pol = Policy.uniform(NAMES, 4, 3, pinned={"stem": LayerChoice.bits(8, 8), "fc": None})
    path = tmp_path / "p.json"
    pol.save(path)
    back = Policy.load(path)
    assert back == pol
    assert back.bits_table() == {"stem": (8, 8), "body.0": (4, 3), "proj": (4, 3), "fc": (32, 32)}
    assert json.loads(path.read_text())["version"] == 1


def test_shorthand_and_full_specs():
    pol = Policy.from_dict({"layers": {
        "stem": "8/8",
        "fc": {"weight": {"bits": 4, "granularity": "group", "group_size": 16},
               "act": {"bits": 8, "fmt": "int", "symmetric": False}},
    }})
    assert pol.layers["stem"] == LayerChoice.bits(8, 8)
    assert pol.layers["fc"].weight == QuantSpec(4, granularity=Granularity.GROUP, group_size=16)


@pytest.mark.parametrize(
    "payload, msg",
    [
        ("[1, 2]", "JSON object"),
        ('{"layers": {"stem": "9/4"}}', "bits"),
        ('{"layers": {"stem": "4"}}', "weight/activation"),
        ('{"layers": {"stem": {"weight": {"bits": 4, "fmt": "fp5"}, "act": null}}}', "format"),
        ('{"version": 7, "layers": {}}', "version"),
        ('{"layers": {}, "extra": 1}', "unknown field"),
        ("{not json", "not valid JSON"),
        ('{"layers": {"stem": {"weight": {"bits": 4, "colour": 1}, "act": null}}}', "unknown"),
    ],
)
def test_malformed_policy_files(tmp_path, payload, msg):
    path = tmp_path / "bad.json"
    path.write_text(payload)
    with pytest.raises(SmpqError, match=msg):
        Policy.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(SmpqError, match="not found"):
        Policy.load(tmp_path / "nope.json")


def test_validate_against_model():
    pol = Policy.uniform(NAMES, 4, 4)
    pol.validate(NAMES, w_bits=[2, 4], a_bits=[4])
    with pytest.raises(SmpqError, match="unknown layer"):
        Policy.uniform([*NAMES, "ghost"], 4, 4).validate(NAMES)
    with pytest.raises(SmpqError, match="missing layer"):
        Policy.uniform(NAMES[:2], 4, 4).validate(NAMES)
    with pytest.raises(SmpqError, match="not in candidates"):
        pol.validate(NAMES, w_bits=[2, 3])


def test_spec_validation():
    with pytest.raises(SmpqError):
        QuantSpec(0)
    with pytest.raises(SmpqError):
        QuantSpec(9)
    with pytest.raises(SmpqError):
        QuantSpec(6, fmt="fp8_e4m3")
    with pytest.raises(SmpqError):
        QuantSpec(4, granularity="group")
    with pytest.raises(SmpqError):
        QuantSpec(1, symmetric=False)
    spec = QuantSpec(8, fmt="fp8_e5m2", granularity="channel")
    assert QuantSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "payload, key",
    [
        ('{"layers": {"stem": "4/4", "fc": "8/8", "stem": "2/2"}}', "stem"),
        ('{"layers": {"stem": "4/4"}, "layers": {"stem": "2/2"}}', "layers"),
        ('{"layers": {"stem": {"weight": {"bits": 4, "bits": 8}, "act": null}}}', "bits"),
    ],
)
def test_duplicate_keys_are_rejected_by_name(tmp_path, payload, key):
    path = tmp_path / "dup.json"
    path.write_text(payload)
    with pytest.raises(SmpqError, match=f"duplicate key '{key}'") as exc:
        Policy.load(path)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("depth", [65, 200, 5_000, 100_000])
def test_deep_nesting_is_a_one_line_error(tmp_path, depth):
    path = tmp_path / "deep.json"
    path.write_text('{"layers": {}, "meta": {"x": ' + "[" * depth + "]" * depth + "}}")
    with pytest.raises(SmpqError, match="nested more than 64 levels") as exc:
        Policy.load(path)
    assert "\n" not in str(exc.value)


def test_nesting_within_the_bound_loads(tmp_path):
    path = tmp_path / "ok.json"  # depth 64: policy object, meta, then 62 lists
    path.write_text('{"layers": {"stem": "4/4"}, "meta": {"x": ' + "[" * 62 + "]" * 62 + "}}")
    assert Policy.load(path).layers["stem"] == LayerChoice.bits(4, 4)


def test_oversized_file_is_refused_before_parsing(tmp_path):
    path = tmp_path / "big.json"
    pad = " " * (16 * 2**20)  # valid JSON: whitespace around a tiny policy
    path.write_text('{"layers": {"stem": "4/4"}}' + pad)
    with pytest.raises(SmpqError, match="larger than 16 MiB"):
        Policy.load(path)
    path.write_text('{"layers": {"stem": "4/4"}}' + pad[: 16 * 2**20 - 100])
    assert Policy.load(path).layers["stem"] == LayerChoice.bits(4, 4)


def test_huge_integer_is_a_one_line_error(tmp_path):
    path = tmp_path / "int.json"
    path.write_text('{"layers": {"stem": {"weight": {"bits": ' + "9" * 5000 + "}}}}")
    with pytest.raises(SmpqError, match="not valid JSON"):
        Policy.load(path)


@pytest.mark.parametrize("meta", ["0", '""', "[]", "false", "3", '"x"'])
def test_meta_that_is_not_an_object_is_rejected_even_when_falsy(tmp_path, meta):
    path = tmp_path / "meta.json"
    path.write_text('{"layers": {"stem": "4/4"}, "meta": ' + meta + "}")
    with pytest.raises(SmpqError, match="'meta' must be an object"):
        Policy.load(path)
    path.write_text('{"layers": {"stem": "4/4"}, "meta": null}')  # null: no provenance
    assert Policy.load(path).meta == {}
