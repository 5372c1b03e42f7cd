"""Re-export of `smpq.strategy.StrategyResult` for the strategy modules that import it here."""

from smpq.strategy import StrategyResult

__all__ = ["StrategyResult"]
