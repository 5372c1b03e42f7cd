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
from smpq.fileio import atomic_write_text, read_json
from smpq.spec import LayerChoice, parse_bits_pair

__all__ = ["POLICY_VERSION", "Policy"]

POLICY_VERSION = 1


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
        if isinstance(self.version, bool) or self.version != POLICY_VERSION:
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
        return cls.from_dict(read_json(path, "policy file"))  # size, depth bounded
