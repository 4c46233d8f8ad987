"""Model configurations of every family, one discriminated union keyed on `family`.

Each family keeps its config class in its own module (`uhg/config/<family>.py`, a pydantic
`Section` with a `family: Literal[...]` field) and is added to `ModelConfig` here.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from uhg.config.calo_layers import CaloLayersConfig
from uhg.config.gan import GanConfig
from uhg.config.transformer import TransformerConfig

ModelConfig = Annotated[GanConfig | TransformerConfig | CaloLayersConfig, Field(discriminator="family")]

__all__ = ["CaloLayersConfig", "GanConfig", "ModelConfig", "TransformerConfig"]
