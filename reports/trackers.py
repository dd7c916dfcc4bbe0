"""Optional experiment trackers (Weights & Biases, MLflow) behind one small interface.

Neither package is a requirement: asking for a tracker whose package is not installed logs one
warning and the run goes on without it. Each tracker ``start``s a new run or, given the run id
a checkpoint saved, continues that run, so a resumed training run stays one tracker run.
A tracker that fails while the run goes on (network, server) is switched off with a warning:
it never stops a training run.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Any, Dict, List, Optional, Protocol

from yacs.config import CfgNode


class Tracker(Protocol):
    """What ``utils.run_records.RunRecords`` calls; ``name`` keys the saved run id."""

    name: str

    def start(self, run_id: Optional[str]) -> str:
        """Begin a new run (``run_id`` None) or continue run ``run_id``; returns the run's id."""

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        """Record ``metrics`` at optimizer step ``step``."""

    def finish(self) -> None:
        """Close the run (flush and upload what is left)."""


class WandbTracker:
    """Weights & Biases through the module-level ``wandb.init`` / ``log`` / ``finish``."""

    name = "wandb"

    def __init__(self, wandb: ModuleType, config: CfgNode, config_dict: Dict[str, Any], output_dir: str) -> None:
        self.wandb = wandb
        tracking = config.TRACKING
        self.init_kwargs = {
            "project": tracking.WANDB_PROJECT or None,
            "entity": tracking.WANDB_ENTITY or None,
            "mode": tracking.WANDB_MODE or None,
            "name": f"{config.MODEL.NAME}/{config.TAG}",
            "config": config_dict,
            "dir": output_dir,
        }

    def start(self, run_id: Optional[str]) -> str:
        kwargs = dict(self.init_kwargs)
        if run_id:
            kwargs.update(id=run_id, resume="allow")
        run = self.wandb.init(**kwargs)
        return str(run.id)

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        self.wandb.log(metrics, step=step)

    def finish(self) -> None:
        self.wandb.finish()


class MlflowTracker:
    """MLflow through ``mlflow.start_run`` / ``log_metrics`` / ``end_run``; the config is stored
    as the run's ``config.json`` artifact (no parameter-length limits)."""

    name = "mlflow"

    def __init__(self, mlflow: ModuleType, config: CfgNode, config_dict: Dict[str, Any]) -> None:
        self.mlflow = mlflow
        self.uri = config.TRACKING.MLFLOW_TRACKING_URI
        self.experiment = config.TRACKING.MLFLOW_EXPERIMENT
        self.run_name = f"{config.MODEL.NAME}/{config.TAG}"
        self.config_dict = config_dict

    def start(self, run_id: Optional[str]) -> str:
        if self.uri:
            self.mlflow.set_tracking_uri(self.uri)
        if run_id:
            run = self.mlflow.start_run(run_id=run_id)
        else:
            if self.experiment:
                self.mlflow.set_experiment(self.experiment)
            run = self.mlflow.start_run(run_name=self.run_name)
            self.mlflow.log_dict(self.config_dict, "config.json")
        return str(run.info.run_id)

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def finish(self) -> None:
        self.mlflow.end_run()


def _import_optional(package: str, asked_by: str, logger: logging.Logger) -> Optional[ModuleType]:
    try:
        return importlib.import_module(package)
    except ImportError:
        logger.warning(f"{asked_by}: the {package} package is not installed (pip install {package}); not logging to it")
        return None


def build_trackers(
    config: CfgNode, config_dict: Dict[str, Any], output_dir: str, logger: logging.Logger
) -> List[Tracker]:
    """The trackers the ``TRACKING`` keys ask for and whose package is installed."""
    trackers: List[Tracker] = []
    if config.TRACKING.WANDB:
        wandb = _import_optional("wandb", "--log-wandb (TRACKING.WANDB)", logger)
        if wandb is not None:
            trackers.append(WandbTracker(wandb, config, config_dict, output_dir))
    if config.TRACKING.MLFLOW:
        mlflow = _import_optional("mlflow", "--log-mlflow (TRACKING.MLFLOW)", logger)
        if mlflow is not None:
            trackers.append(MlflowTracker(mlflow, config, config_dict))
    return trackers
