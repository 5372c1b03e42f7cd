"""A supernet view of a model: every searched layer holds all candidates; players and masks.

Players are the candidate branches, one per (layer, weights-or-activations, candidate), in
layer order, weights before activations. A boolean mask over players switches branches on
and off (what the Shapley engine's value function receives). Architecture parameters
alpha live in the layers (`alpha_w`, `alpha_a`) so that they travel with checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from smpq.apply import quant_layers, quantizable_layers, supernet_
from smpq.errors import SmpqError
from smpq.modules import QuantLayer
from smpq.policy import Policy
from smpq.spec import LayerChoice, QuantSpec

__all__ = ["Player", "Supernet"]


@dataclass(frozen=True)
class Player:
    layer: str
    kind: str  # "w" or "a"
    index: int
    spec: QuantSpec | None

    @property
    def label(self) -> str:
        bits = self.spec.label if self.spec is not None else "fp32"
        return f"{self.layer}:{self.kind}:{bits}"


class Supernet:
    """Wraps `model` in place; `layers` (default: all quantizable) get every candidate."""

    def __init__(
        self,
        model: nn.Module,
        w_specs: Sequence[QuantSpec],
        a_specs: Sequence[QuantSpec],
        *,
        layers: Sequence[str] | None = None,
        fixed: Policy | None = None,
        empty: str = "zero",
        renormalise: bool = False,
        learnable: bool = False,
    ):
        if len(set(w_specs)) != len(w_specs) or len(set(a_specs)) != len(a_specs):
            raise SmpqError("candidate lists must not repeat a format")
        fixed_names = set(fixed.layers) if fixed is not None else set()
        names = list(layers) if layers is not None else [
            n for n in quantizable_layers(model) if n not in fixed_names
        ]
        self.model = supernet_(model, w_specs, a_specs, layers=names, fixed=fixed,
                               empty=empty, learnable=learnable)
        self.w_specs, self.a_specs = list(w_specs), list(a_specs)
        all_q = quant_layers(model)
        self.layers: dict[str, QuantLayer] = {n: all_q[n] for n in names}
        for layer in self.layers.values():
            layer.renormalise = renormalise
        self.fixed = fixed
        self.players: list[Player] = []
        self._slices: list[tuple[QuantLayer, slice, slice]] = []
        for name, layer in self.layers.items():
            start = len(self.players)
            self.players += [Player(name, "w", i, s) for i, s in enumerate(self.w_specs)]
            mid = len(self.players)
            self.players += [Player(name, "a", j, s) for j, s in enumerate(self.a_specs)]
            self._slices.append((layer, slice(start, mid), slice(mid, len(self.players))))

    @property
    def n_players(self) -> int:
        return len(self.players)

    def groups(self) -> list[np.ndarray]:
        """Player indices per (layer, kind): the units that compete for one choice."""
        out = []
        for _, ws, as_ in self._slices:
            out += [np.arange(ws.start, ws.stop), np.arange(as_.start, as_.stop)]
        return out

    # -- switching ------------------------------------------------------------------------
    @torch.no_grad()
    def set_mask(self, mask: np.ndarray | Sequence[bool]) -> None:
        """Activate exactly the players in `mask` (the hot path of every value evaluation)."""
        m = torch.as_tensor(np.asarray(mask, dtype=bool))
        if m.shape != (self.n_players,):
            raise SmpqError(f"mask must have {self.n_players} entries, got {tuple(m.shape)}")
        for layer, ws, as_ in self._slices:
            layer.w_active.copy_(m[ws])
            layer.a_active.copy_(m[as_])

    def set_all_active(self) -> None:
        self.set_mask(np.ones(self.n_players, dtype=bool))

    # -- architecture parameters ----------------------------------------------------------
    def alphas(self) -> np.ndarray:
        """All alphas as one vector in player order."""
        parts = []
        for layer, _, _ in self._slices:
            parts += [layer.alpha_w.detach().cpu().numpy(), layer.alpha_a.detach().cpu().numpy()]
        return np.concatenate(parts).astype(np.float64)

    @torch.no_grad()
    def set_alphas(self, alpha: np.ndarray) -> None:
        a = torch.as_tensor(np.asarray(alpha), dtype=torch.float32)
        for layer, ws, as_ in self._slices:
            layer.alpha_w.copy_(a[ws])
            layer.alpha_a.copy_(a[as_])

    def alpha_parameters(self) -> list[nn.Parameter]:
        return [p for layer, _, _ in self._slices for p in (layer.alpha_w, layer.alpha_a)]

    def derive(self, scores: np.ndarray | None = None) -> Policy:
        """Per layer the candidate with the largest score (default: alpha)."""
        s = self.alphas() if scores is None else np.asarray(scores)
        choices: dict[str, LayerChoice | None] = {}
        if self.fixed is not None:
            choices.update(self.fixed.layers)
        for (_, ws, as_), name in zip(self._slices, self.layers, strict=True):
            wi, ai = int(np.argmax(s[ws])), int(np.argmax(s[as_]))
            choices[name] = LayerChoice(self.w_specs[wi], self.a_specs[ai])
        order = list(quantizable_layers(self.model))
        return Policy({n: choices.get(n) for n in order})
