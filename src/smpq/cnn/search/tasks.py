"""CNN value tasks for `smpq.evaluator`: each worker builds one calibrated `PolicyEvaluator`.

A `PolicyTask` pickles the float model, the search space and the splits; `build(device)` in a
worker calibrates the renormalised supernet exactly as the driver would (same seed, same
calibration images, same thread count), so every backend gives the same values.
`policy_evaluator` is what the strategies call: the local backend reuses the driver's
`PolicyEvaluator` (nothing is built twice), the Ray backend ships the task to its actors.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from smpq.cnn.search.harness import Meter, PolicyEvaluator, SearchSpace
from smpq.evaluator import Evaluator, EvaluatorConfig, LocalEvaluator, ValueFn, make_evaluator

Backend = Callable[["PolicyTask"], Evaluator]

__all__ = ["Backend", "PolicyTask", "evaluator_config", "policy_evaluator", "track"]


@dataclass(frozen=True, eq=False)
class PolicyTask:
    """Values of policies (rows of pair indices, one per searched layer) on a CNN."""

    model: nn.Module
    space: SearchSpace
    train_set: Dataset
    val_set: Dataset
    metric: str = "acc"
    val_samples: int | None = None
    seed: int = 0
    threads: int = 1

    def evaluator(self, device: str = "cpu") -> PolicyEvaluator:
        """The calibrated evaluator (calibration runs on the CPU, then moves to `device`)."""
        torch.set_num_threads(self.threads)
        model = self.model if device == "cpu" else copy.deepcopy(self.model)
        ev = PolicyEvaluator(model, self.space, self.train_set, self.val_set,
                             val_samples=self.val_samples, seed=self.seed)
        if device != "cpu":
            model.to(device)
            ev.net.model.to(device)
            ev.x, ev.y = ev.x.to(device), ev.y.to(device)
        return ev

    def build(self, device: str = "cpu") -> ValueFn:
        ev = self.evaluator(device)
        metric = self.metric
        return lambda rows: ev.values(np.asarray(rows), metric)


def evaluator_config(options: Mapping[str, Any]) -> EvaluatorConfig | Backend:
    """The backend a strategy's options ask for: `backend` (an EvaluatorConfig, or a callable
    task -> Evaluator), or the `workers` / `ray_address` / `device` keys; else local."""
    cfg = options.get("backend")
    if cfg is not None:
        return cfg
    return EvaluatorConfig(workers=int(options.get("workers") or 0),
                           address=options.get("ray_address"),
                           device=options.get("device") or "cpu")


def policy_evaluator(ev: PolicyEvaluator, model: nn.Module, train_set: Dataset,
                     val_set: Dataset, metric: str, options: Mapping[str, Any],
                     val_samples: int | None = None, seed: int = 0) -> Evaluator:
    """An Evaluator of `metric` over `ev`'s space on the backend `options` ask for."""
    cfg = evaluator_config(options)
    if val_samples is None:  # a shared evaluator: its split is what the workers must stack
        val_samples = len(ev.x)
    task = PolicyTask(model, ev.space, train_set, val_set, metric, val_samples, seed,
                      torch.get_num_threads())
    if not isinstance(cfg, EvaluatorConfig):
        return cfg(task)
    if cfg.backend == "local" and cfg.device == "cpu":
        return make_evaluator(task, cfg, local_fn=lambda rows: ev.values(rows, metric),
                              progress=options.get("eval_progress"))
    return make_evaluator(task, cfg, progress=options.get("eval_progress"))


def track(meter: Meter, evaluator: Evaluator) -> None:
    """Count `evaluator`'s evaluations in `meter` when they happen outside the driver's
    PolicyEvaluator (which the meter already watches: its memo may be shared across
    strategies, so it stays the count on the local backend)."""
    if not isinstance(evaluator, LocalEvaluator) or evaluator.task is not None:
        meter.evaluator = evaluator
        meter.calls0, meter.fwd0 = evaluator.calls, evaluator.forward_seconds
