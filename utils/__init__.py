"""Trainer utilities: checkpoints, distributed helpers, AMP loss scaling, metrics, errors."""

from .errors import (
    CheckpointWriteError,
    ConfigError,
    DataError,
    MoatError,
    NonFiniteLossError,
    PeerFailedError,
    RunStoppedError,
    UserError,
)

__all__ = [
    "CheckpointWriteError",
    "ConfigError",
    "DataError",
    "MoatError",
    "NonFiniteLossError",
    "PeerFailedError",
    "RunStoppedError",
    "UserError",
]
