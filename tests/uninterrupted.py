"""The reference run that interrupted runs must end at (a killed worker, a stop and rerun, a killed node)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A tiny 2-worker run of 4 epochs, validated and checkpointed every 2nd epoch (conftest's `uninterrupted` trains it
# once per test session).
UNINTERRUPTED: dict[str, Any] = {"run.workers": 2, "optim.epochs": 4, "run.validate_every": 2,
                                 "run.checkpoint_every": 2, "run.max_failures": 3}


@dataclass(frozen=True)
class Uninterrupted:
    """`UNINTERRUPTED` trained on the session's shards and Ray: its config, MLflow store and result."""

    cfg: Any  # ganbert.config.Config
    uri: str
    out: Any  # ganbert.train.loop.TrainResult
