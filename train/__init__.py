"""longax.train: configs, data, the sharded training loop. CLI: `python -m longax.train`."""

from longax.train.config import (ConfigError, DataConfig, ExperimentConfig, MeshConfig,
                                 OptimConfig, TrainConfig, load, override)
from longax.train.trainer import NonFiniteLoss, Trainer, make_mesh

__all__ = ["ConfigError", "DataConfig", "ExperimentConfig", "MeshConfig", "OptimConfig",
           "TrainConfig", "load", "override", "NonFiniteLoss", "Trainer", "make_mesh"]
