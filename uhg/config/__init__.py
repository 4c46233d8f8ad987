"""Typed run configuration: `load_config(path, overrides) -> RunConfig`.

The schema is in `uhg.config.schema` (sections name, seed, geometry, data, model, train,
distributed, tracking, output_dir); each model family's section is in `uhg.config.<family>`.
"""

from uhg.config.gan import GanConfig
from uhg.config.loading import (
    apply_override,
    config_from_dict,
    config_to_dict,
    flatten,
    load_config,
)
from uhg.config.models import ModelConfig
from uhg.config.schema import (
    DataConfig,
    DistributedConfig,
    RunConfig,
    SimulateConfig,
    TrackingConfig,
    TrainConfig,
)
from uhg.config.transformer import TransformerConfig

__all__ = [
    "DataConfig", "DistributedConfig", "GanConfig", "ModelConfig", "RunConfig", "SimulateConfig",
    "TrackingConfig", "TrainConfig", "TransformerConfig", "apply_override", "config_from_dict",
    "config_to_dict", "flatten", "load_config",
]
