"""A quantized checkpoint as a directory: packed codes in safetensors plus two JSON files.

    <dir>/model.safetensors   per quantized layer <name>:
                                <name>.qweight  uint8 (out, packed_length(in*prod(k), bits)):
                                                storage codes, LSB-first, rows padded to a byte
                                <name>.scales   float32 (default) or float16, shape (out, groups);
                                                (1, 1) per tensor, (out, 1) per channel
                                <name>.zeros    uint8 zero points, shaped like scales (asymmetric)
                              every other state-dict tensor unchanged (biases, norms, embeddings,
                              float layers), under its own name; tied tensors (a float lm_head
                              sharing the token embedding) once, under the first name
    <dir>/policy.json         the Policy
    <dir>/quant_meta.json     format name and version, per layer shape / spec / scale dtype,
                              "tied": {alias: stored name} for the tensors stored once

Storage codes are defined in `smpq.export.packing`. Each file is written atomically and
quant_meta.json last, so a directory with a readable quant_meta.json is complete.

Reproduction: with float32 scales `load_quantized` restores exactly the fake-quantized
weights (bit-identical for float32 / float16 / bfloat16 models). float16 scales round each
scale to 11 significant bits, so every weight moves by at most FP16_SCALE_RTOL (2^-11,
~4.9e-4) of its magnitude while the scale lies in float16's normal range [2^-14, 65504];
smaller scales lose relative precision (absolute error <= 2^-25 * |code - zero_point|).
Scales above 65504 cannot be stored in float16 and are refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from smpq.errors import SmpqError
from smpq.export.packing import QuantizedTensor, pack, packed_length, unpack
from smpq.fileio import atomic_save_safetensors, atomic_write_text, read_safetensors
from smpq.policy import Policy
from smpq.spec import Granularity, QuantSpec

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FP16_SCALE_RTOL",
    "META_FILE",
    "POLICY_FILE",
    "SCALE_DTYPES",
    "WEIGHTS_FILE",
    "load_quantized",
    "save_quantized",
]

FORMAT_NAME = "smpq-packed"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
POLICY_FILE = "policy.json"
META_FILE = "quant_meta.json"
FP16_SCALE_RTOL = 2.0**-11
SCALE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}
_SUFFIXES = ("qweight", "scales", "zeros")


def _weight_of(model: nn.Module, name: str) -> Tensor:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise SmpqError(f"model has no module named {name!r}") from None
    w = getattr(module, "weight", None)
    if not isinstance(w, Tensor):
        raise SmpqError(f"module {name!r} has no weight tensor")
    return w


def _outer_rows(shape: torch.Size, spec: QuantSpec) -> int:
    """Leading dimension of the stored scales: 1 per tensor, else one per output channel."""
    return 1 if spec.granularity is Granularity.TENSOR else shape[0]


def _groups_per_row(per_row: int, spec: QuantSpec) -> int:
    """Trailing dimension of the stored scales (as `primitives.group_view` lays groups out)."""
    if spec.granularity is not Granularity.GROUP:
        return 1
    return max(1, -(-per_row // int(spec.group_size)))


def _quantized_weights(
    model: nn.Module, policy: Policy, qweights: Mapping[str, QuantizedTensor]
) -> dict[str, QuantizedTensor]:
    """Every weight the policy quantizes: given ones checked, missing ones by RTN."""
    extra = sorted(set(qweights) - set(policy.layers))
    if extra:
        raise SmpqError(f"quantized weights given for layers not in the policy: {extra}")
    out = {}
    for name, choice in policy.layers.items():
        spec = choice.weight if choice is not None else None
        w = _weight_of(model, name)
        if spec is None:
            if name in qweights:
                raise SmpqError(f"layer {name!r} is float in the policy but has quantized weights")
            continue
        qt = qweights[name] if name in qweights else QuantizedTensor.from_float(w.detach(), spec)
        if qt.spec != spec:
            msg = f"layer {name!r}: weights are {qt.spec.label}, the policy says {spec.label}"
            raise SmpqError(msg)
        if qt.shape != w.shape:
            raise SmpqError(
                f"layer {name!r}: quantized shape {tuple(qt.shape)} != weight {tuple(w.shape)}"
            )
        out[name] = qt
    return out


def _scales_for_storage(qt: QuantizedTensor, dtype: torch.dtype, name: str) -> Tensor:
    s = qt.scale.reshape(_outer_rows(qt.shape, qt.spec), -1).to(dtype)
    if not bool(torch.isfinite(s).all()):
        raise SmpqError(f"layer {name!r}: a scale does not fit {dtype} (use float32 scales)")
    return s.contiguous()


def _layer_tensors(name: str, qt: QuantizedTensor, scale_dtype: torch.dtype) -> dict[str, Tensor]:
    rows = _outer_rows(qt.shape, qt.spec)
    out = {
        f"{name}.qweight": pack(qt.codes.reshape(qt.shape[0], -1), qt.spec.bits),
        f"{name}.scales": _scales_for_storage(qt, scale_dtype, name),
    }
    if qt.zero_point is not None:
        out[f"{name}.zeros"] = qt.zero_point.reshape(rows, -1).cpu().to(torch.uint8).contiguous()
    return out


def _layer_meta(qt: QuantizedTensor, weight: Tensor, scale_dtype: str) -> dict:
    spec = qt.spec
    return {
        "shape": list(qt.shape),
        "bits": spec.bits,
        "fmt": spec.fmt,
        "symmetric": spec.symmetric,
        "granularity": spec.granularity.value,
        "group_size": spec.group_size,
        "scale_dtype": scale_dtype,
        "weight_dtype": str(weight.dtype).removeprefix("torch."),
        "spec": spec.to_dict(),
    }


def _plain_tensors(model: nn.Module, skip: set[str]
                   ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """State-dict tensors as is, and {alias: key} for tied ones (e.g. lm_head.weight ->
    model.embed_tokens.weight): the very same tensor is stored once, under its first key.
    Other views of one storage are copied (safetensors refuses shared storages)."""
    out: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    first: dict[tuple, str] = {}  # the exact view (pointer, dtype, shape, strides) -> first key
    storages = set()
    for key, t in model.state_dict().items():
        if key in skip:
            continue
        t = t.detach()
        view = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and view in first:
            tied[key] = first[view]
            continue
        ptr = (t.device, t.untyped_storage().data_ptr()) if t.numel() else None
        out[key] = t.cpu().clone() if ptr in storages else t.cpu().contiguous()
        if ptr is not None:
            storages.add(ptr)
            first[view] = key
    return out, tied


def save_quantized(
    path_dir: str | os.PathLike,
    model: nn.Module,
    policy: Policy,
    qweights: Mapping[str, QuantizedTensor] | None = None,
    *,
    scale_dtype: str = "float32",
) -> None:
    """Write `model` quantized by `policy` to `path_dir` (layout in the module docstring).

    `qweights` holds already-quantized weights (GPTQ, AWQ, ...: `QuantizedTensor.from_fake`);
    layers the policy quantizes that are missing from it are quantized here by RTN from the
    model's float weights. Only weight formats are exported; activation specs stay in the
    policy file for reference.
    """
    if scale_dtype not in SCALE_DTYPES:
        raise SmpqError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {scale_dtype!r}")
    qts = _quantized_weights(model, policy, dict(qweights or {}))
    state_keys = set(model.state_dict())
    tensors, tied = _plain_tensors(model, {f"{n}.weight" for n in qts})
    layers = {}
    for name, qt in qts.items():
        new = _layer_tensors(name, qt, SCALE_DTYPES[scale_dtype])
        clash = sorted(set(new) & state_keys)
        if clash:
            raise SmpqError(f"layer {name!r}: state dict already has {clash}")
        tensors.update(new)
        layers[name] = _layer_meta(qt, _weight_of(model, name), scale_dtype)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "scale_dtype": scale_dtype,
        "packing": "uint8, LSB-first bit stream per output row, rows padded to whole bytes",
        "codes": "int sym: q + 2^(bits-1); int asym: q; 1 bit: 1 = +scale; minifloat: pattern",
        "layers": layers,
        "tied": tied,
    }
    out = Path(path_dir)
    out.mkdir(parents=True, exist_ok=True)
    file_meta = {"format": "pt", "smpq_format": FORMAT_NAME, "smpq_version": str(FORMAT_VERSION)}
    atomic_save_safetensors(tensors, out / WEIGHTS_FILE, metadata=file_meta)
    policy.save(out / POLICY_FILE)
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2) + "\n")


# -- loading --------------------------------------------------------------------------------


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SmpqError(f"{path} is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise SmpqError(f"{path} is not an smpq quantized-checkpoint description")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise SmpqError(
            f"unknown format version {version!r} in {path} (this smpq reads {FORMAT_VERSION})"
        )
    if not isinstance(meta.get("layers"), dict):
        raise SmpqError(f"{path} has no 'layers' object")
    tied = meta.setdefault("tied", {})  # absent in files written before ties were kept
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in tied.items()):
        raise SmpqError(f"{path}: 'tied' must map tensor names to tensor names")
    return meta


def _read_tensors(path: Path) -> dict[str, Tensor]:
    return read_safetensors(path, "packed weights")


def _required(tensors: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in tensors:
        raise SmpqError(f"{WEIGHTS_FILE} is missing tensor {key!r}")
    return tensors[key]


def _expect_shape(
    t: Tensor, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...], key: str
) -> None:
    if tuple(t.shape) != shape or t.dtype not in dtypes:
        raise SmpqError(
            f"tensor {key!r} is {t.dtype} {tuple(t.shape)}, expected {dtypes[0]} {shape}"
        )


def _load_layer(name: str, entry: dict, tensors: Mapping[str, Tensor]) -> QuantizedTensor:
    """Rebuild one layer's QuantizedTensor, checking every stored shape against the meta."""
    try:
        spec = QuantSpec.from_dict(entry["spec"])
        shape = torch.Size(int(n) for n in entry["shape"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SmpqError(f"{META_FILE}: bad entry for layer {name!r}: {exc}") from None
    if len(shape) < 1:
        raise SmpqError(f"{META_FILE}: layer {name!r} has no shape")
    per_row = shape.numel() // shape[0] if shape[0] else 0
    packed = _required(tensors, f"{name}.qweight")
    _expect_shape(
        packed, (shape[0], packed_length(per_row, spec.bits)), (torch.uint8,), f"{name}.qweight"
    )
    codes = unpack(packed, spec.bits, per_row).reshape(shape)
    scales = _required(tensors, f"{name}.scales")
    scale_shape = (_outer_rows(shape, spec), _groups_per_row(per_row, spec))
    _expect_shape(scales, scale_shape, tuple(SCALE_DTYPES.values()), f"{name}.scales")
    zeros = tensors.get(f"{name}.zeros")
    if zeros is not None:
        _expect_shape(zeros, tuple(scales.shape), (torch.uint8,), f"{name}.zeros")
        zeros = zeros.to(torch.float32)
    return QuantizedTensor(codes, scales.to(torch.float32), zeros, spec, shape)


def _check_policy(policy: Policy, layers: Mapping[str, dict]) -> None:
    quantized = {n: c.weight for n, c in policy.layers.items() if c is not None and c.weight}
    if set(quantized) != set(layers):
        raise SmpqError(f"{POLICY_FILE} and {META_FILE} disagree on which layers are quantized")
    for name, spec in quantized.items():
        if spec.to_dict() != layers[name].get("spec"):
            raise SmpqError(f"{POLICY_FILE} and {META_FILE} disagree on layer {name!r}")


def _load_plain(model: nn.Module, plain: dict[str, Tensor], quantized_keys: set[str]) -> None:
    state = model.state_dict()
    unexpected = sorted(set(plain) - set(state))
    missing = sorted(set(state) - set(plain) - quantized_keys)
    if unexpected or missing:
        raise SmpqError(
            f"checkpoint does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for key, t in plain.items():
        if t.shape != state[key].shape:
            raise SmpqError(
                f"mismatched shape for {key!r}: checkpoint {tuple(t.shape)}, "
                f"model {tuple(state[key].shape)}"
            )
    model.load_state_dict(plain, strict=False)


def load_quantized(path_dir: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load a `save_quantized` directory into `model` (same architecture), in place.

    Quantized layers get their dequantized (fake-quantized) weights as new parameters, which
    also unties weights tied to them; everything else is loaded as stored, a tensor stored
    once for tied names (quant_meta.json "tied") into each of them. Returns `model`.
    """
    root = Path(path_dir)
    for fname in (META_FILE, POLICY_FILE, WEIGHTS_FILE):
        if not (root / fname).is_file():
            raise SmpqError(f"{root} is not a quantized checkpoint: {fname} is missing")
    meta = _read_meta(root / META_FILE)
    _check_policy(Policy.load(root / POLICY_FILE), meta["layers"])
    tensors = _read_tensors(root / WEIGHTS_FILE)
    restored = {}
    for name, entry in meta["layers"].items():
        w = _weight_of(model, name)
        qt = _load_layer(name, entry, tensors)
        if qt.shape != w.shape:
            raise SmpqError(
                f"mismatched shape for layer {name!r}: checkpoint {tuple(qt.shape)}, "
                f"model {tuple(w.shape)}"
            )
        restored[name] = qt.dequantize(w.dtype).to(w.device)
    layer_keys = {f"{n}.{s}" for n in meta["layers"] for s in _SUFFIXES}
    plain = {k: t for k, t in tensors.items() if k not in layer_keys}
    for alias, key in meta["tied"].items():  # stored once, loaded into both names
        plain[alias] = _required(plain, key)
    _load_plain(model, plain, {f"{n}.weight" for n in meta["layers"]})
    for name, w in restored.items():
        module = model.get_submodule(name)
        module.weight = nn.Parameter(w, requires_grad=module.weight.requires_grad)
    return model
