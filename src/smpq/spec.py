"""Quantization formats: what a tensor is rounded to, as frozen, validated dataclasses.

A `QuantSpec` names one number format and how its scales are shared:

| granularity | scales for a weight of shape (out, in, *k)    | for an activation |
|-------------|------------------------------------------------|-------------------|
| tensor      | 1                                              | 1                 |
| channel     | out (one per output channel, dim 0)            | not supported     |
| group       | out * ceil(in*prod(k) / group_size) (along in) | not supported     |

Integer formats (`fmt="int"`) take 1 to 8 bits; 1 bit is sign times a scale. Minifloat formats
take their bit count from the format name. GGUF block formats (`fmt="q4_0"`, "q4_k", ...; the
table in `smpq.blockformats`) are group-granular with the format's own block as group size
(filled in when left at the defaults), `bits` is their nominal width (4 for q4_0) and their
true size on disk (scales included) is what `smpq.cost.weight_bits` counts.

A `LayerChoice` is what a policy gives one layer: a weight spec and an activation spec (either
may be `None` = keep float).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum

from smpq.blockformats import BLOCK_FORMATS
from smpq.errors import SmpqError

__all__ = [
    "FLOAT_FORMATS",
    "Granularity",
    "LayerChoice",
    "MinifloatFormat",
    "QuantSpec",
    "act_spec",
    "parse_bits_pair",
    "weight_spec",
]

MIN_BITS = 1
MAX_BITS = 8


class Granularity(str, Enum):
    TENSOR = "tensor"
    CHANNEL = "channel"
    GROUP = "group"


@dataclass(frozen=True)
class MinifloatFormat:
    """A sign + exponent + mantissa format with IEEE-like subnormals.

    `max_value` is the largest finite magnitude (formats differ in whether the top exponent
    is reserved for inf/NaN, so it is stated, not derived).
    """

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    max_value: float

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def min_normal_exp(self) -> int:
        return 1 - self.bias


# OCP / MX definitions. E4M3 is the "fn" variant (no inf, one NaN pattern): max 448.
FLOAT_FORMATS: dict[str, MinifloatFormat] = {
    "fp8_e4m3": MinifloatFormat("fp8_e4m3", 4, 3, 7, 448.0),
    "fp8_e5m2": MinifloatFormat("fp8_e5m2", 5, 2, 15, 57344.0),
    "fp6_e3m2": MinifloatFormat("fp6_e3m2", 3, 2, 3, 28.0),
    "fp6_e2m3": MinifloatFormat("fp6_e2m3", 2, 3, 1, 7.5),
    "fp4_e2m1": MinifloatFormat("fp4_e2m1", 2, 1, 1, 6.0),
}


@dataclass(frozen=True)
class QuantSpec:
    """One quantization format for one tensor.

    bits: integer width (1-8) for `fmt="int"`; for a minifloat it must match the format.
    symmetric: integer only; asymmetric adds a zero point (used for post-ReLU activations).
    group_size: required for `Granularity.GROUP`, along the input dimension.
    scale_bits: storage width of one scale (and of one zero point for asymmetric), for cost.
    """

    bits: int
    fmt: str = "int"
    symmetric: bool = True
    granularity: Granularity = Granularity.TENSOR
    group_size: int | None = None
    scale_bits: int = 16
    version: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "granularity", Granularity(self.granularity))
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            raise SmpqError(f"bits must be an integer, got {self.bits!r}")
        if self.fmt == "int":
            if not MIN_BITS <= self.bits <= MAX_BITS:
                raise SmpqError(
                    f"integer bits must be in [{MIN_BITS}, {MAX_BITS}], got {self.bits}"
                )
            if self.bits == 1 and not self.symmetric:
                raise SmpqError("1-bit quantization is sign x scale and must be symmetric")
        elif self.fmt in FLOAT_FORMATS:
            want = FLOAT_FORMATS[self.fmt].bits
            if self.bits != want:
                raise SmpqError(f"format {self.fmt} has {want} bits, got bits={self.bits}")
            if not self.symmetric:
                raise SmpqError(f"minifloat format {self.fmt} is symmetric only")
        elif self.fmt in BLOCK_FORMATS:
            self._check_block()
        else:
            known = ", ".join(["int", *FLOAT_FORMATS, *BLOCK_FORMATS])
            raise SmpqError(f"unknown format {self.fmt!r}; known: {known}")
        if self.granularity is Granularity.GROUP:
            if not self.group_size or self.group_size < 1:
                raise SmpqError("group granularity needs a positive group_size")
        elif self.group_size is not None:
            raise SmpqError("group_size is only meaningful with granularity='group'")

    def _check_block(self) -> None:
        bf = BLOCK_FORMATS[self.fmt]
        if self.bits != bf.nominal_bits:
            raise SmpqError(f"format {self.fmt} has {bf.nominal_bits} bits, got bits={self.bits}")
        if not self.symmetric:
            raise SmpqError(f"GGUF format {self.fmt} fixes its own offsets; leave symmetric=True")
        if self.granularity is Granularity.TENSOR and self.group_size is None:
            object.__setattr__(self, "granularity", Granularity.GROUP)
            object.__setattr__(self, "group_size", bf.block)
        if self.granularity is not Granularity.GROUP or self.group_size != bf.block:
            raise SmpqError(f"GGUF format {self.fmt} stores blocks of {bf.block}: use "
                            f"granularity='group', group_size={bf.block}")

    @property
    def is_float(self) -> bool:
        """A minifloat format (not int, not a GGUF block format)."""
        return self.fmt in FLOAT_FORMATS

    @property
    def is_block(self) -> bool:
        """A GGUF block format (`smpq.blockformats`), fake-quantized by llama.cpp's rules."""
        return self.fmt in BLOCK_FORMATS

    @property
    def minifloat(self) -> MinifloatFormat:
        return FLOAT_FORMATS[self.fmt]

    @property
    def label(self) -> str:
        """Short human label, e.g. 'int4', 'int4g32', 'fp8_e4m3', 'q4_k' (GGUF type name)."""
        if self.is_block:
            return self.fmt
        base = f"int{self.bits}" if self.fmt == "int" else self.fmt
        if self.granularity is Granularity.GROUP:
            base += f"g{self.group_size}"
        return base

    def to_dict(self) -> dict:
        d = asdict(self)
        d["granularity"] = self.granularity.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        if not isinstance(d, dict):
            raise SmpqError(f"a quantization spec must be an object, got {type(d).__name__}")
        known = {"bits", "fmt", "symmetric", "granularity", "group_size", "scale_bits", "version"}
        extra = set(d) - known
        if extra:
            raise SmpqError(f"unknown field(s) in quantization spec: {sorted(extra)}")
        if "bits" not in d:
            raise SmpqError("quantization spec is missing 'bits'")
        try:
            return cls(**d)
        except (TypeError, ValueError) as exc:
            raise SmpqError(f"invalid quantization spec {d}: {exc}") from None


def weight_spec(
    bits: int, granularity: str = "channel", group_size: int | None = None
) -> QuantSpec:
    """The customary weight format: symmetric integer, per output channel."""
    if granularity != "group":
        group_size = None
    return QuantSpec(bits=bits, granularity=Granularity(granularity), group_size=group_size)


def act_spec(bits: int, symmetric: bool = False) -> QuantSpec:
    """The customary activation format: per-tensor integer, asymmetric (unsigned after ReLU)."""
    return QuantSpec(bits=bits, symmetric=symmetric or bits == 1)


@dataclass(frozen=True)
class LayerChoice:
    """What one layer gets: a weight format and an input-activation format (None = float)."""

    weight: QuantSpec | None
    act: QuantSpec | None

    @property
    def w_bits(self) -> int:
        return self.weight.bits if self.weight is not None else 32

    @property
    def a_bits(self) -> int:
        return self.act.bits if self.act is not None else 32

    @property
    def label(self) -> str:
        w = self.weight.label if self.weight is not None else "fp32"
        a = self.act.label if self.act is not None else "fp32"
        return f"W{w}/A{a}"

    def to_dict(self) -> dict:
        return {
            "weight": self.weight.to_dict() if self.weight is not None else None,
            "act": self.act.to_dict() if self.act is not None else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> LayerChoice:
        if not isinstance(d, dict) or set(d) - {"weight", "act"}:
            raise SmpqError(f"a layer choice must be {{'weight': ..., 'act': ...}}, got {d!r}")
        w, a = d.get("weight"), d.get("act")
        return cls(
            weight=QuantSpec.from_dict(w) if w is not None else None,
            act=QuantSpec.from_dict(a) if a is not None else None,
        )

    @classmethod
    def bits(cls, w_bits: int, a_bits: int, granularity: str = "channel") -> LayerChoice:
        return cls(weight=weight_spec(w_bits, granularity), act=act_spec(a_bits))


def parse_bits_pair(text: str) -> tuple[int, int]:
    """Parse 'W/A' such as '4/8' into (4, 8), with a user-facing error."""
    parts = str(text).strip().split("/")
    if len(parts) != 2:
        raise SmpqError(f"expected weight/activation bits like '4/4', got {text!r}")
    try:
        w, a = int(parts[0]), int(parts[1])
    except ValueError:
        raise SmpqError(f"expected integer bits like '4/4', got {text!r}") from None
    for b in (w, a):
        if not MIN_BITS <= b <= MAX_BITS:
            raise SmpqError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {text!r}")
    return w, a
