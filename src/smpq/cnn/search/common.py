"""What every search strategy returns, so that benchmarks can put them side by side."""

from __future__ import annotations

from dataclasses import dataclass, field

from smpq.policy import Policy

__all__ = ["StrategyResult"]


@dataclass
class StrategyResult:
    """A strategy's policy and what it cost to find it.

    evaluations: forward passes over the validation set (value evaluations);
    forward_seconds: the part of `seconds` spent inside those forward passes;
    info: strategy-specific extras (binding constraints, scores, repaired flag, ...).
    """

    name: str
    policy: Policy
    seconds: float
    evaluations: int = 0
    forward_seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "policy": self.policy.to_dict(), "seconds": self.seconds,
                "evaluations": self.evaluations, "forward_seconds": self.forward_seconds,
                "info": self.info}
