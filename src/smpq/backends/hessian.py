"""Calibration statistics of nn.Linear inputs, gathered by forward hooks in one pass.

For a linear layer y = x W^T fed N calibration tokens X (N, in) (every leading dimension of
the input counts as a token), the layer-wise proxy Hessian is

    H = 2/N * X^T X = 2/N * sum_t x_t x_t^T                       (in, in)

so that `output_error(dW, H) = tr(dW H dW^T) = 2/N * ||X dW^T||_F^2` is (twice) the mean
squared output error of replacing W by W + dW. Normalising by tokens (not by batches, as the
GPTQ reference code does) keeps Hessians from different calibration sizes comparable.

The accumulator follows GPTQ's lifecycle, accumulate -> `hessian()` -> `free()`, so a
Hessian-sensitivity baseline can hold one layer's (in, in) matrix at a time. `input_hooks`
is the reusable hook plumbing; `collect_input_stats` runs it over calibration batches and also
records the mean |x| per input channel that AWQ uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from smpq.errors import SmpqError

__all__ = [
    "AbsMeanAccumulator",
    "HessianAccumulator",
    "collect_hessians",
    "collect_input_stats",
    "hessian_from_inputs",
    "input_hooks",
    "linear_layer",
    "output_error",
    "output_error_from_inputs",
    "require_stat",
    "run_batches",
]

Feeder = Callable[[Tensor], None]
ForwardFn = Callable[[nn.Module, Any], Any]


def _tokens(x: Tensor, in_features: int) -> Tensor:
    """Input (..., in) as a detached (tokens, in) matrix."""
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise SmpqError(f"expected inputs of shape (..., {in_features}), got {tuple(x.shape)}")
    return x.detach().reshape(-1, in_features)


class HessianAccumulator:
    """Running H = 2/N sum x x^T; sums X^T X in `dtype` (float64 by default: long sums)."""

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float64) -> None:
        if in_features < 1:
            raise SmpqError(f"in_features must be positive, got {in_features}")
        self.in_features = in_features
        self.dtype = dtype
        self.nsamples = 0
        self._xtx: Tensor | None = None
        self._freed = False

    def add_batch(self, x: Tensor) -> None:
        """Add every token of `x` (..., in_features)."""
        if self._freed:
            raise SmpqError("this Hessian accumulator was freed")
        t = _tokens(x, self.in_features).to(self.dtype)
        if self._xtx is None:
            n = self.in_features
            self._xtx = torch.zeros(n, n, dtype=self.dtype, device=t.device)
        self._xtx.addmm_(t.T, t)
        self.nsamples += t.shape[0]

    def hessian(self) -> Tensor:
        """H = 2/N X^T X (a new tensor; the accumulator keeps its state)."""
        if self._freed:
            raise SmpqError("this Hessian accumulator was freed")
        if self._xtx is None or self.nsamples == 0:
            raise SmpqError("no calibration inputs reached this layer; cannot form a Hessian")
        return self._xtx * (2.0 / self.nsamples)

    def free(self) -> None:
        """Drop the (in, in) buffer; later `add_batch`/`hessian` calls raise."""
        self._xtx = None
        self._freed = True


class AbsMeanAccumulator:
    """Mean |x| per input channel over all tokens (AWQ's activation salience)."""

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float64) -> None:
        self.in_features = in_features
        self.dtype = dtype
        self.nsamples = 0
        self._sum: Tensor | None = None

    def add_batch(self, x: Tensor) -> None:
        t = _tokens(x, self.in_features)
        s = t.abs().sum(dim=0, dtype=self.dtype)
        self._sum = s if self._sum is None else self._sum + s
        self.nsamples += t.shape[0]

    def value(self) -> Tensor:
        if self._sum is None or self.nsamples == 0:
            raise SmpqError("no calibration inputs reached this layer; no activation statistics")
        return self._sum / self.nsamples


def hessian_from_inputs(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """2/N X^T X of explicit inputs (..., in), in `dtype` (default: x's float dtype)."""
    t = _tokens(x, x.shape[-1]).to(dtype or _float_dtype(x))
    return (t.T @ t) * (2.0 / max(1, t.shape[0]))


def _float_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def output_error(dw: Tensor, h: Tensor) -> Tensor:
    """tr(dW H dW^T) = 2/N ||X dW^T||^2: the layer-wise objective of a weight change dW."""
    d = dw.to(h.dtype)
    return ((d @ h) * d).sum()


def output_error_from_inputs(dw: Tensor, x: Tensor) -> Tensor:
    """The same objective from explicit inputs: 2/N ||X dW^T||^2 (equals `output_error`)."""
    t = _tokens(x, dw.shape[-1])
    dt = torch.promote_types(_float_dtype(t), _float_dtype(dw))
    y = t.to(dt) @ dw.to(dt).T
    return y.square().sum() * (2.0 / max(1, t.shape[0]))


def linear_layer(model: nn.Module, name: str) -> nn.Linear:
    """The nn.Linear called `name` in `model`, with a user-facing error otherwise."""
    modules = dict(model.named_modules())
    if name not in modules:
        raise SmpqError(f"no layer named {name!r} in the model")
    mod = modules[name]
    if not isinstance(mod, nn.Linear):
        raise SmpqError(f"layer {name!r} is a {type(mod).__name__}, not an nn.Linear")
    return mod


@contextmanager
def input_hooks(model: nn.Module, feeders: Mapping[str, Feeder]) -> Iterator[None]:
    """While active, every call of layer `name` passes its input tensor to `feeders[name]`.

    Pre-hooks see the input before the layer runs (also when passed as `input=` keyword);
    they are removed on exit even if the forward raises.
    """
    layers = {name: linear_layer(model, name) for name in feeders}
    handles = []

    def make(feed: Feeder) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, Tensor):
                feed(x)

        return hook

    try:
        for name, layer in layers.items():
            handles.append(layer.register_forward_pre_hook(make(feeders[name]), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _default_forward(model: nn.Module, batch: Any) -> Any:
    return model(batch)


def run_batches(model: nn.Module, batches: Iterable[Any], forward_fn: ForwardFn | None) -> int:
    """Run the model over every batch without gradients; returns how many ran."""
    fwd = forward_fn or _default_forward
    n = 0
    with torch.no_grad():
        for batch in batches:
            fwd(model, batch)
            n += 1
    return n


def collect_input_stats(
    model: nn.Module,
    layer_names: Sequence[str],
    batches: Iterable[Any],
    forward_fn: ForwardFn | None = None,
    *,
    hessian: bool = True,
    dtype: torch.dtype = torch.float64,
) -> dict[str, dict[str, Any]]:
    """One calibration pass: per layer {"hessian": H or None, "act_absmean": (in,), "n_tokens"}.

    `forward_fn(model, batch)` runs one batch (default `model(batch)`); the model's train/eval
    mode is left as it is. `hessian=False` skips the (in, in) accumulators (AWQ without H).
    Statistics are returned in `dtype`. Raises if a layer never saw an input.
    """
    names = list(dict.fromkeys(layer_names))
    layers = {name: linear_layer(model, name) for name in names}
    absmeans = {n: AbsMeanAccumulator(layers[n].in_features, dtype) for n in names}
    hessians = {n: HessianAccumulator(layers[n].in_features, dtype) for n in names if hessian}

    def feeder(name: str) -> Feeder:
        def feed(x: Tensor) -> None:
            absmeans[name].add_batch(x)
            if name in hessians:
                hessians[name].add_batch(x)

        return feed

    with input_hooks(model, {n: feeder(n) for n in names}):
        run_batches(model, batches, forward_fn)
    out: dict[str, dict[str, Any]] = {}
    for n in names:
        if absmeans[n].nsamples == 0:
            raise SmpqError(f"layer {n!r} received no input during calibration")
        h = hessians[n].hessian() if n in hessians else None
        if n in hessians:
            hessians[n].free()
        acc = absmeans[n]
        out[n] = {"hessian": h, "act_absmean": acc.value(), "n_tokens": acc.nsamples}
    return out


def collect_hessians(
    model: nn.Module,
    layer_names: Sequence[str],
    batches: Iterable[Any],
    forward_fn: ForwardFn | None = None,
    dtype: torch.dtype = torch.float64,
) -> dict[str, Tensor]:
    """H = 2/N X^T X of each named nn.Linear's inputs over the calibration batches."""
    stats = collect_input_stats(model, layer_names, batches, forward_fn, dtype=dtype)
    return {name: s["hessian"] for name, s in stats.items()}


def require_stat(stats: Mapping[str, Any] | None, key: str, user: str) -> Tensor:
    """`stats[key]`, or a user-facing error naming who needed it and how to get it."""
    value = None if stats is None else stats.get(key)
    if value is None:
        raise SmpqError(
            f"{user} needs calibration statistic {key!r}; "
            "collect it with smpq.backends.collect_input_stats(model, layers, batches)"
        )
    if not isinstance(value, Tensor) or not math.prod(value.shape):
        raise SmpqError(f"calibration statistic {key!r} must be a non-empty tensor")
    return value
