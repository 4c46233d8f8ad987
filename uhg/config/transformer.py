"""Configuration of the autoregressive hit-transformer family (uhg.models.transformer).

Owned by the transformer family; its fields may grow with the model. The `family` literal is
the discriminator of `uhg.config.models.ModelConfig`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from uhg.config.base import Section


class TransformerConfig(Section):
    """Hits as tokens ordered within each sensor (or calorimeter shower); an end-of-set token
    decides multiplicity. One sequence per (event, PXD sensor), one per calorimeter shower."""

    family: Literal["transformer"] = Field("transformer", description="Model family selector.")
    conditions: list[str] = Field(
        default_factory=lambda: ["luminosity"],
        description="Event conditions (log-scaled; the training range of each maps to [-1, 1], "
        "higher values extrapolate linearly in log).",
    )
    d_model: int = Field(128, gt=0, description="Token width.")
    n_layers: int = Field(4, gt=0, description="Transformer blocks (pre-norm, FiLM-modulated by the sequence context).")
    n_heads: int = Field(4, gt=0, description="Attention heads per block; d_model / n_heads must be a multiple of 4 (2-D rotary).")
    mlp_ratio: int = Field(4, gt=0, description="Hidden width of the block MLP, in units of d_model.")
    rotary: bool = Field(True, description="2-D rotary embedding of the (row, col) or (layer, cell) position in attention.")
    latent_dim: int = Field(
        8, ge=0,
        description="Event latent shared by all sensors of an event (carries intra-event correlations); "
        "inferred from per-sensor summaries in training, drawn from N(0, 1) in generation. 0 = off.",
    )
    kl_weight: float = Field(1.0, ge=0.0, description="Weight of the latent's KL term (per event) in the loss.")
    free_bits: float = Field(0.1, ge=0.0, description="KL nats per latent dimension not penalised (avoids posterior collapse).")
    max_hits: int = Field(
        4096, gt=0,
        description="Hard cap on hits per sequence (PXD sensor or calorimeter shower) in generation; "
        "sequences reaching it are cut and a warning says how many.",
    )
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature.")
    top_q: float = Field(1.0, gt=0.0, le=1.0, description="Adaptive-nucleus (top-q) sampling mass; 1 = plain sampling.")
    energy_bins: int = Field(128, ge=2, description="Calorimeters: log-energy bins of a cell's value token.")
    energy_min_mev: float = Field(0.01515, gt=0.0, description="Calorimeters: lower edge of the energy bins, MeV.")
    energy_max_mev: float = Field(1.0e6, gt=0.0, description="Calorimeters: upper edge of the energy bins, MeV.")
    ema_decay: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="EMA decay of the weights that are validated and exported (0 = the trained weights).",
    )
    generate_batch_sequences: int = Field(
        4096, gt=0, description="Generation: sequences sampled together (events per pass = this / sensors).",
    )

    @model_validator(mode="after")
    def _shapes(self) -> TransformerConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        if self.rotary and (self.d_model // self.n_heads) % 4:
            raise ValueError(
                f"with rotary=true the head width d_model/n_heads ({self.d_model // self.n_heads}) must be a multiple of 4"
            )
        if self.energy_max_mev <= self.energy_min_mev:
            raise ValueError(f"energy_max_mev ({self.energy_max_mev}) must be > energy_min_mev ({self.energy_min_mev})")
        return self
