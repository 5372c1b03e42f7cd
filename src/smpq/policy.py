"""A Policy maps each layer's fully qualified name to a LayerChoice (or None = float).

JSON form (version 1):

    {"version": 1,
     "layers": {"stem": {"weight": {"bits": 8, ...}, "act": {"bits": 8, ...}},
                "blocks.0.conv1": "4/4",          # shorthand: weight/act integer bits
                "fc": null},                       # keep float
     "meta": {...}}                                # free-form provenance
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from smpq.errors import SmpqError
from smpq.fileio import atomic_write_text
from smpq.spec import LayerChoice, parse_bits_pair

__all__ = ["POLICY_VERSION", "Policy"]

POLICY_VERSION = 1


# Bounds on a policy file: real ones are kilobytes and a handful of levels deep. Without them a
# huge file is read whole, and deep nesting exhausts the recursion limit of json and its users.
_MAX_BYTES = 16 * 2**20
_MAX_DEPTH = 64


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object_pairs_hook: a repeated key is an error (json's default keeps the last)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise SmpqError(f"duplicate key {key!r}")
        seen.add(key)
    return dict(pairs)


def _depth(value: object) -> int:
    """Nesting depth of parsed JSON (a flat object is 1), walked without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= _MAX_DEPTH:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in item)
    return deepest


def _read_json(path: Path, what: str) -> object:
    """Parse a small JSON file strictly: size and depth bounded, duplicate keys rejected."""
    too_big = f"{what} {path} is larger than {_MAX_BYTES // 2**20} MiB"
    if path.stat().st_size > _MAX_BYTES:
        raise SmpqError(too_big)
    with path.open("rb") as f:
        raw = f.read(_MAX_BYTES + 1)  # the file may have grown since stat
    if len(raw) > _MAX_BYTES:
        raise SmpqError(too_big)
    too_deep = f"{what} {path} is nested more than {_MAX_DEPTH} levels deep"
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise SmpqError(f"{what} {path} is not text") from None
    except SmpqError as exc:
        raise SmpqError(f"{what} {path} has a {exc}") from None
    except json.JSONDecodeError as exc:
        raise SmpqError(f"{what} {path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    except RecursionError:
        raise SmpqError(too_deep) from None
    except ValueError as exc:  # e.g. an integer beyond Python's digit limit
        raise SmpqError(f"{what} {path} is not valid JSON: {exc}") from None
    if _depth(data) > _MAX_DEPTH:
        raise SmpqError(too_deep)
    return data


def _parse_choice(name: str, value) -> LayerChoice | None:
    if value is None:
        return None
    if isinstance(value, str):
        return LayerChoice.bits(*parse_bits_pair(value))
    try:
        return LayerChoice.from_dict(value)
    except SmpqError as exc:
        raise SmpqError(f"layer {name!r}: {exc}") from None


@dataclass(frozen=True)
class Policy:
    layers: Mapping[str, LayerChoice | None]
    meta: Mapping = field(default_factory=dict)
    version: int = POLICY_VERSION

    def __post_init__(self) -> None:
        if self.version != POLICY_VERSION:
            raise SmpqError(
                f"unsupported policy version {self.version!r} (this smpq reads {POLICY_VERSION})"
            )
        object.__setattr__(self, "layers", dict(self.layers))

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def uniform(
        cls,
        names: Iterable[str],
        w_bits: int,
        a_bits: int,
        *,
        pinned: Mapping[str, LayerChoice | None] | None = None,
    ) -> Policy:
        """Every layer at W/A bits, except `pinned` layers (e.g. first/last at 8/8)."""
        pinned = dict(pinned or {})
        choice = LayerChoice.bits(w_bits, a_bits)
        return cls({n: pinned[n] if n in pinned else choice for n in names})

    # -- queries --------------------------------------------------------------------------
    def validate(
        self,
        model_layers: Sequence[str],
        *,
        w_bits: Iterable[int] | None = None,
        a_bits: Iterable[int] | None = None,
        require_all: bool = True,
    ) -> None:
        """Check against the model's quantizable layers (and optional candidate bit sets)."""
        known = set(model_layers)
        unknown = [n for n in self.layers if n not in known]
        if unknown:
            raise SmpqError(f"policy names unknown layer(s): {', '.join(unknown)}")
        missing = [n for n in model_layers if n not in self.layers]
        if require_all and missing:
            raise SmpqError(f"policy is missing layer(s): {', '.join(missing)}")
        for kind, allowed in (("weight", w_bits), ("act", a_bits)):
            if allowed is None:
                continue
            allowed = set(allowed)
            for name, choice in self.layers.items():
                spec = getattr(choice, kind) if choice is not None else None
                if spec is not None and spec.bits not in allowed:
                    raise SmpqError(
                        f"layer {name!r}: {kind} bits {spec.bits} not in candidates "
                        f"{sorted(allowed)}"
                    )

    def bits_table(self) -> dict[str, tuple[int, int]]:
        """{layer: (w_bits, a_bits)}, 32 for float."""
        return {
            n: (c.w_bits, c.a_bits) if c is not None else (32, 32) for n, c in self.layers.items()
        }

    # -- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "layers": {n: c.to_dict() if c is not None else None for n, c in self.layers.items()},
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d) -> Policy:
        if not isinstance(d, dict):
            raise SmpqError("a policy file must hold a JSON object")
        extra = set(d) - {"version", "layers", "meta"}
        if extra:
            raise SmpqError(f"unknown field(s) in policy: {sorted(extra)}")
        if "layers" not in d or not isinstance(d["layers"], dict):
            raise SmpqError("a policy needs a 'layers' object mapping layer names to choices")
        version = d.get("version", POLICY_VERSION)
        layers = {str(n): _parse_choice(n, v) for n, v in d["layers"].items()}
        meta = d.get("meta")
        meta = {} if meta is None else meta
        if not isinstance(meta, dict):  # 0, "", [] and false are not objects either
            raise SmpqError("policy 'meta' must be an object")
        return cls(layers=layers, meta=meta, version=version)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Policy:
        path = Path(path)
        if not path.is_file():
            raise SmpqError(f"policy file not found: {path}")
        return cls.from_dict(_read_json(path, "policy file"))
