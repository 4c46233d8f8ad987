"""Configuration of the sensor-conditioned GAN family (uhg.models.gan)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from uhg.config.base import Section


class GanConfig(Section):
    """IEA-GAN style model: whole events, one token per sensor (or calorimeter layer)."""

    family: Literal["gan"] = Field("gan", description="Model family selector.")
    conditions: list[str] = Field(
        default_factory=lambda: ["luminosity"],
        description="Event conditions the model is conditioned on, as named in the store "
        "(luminosity, her_current, ler_current for PXD; incident_energy for calorimeters). "
        "Each is log-scaled and normalised to the training range.",
    )
    z_dim: int = Field(64, gt=0, description="Event-level noise dimension.")
    sensor_noise_dim: int = Field(16, ge=0, description="Per-sensor noise dimension.")
    embed_dim: int = Field(128, gt=0, description="Width of sensor tokens (embeddings, attention).")
    attention_layers: int = Field(2, ge=0, description="Self-attention blocks over the sensor tokens of one event.")
    attention_heads: int = Field(4, gt=0, description="Heads per attention block; must divide embed_dim.")
    decoder_channels: list[int] = Field(
        default_factory=lambda: [64, 32, 16, 8],
        description="Pixel detectors: conv decoder channels from the base grid up; "
        "len-1 nearest-neighbour x2 upsamplings (base grid = image size / 2^(len-1), rounded up).",
    )
    pixel_shuffle: int = Field(
        1, ge=1,
        description="Pixel detectors: sub-pixel output factor s; the decoder works at 1/s resolution and its head "
        "predicts s x s pixels per position (cuts full-resolution convolution cost ~s^2-fold).",
    )
    cluster_growth: bool = Field(
        False,
        description="Pixel detectors: the hit gate fires cluster seeds, and each seed fires each of its 8 neighbours "
        "with a learned probability, so hits come in clusters (false: every pixel fires independently).",
    )
    cluster_shapes: int = Field(
        0, ge=0,
        description="Pixel detectors: the hit gate fires cluster seeds, and each seed draws its cluster's pixel "
        "pattern from a table of at most this many shapes, fitted with their per-sensor frequencies to the training "
        "data (fit_from_data); the generator shifts each sensor's shape log-odds. 0 = off. Excludes cluster_growth.",
    )
    count_law: Literal["power", "powers", "quadratic", "pooled"] | None = Field(
        None,
        description="Pixel detectors with cluster_shapes: the clusters (seeds) of every sensor are drawn from a count "
        "law fitted to the training data before the first step and kept at its fit (negative binomial per sensor, "
        "a one-factor Gaussian copula for event-wide fluctuations; forms as the transformer's `count_law`), and "
        "exactly that many seeds are placed, at positions drawn from the generator's seed map. null = off (the gate "
        "decides how many pixels seed). The overlap and merge corrections shift each sensor's level after the fit and "
        "leave its slope at the fit (in the pooled form the level also sets part of the slope: the remainder takes "
        "the opposite tilt).",
    )
    cluster_charge_profile: bool = Field(
        False,
        description="Pixel detectors with cluster_shapes and charge_noise: a pixel's charge score is shifted and "
        "scaled by the mean and spread of the data's charge (as normal scores) at its position in its cluster's "
        "shape, fitted to the training data (fit_from_data); false: every pixel's charge noise is alike.",
    )
    cluster_charge_share: bool = Field(
        False,
        description="Pixel detectors with cluster_charge_profile: every cluster draws one charge score shared by its "
        "pixels, with the correlation of the pixels' charges (after the profile) fitted per shape to the training "
        "data (fit_from_data), as one particle's charge spread over its pixels; false: the pixels' noise is "
        "independent.",
    )
    cluster_charge_bank: int = Field(
        0, ge=0,
        description="Pixel detectors with cluster_charge_profile: every placed cluster takes the pixel charges of one "
        "training cluster of its shape (drawn by its second uniform), from a bank of at most this many pixel charges "
        "filled from the fit events by the fitted start (each shape's clusters thinned evenly to fit); the profile's "
        "normal scores are then not used. 0 = off.",
    )
    cluster_merge_correction: bool = Field(
        False,
        description="Pixel detectors with count_law: the data's clusters, merges included, merge a second time where "
        "their shapes are placed next to each other; the fitted start generates fit events and moves the shape mix "
        "(per cluster size) and the count law's level (one factor) until the generated clusters have the data's "
        "size spectrum and number. false: the shapes and count as fitted.",
    )
    merge_density_correction: bool = Field(
        False,
        description="Pixel detectors with cluster_merge_correction: the count law counts the data's clusters after "
        "their merges, and the placed shapes merge the more the denser they lie, beyond the training range too. The "
        "fitted start fits each sensor's merged fraction of placed seeds as k_u x seeds / pixels on generated fit "
        "events, and every draw places the s seeds that leave the law's count n after the merges, "
        "s (1 - k_u s / pixels) = n. false: the merges enter as one level factor per sensor at the training "
        "conditions (docs/results.md: pxd-mini design at 3x the training maximum, generated clusters -10%).",
    )
    charge_at_fit: bool = Field(
        False,
        description="Pixel detectors with charge_noise and fit_from_data: the generator's charge score (the charge "
        "channels of its head, zero after the fitted start) gets no gradient, so the charge stays the fitted start's "
        "(quantile table, profile, shared cluster charge) while the adversarial game trains where the seeds go; "
        "false: the game also shifts each pixel's charge percentile.",
    )
    cluster_charge_bank_per_sensor: bool = Field(
        False,
        description="Pixel detectors with cluster_charge_bank: a cluster placed on a sensor takes the charges of a "
        "training cluster of its shape from that sensor where the bank holds one (a shape's charge differs "
        "between the layers: with the pooled bank pxd-mini's layer-2 pixel charge was 2.5% low, layer 1's 1.8% high), "
        "else from any sensor; false: from any sensor.",
    )
    fit_events: int = Field(
        2000, ge=1,
        description="Pixel detectors with fit_from_data: at most this many training events (evenly spread) are "
        "read for the fitted start (count law, shapes, charges); more events fit each sensor's count law more "
        "precisely, and the start reads and clusters every one of them.",
    )
    charge_noise: bool = Field(
        False,
        description="Pixel detectors: stochastic charge, drawn through a table of charge quantiles fitted to the "
        "training data (the generator shifts each pixel's percentile); false: one charge per pixel given the noise.",
    )
    sample_precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="Sampling only (training is unchanged): the precision of the decoder's convolutions, "
        "upsampling and FiLM when events are generated. bf16 (channels-last, summed in fp32 by "
        "oneDNN; gates and charges read in fp32) takes about half the decoder's CPU time on CPUs with AMX "
        "(docs/benchmarks.md), but gives other events than fp32 for the same seed (the same law within the "
        "measured fidelity floors); on CPUs without AMX it is slower than fp32.",
    )
    fit_from_data: bool = Field(
        False,
        description="Pixel detectors: before the first step, fit each sensor's occupancy (log-linear in the "
        "conditions, Poisson likelihood), the charge quantiles and the neighbour probability of cluster growth "
        "(from the mean cluster size) to the training events.",
    )
    discriminator_stem_channels: int = Field(
        0, ge=0,
        description="Pixel detectors: channels of a stride-1 3x3 convolution before the discriminator's stride-2 "
        "encoder, which sees cluster shapes pixel by pixel (0 = none: cheaper at full resolution).",
    )
    discriminator_channels: list[int] = Field(
        default_factory=lambda: [8, 16, 32, 64],
        description="Pixel detectors: conv encoder channels of the per-sensor discriminator (stride-2 each).",
    )
    hidden_dim: int = Field(256, gt=0, description="Calorimeters: hidden width of the per-layer cell decoder/encoder MLPs.")
    loss: Literal["hinge", "nonsaturating"] = Field("hinge", description="Adversarial loss.")
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0, description="EMA decay of generator weights (0 disables EMA).")
    gate_temperature: float = Field(0.5, gt=0.0, description="Temperature of the relaxed hit/no-hit gate (logistic noise).")
    event_score_weight: float = Field(1.0, ge=0.0, description="Weight of the event-level (attention) discriminator term.")
    similarity_weight: float = Field(
        0.0, ge=0.0,
        description="Intra-event similarity loss: match the fake event's sensor-to-sensor similarity matrix to the real one.",
    )
    physics_weight: float = Field(
        0.0, ge=0.0,
        description="Physics term, matched to the real events of the same conditions: log occupancy per sensor "
        "(pixel) or log hits per shower (calo), both expected over the hit gates, plus for analog calorimeters the "
        "log deposited/incident energy of the sampled shower.",
    )
    cell_threshold_mev: float = Field(
        0.01515, ge=0.0, description="Calorimeters: cells below this energy (MeV) are not hits (CaloChallenge 15.15 keV)."
    )

    @field_validator("decoder_channels", "discriminator_channels")
    @classmethod
    def _channels(cls, v: list[int]) -> list[int]:
        if not v or any(c <= 0 for c in v):
            raise ValueError("must be a non-empty list of positive channel counts")
        return v

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GanConfig:
        if self.embed_dim % self.attention_heads:
            raise ValueError(f"attention_heads ({self.attention_heads}) must divide embed_dim ({self.embed_dim})")
        if self.cluster_shapes and self.cluster_growth:
            raise ValueError("cluster_shapes and cluster_growth are two ways of making clusters: set one of them")
        if self.cluster_charge_profile and not (self.cluster_shapes and self.charge_noise and self.fit_from_data):
            raise ValueError("cluster_charge_profile needs cluster_shapes > 0, charge_noise and fit_from_data: true")
        if self.cluster_charge_share and not self.cluster_charge_profile:
            raise ValueError("cluster_charge_share needs cluster_charge_profile: true (it shares the profile's noise)")
        if self.cluster_charge_bank and not self.cluster_charge_profile:
            raise ValueError("cluster_charge_bank needs cluster_charge_profile: true (it replaces the profile's charges)")
        if self.cluster_charge_bank_per_sensor and not self.cluster_charge_bank:
            raise ValueError("cluster_charge_bank_per_sensor needs cluster_charge_bank > 0")
        if self.charge_at_fit and not (self.charge_noise and self.fit_from_data):
            raise ValueError("charge_at_fit needs charge_noise and fit_from_data: true (it keeps the fitted charge)")
        if self.cluster_merge_correction and not self.count_law:
            raise ValueError("cluster_merge_correction needs count_law (it moves the law's level)")
        if self.merge_density_correction and not self.cluster_merge_correction:
            raise ValueError("merge_density_correction needs cluster_merge_correction: true (its level factor then "
                             "holds only what the density does not)")
        if self.count_law and not (self.cluster_shapes and self.fit_from_data):
            raise ValueError("count_law needs cluster_shapes > 0 (it counts clusters) and fit_from_data: true "
                             "(it is fitted to the training data)")
        return self
