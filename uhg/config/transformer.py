"""Configuration of the autoregressive hit-transformer family (uhg.models.transformer).

Owned by the transformer family; its fields may grow with the model. The `family` literal is
the discriminator of `uhg.config.models.ModelConfig`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from uhg.config.base import Section

ABSOLUTE_RANGE_MEV = (0.01515, 1.0e6)
"""Default bin range of energy_reference=absolute, MeV (the DS2 threshold, 15.15 keV, to 1 TeV)."""
INCIDENT_RANGE_FRACTION = (1.0e-9, 1.0)
"""Default bin range of energy_reference=incident, fractions of the incident energy."""
_RANGE_KEYS = {"absolute": ("energy_min_mev", "energy_max_mev"),
               "incident": ("energy_min_fraction", "energy_max_fraction")}


class TransformerConfig(Section):
    """Hits as tokens ordered within each sensor (or calorimeter shower); an end-of-set token
    decides multiplicity. One sequence per (event, PXD sensor), one per calorimeter shower."""

    family: Literal["transformer"] = Field("transformer", description="Model family selector.")
    conditions: list[str] = Field(
        default_factory=lambda: ["luminosity"],
        description="Event conditions (log-scaled; the training range of each maps to [-1, 1], "
        "higher values extrapolate linearly in log).",
    )
    token: Literal["pixel", "cluster"] = Field(
        "pixel",
        description="What one token is (PXD). pixel: one fired pixel (row, col, ADC code). cluster: one "
        "connected group of fired pixels (anchor row, anchor col, shape from a vocabulary built from the "
        "training store's clusters, cluster-charge class, ADC code of each of its pixels), so clusters "
        "have the shapes of the data and an event takes ~mean-cluster-size times fewer steps. The count "
        "law then counts cluster tokens. Calorimeters: pixel only. Exports written before this key "
        "existed are pixel.",
    )
    cluster_shapes: int = Field(
        512, ge=2,
        description="token=cluster: shapes in the vocabulary (the most frequent pixel patterns of the "
        "training clusters; rarer or larger clusters are split into vocabulary shapes).",
    )
    cluster_max_pixels: int = Field(16, ge=1, le=64, description="token=cluster: largest shape in the vocabulary, pixels.")
    cluster_charge_bins: int = Field(
        32, ge=2,
        description="token=cluster: classes of the cluster charge (equal in log ADU), drawn before the pixels' codes.",
    )
    cluster_pixel_context: bool = Field(
        False,
        description="token=cluster: each pixel's ADC code is drawn knowing the charge of the token's pixels "
        "drawn before it (shape order), so a cluster's pixels share its charge instead of fluctuating "
        "independently around their class means. Exports written before this key draw them independently.",
    )
    cluster_charge_redraws: int = Field(
        0, ge=0,
        description="token=cluster, generation: a token whose independently drawn pixel codes sum to a charge "
        "outside the charge class drawn for it has its codes drawn again, up to this many times (the codes "
        "of a training cluster always sum into its class). 0 = off; exports written before this key have it "
        "off. Not with cluster_pixel_context.",
    )
    cluster_code_bank: int = Field(
        0, ge=0,
        description="token=cluster: pixels of a bank of the ADC codes of training tokens, keyed by (shape, charge "
        "class) and fitted with the laws before training; a generated token of a key the bank holds takes the codes "
        "of one of its training tokens instead of per-pixel draws, keeping the data's split of a cluster's charge "
        "between its pixels. Training is unchanged. 0 = off (and for exports written before this key).",
    )
    cluster_code_bank_per_sensor: bool = Field(
        False,
        description="token=cluster with cluster_code_bank: a token takes the codes of a training token of its key "
        "on its own sensor where the bank holds one (else of any sensor).",
    )
    cluster_exclusive: bool = Field(
        False,
        description="token=cluster, generation: no pixel belongs to two tokens (as in every training sequence, "
        "where a token is a piece of one cluster): anchors on pixels earlier tokens of the sequence already "
        "fired, and shapes that would cover one, are left out of the draw. Off: about 1.4 % of the tokens of "
        "the pxd-mini model fell on earlier ones, merging with them (fewer, larger clusters: docs/results.md). "
        "Exports written before this key have it off.",
    )
    cluster_merge_redraws: int = Field(
        0, ge=0, le=64,
        description="token=cluster with cluster_exclusive, generation: a drawn token that would join the clusters of "
        "its sequence it touches into one whose pattern is a vocabulary shape is drawn again (anchor, shape, charge "
        "and pixel codes, from the same distribution), up to this many times. The encoder writes such a cluster as "
        "one token, so no training sequence holds it (0 of the pxd-mini reference's tokens; 1.6 % of the shipped "
        "model's: docs/results.md). 0: off.",
    )
    d_model: int = Field(128, gt=0, description="Token width.")
    n_layers: int = Field(4, gt=0, description="Transformer blocks (pre-norm, FiLM-modulated by the sequence context).")
    n_heads: int = Field(4, gt=0, description="Attention heads per block; d_model / n_heads must be a multiple of 4 (2-D rotary).")
    mlp_ratio: int = Field(4, gt=0, description="Hidden width of the block MLP, in units of d_model.")
    attention_window: int = Field(
        0, ge=0,
        description="Keys each token attends to besides the start token: the this-many most recent tokens "
        "(0 = all earlier tokens). Tokens are in grid order, so recent tokens are the nearby rows; a window "
        "bounds the cost and memory of each generation step however many hits a sensor has. Exports "
        "written before this key existed attend to all.",
    )
    rotary: bool = Field(True, description="2-D rotary embedding of the (row, col) or (layer, cell) position in attention.")
    rotary_grid: bool = Field(
        False,
        description="rotary, cartesian calorimeter layers (epical-mini, epical): rotate by the layer, the pixel row "
        "and the pixel column of a hit instead of the layer and its flat cell (row x columns + column), so "
        "attention scores depend on the row and column offsets between pixels; in the flat index an upper "
        "neighbour is a whole row of cells away and the end of a row is next to the start of the next. The "
        "layer takes a quarter of each head's rotation pairs (d_model / n_heads >= 6). Exports written before "
        "this key rotate by the flat cell.",
    )
    latent_dim: int = Field(
        8, ge=0,
        description="Event latent shared by all sensors of an event (carries intra-event correlations); "
        "inferred from per-sensor summaries in training, drawn from N(0, 1) in generation. 0 = off.",
    )
    kl_weight: float = Field(1.0, ge=0.0, description="Weight of the latent's KL term (per event) in the loss.")
    free_bits: float = Field(0.1, ge=0.0, description="KL nats per latent dimension not penalised (avoids posterior collapse).")
    latent_aux: float = Field(
        0.0, ge=0.0,
        description="Weight of an auxiliary loss on the event latent (0 = off; needs latent_dim): a small head "
        "predicts each sequence's summary (mean value class, and with cluster tokens the mean shape size in "
        "pixels) from the sequence's context as a Gaussian likelihood, shifted in units of its spread by the "
        "latent's first dimensions through a fixed readout. The sequences of one "
        "event are conditionally independent given the context, so what their summaries share beyond the "
        "conditions and counts (the event-to-event spread of mean cluster size and charge) can only come "
        "through the latent; the autoregressive heads alone left it unused on pxd-mini. Measured there "
        "(weights 1 and 10): the latent stayed unused all the same (docs/results.md, \"The event latent and "
        "the event-to-event spread\"). Training only: generation does not use the head.",
    )
    latent_prior: Literal["standard", "mixture"] = Field(
        "standard",
        description="Generation: law the event latent is drawn from. 'standard': the unit normal of the KL term. "
        "'mixture': a conditional mixture of diagonal Gaussians p(z | conditions) fitted after training to the "
        "encoder's latents of training events (draws of q(z | event); `uhg.models.latent_prior`, the one the "
        "calorimeter model uses), so generated latents fill the region the decoder was trained on. Exports "
        "without the key draw from the unit normal as before.",
    )
    prior_components: int = Field(8, gt=0, description="Gaussian components of the 'mixture' latent prior.")
    prior_hidden: int = Field(64, gt=0, description="Hidden width of the 'mixture' latent prior's network.")
    prior_steps: int = Field(
        2000, gt=0, description="Adam steps (512 latents each) fitting the 'mixture' latent prior after training.")
    max_hits: int = Field(
        4096, gt=0,
        description="Hard cap on hits per sequence (PXD sensor or calorimeter shower) in generation; "
        "sequences reaching it are cut and a warning says how many.",
    )
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature.")
    top_q: float = Field(1.0, gt=0.0, le=1.0, description="Adaptive-nucleus (top-q) sampling mass; 1 = plain sampling.")
    energy_bins: int = Field(128, ge=2, description="Calorimeters: log-energy bins of a cell's value token.")
    energy_reference: Literal["absolute", "incident"] = Field(
        "absolute",
        description="Calorimeters: what a cell's energy bin is relative to. absolute: bins of log E in MeV "
        "between energy_min_mev and energy_max_mev. incident: bins of log(E / E_inc) between "
        "energy_min_fraction and energy_max_fraction, decoded with the shower's incident energy, so a "
        "token means the same share of the shower at any energy (extrapolation in energy). Exports "
        "written before this key existed are absolute.",
    )
    energy_min_mev: float | None = Field(
        None, gt=0.0,
        description=f"Calorimeters, energy_reference=absolute: lower edge of the energy bins, MeV "
        f"(default {ABSOLUTE_RANGE_MEV[0]}).",
    )
    energy_max_mev: float | None = Field(
        None, gt=0.0,
        description=f"Calorimeters, energy_reference=absolute: upper edge of the energy bins, MeV "
        f"(default {ABSOLUTE_RANGE_MEV[1]:g}).",
    )
    energy_min_fraction: float | None = Field(
        None, gt=0.0,
        description=f"Calorimeters, energy_reference=incident: lower edge of the bins as a fraction of the "
        f"incident energy (default {INCIDENT_RANGE_FRACTION[0]:g}; smaller deposits land in the lowest bin).",
    )
    energy_max_fraction: float | None = Field(
        None, gt=0.0,
        description=f"Calorimeters, energy_reference=incident: upper edge of the bins as a fraction of the "
        f"incident energy (default {INCIDENT_RANGE_FRACTION[1]:g}).",
    )
    multiplicity: Literal["end", "count"] = Field(
        "end",
        description="What decides the number of hits of a sequence. end: the END token. count: a "
        "negative-binomial count model draws it first (mean = positions of the unit x sigmoid(eta), "
        "eta linear in the log-scaled conditions: a power law at low occupancy that saturates at "
        "the full grid; event-wide fluctuations through a one-factor copula), the hits are then sampled knowing how many remain, and END "
        "comes exactly after the drawn count. The count law, not the attention stack, carries the "
        "condition dependence of the multiplicity, so it extrapolates as the law does.",
    )
    pace_prior: bool = Field(
        False,
        description="multiplicity=count: the row and column logits of each hit or cluster token get a term "
        "that spaces the tokens still to place evenly over the grid positions still free (a geometric gap "
        "whose rate is remaining tokens / positions left), scaled by a learned weight; the network learns the "
        "rest. Without it the network paces the tokens itself, which does not follow counts above the training "
        "range (tokens are pushed to the last rows, where they overlap). Exports written before this key "
        "have none.",
    )
    pace_law: Literal["geometric", "negative_hypergeometric"] = Field(
        "geometric",
        description="pace_prior, rows and columns (not layer_counts): the law of the gap to the next token. "
        "geometric: a constant rate remaining / positions left, whose mean gap is positions left / remaining, so "
        "the last token lands on average at the end of the grid and a sequence falls behind the data's tokens, "
        "whose remaining ones leave room after the last (mean gap positions left / (remaining + 1)); the sampler "
        "then places the rest in the last rows. negative_hypergeometric: the exact gap of the first of the "
        "remaining tokens when they take distinct positions, uniformly among those left (P(gap >= g) = "
        "C(left - g, remaining) / C(left, remaining)); like the geometric one it uses only the count and the "
        "positions left. A generation setting as well: an export trained with the geometric term generates with "
        "this one when its config sets it. Exports without the key pace geometrically, as before.",
    )
    event_counts: bool = Field(
        False,
        description="multiplicity=count, several units (PXD sensors): each sequence's context also sees the "
        "token counts of all units of its event (the training event's in training, the count law's draws in "
        "generation), through a learned linear map. How busy the whole event is, and where, then informs what "
        "each token is (cluster shape, charge), as the data show; without it a sequence knows only its own "
        "count and the event latent, which is drawn independently of the counts in generation. Exports written "
        "before this key have none.",
    )
    sensor_groups: int = Field(
        1, ge=1,
        description="Several units (PXD sensors): the units of an event are generated in this many groups, one "
        "after the other, p(event) = prod_g p(units of group g | units of the groups before g). Each sequence's "
        "context also sees a summary of the tokens of its event's earlier groups (the training event's own, "
        "teacher-forced, in training; those already generated in generation): their mean shape size in pixels "
        "(cluster tokens), mean value (charge) class, log tokens per unit and the fraction of the units they "
        "cover (all 0 for the first group), through a learned linear map that starts at zero. What the units of "
        "an event share beyond their counts (the spread of an event's mean cluster size and charge) then passes "
        "from group to group; only pairs of units of the same group stay conditionally independent. Unit u of "
        "ladder (u = 2 l + n, n = 0, 1) is in group (l + n) mod G: the two sensors of a ladder fall into "
        "neighbouring groups, and a group holds forward and backward sensors of both layers. 1: every unit "
        "independently given its context, as exports written before this key. Generation runs the groups in turn: G "
        "sampling passes over a G-th of the sequences each (on pxd-mini G = 8 cost 5-50 % more time per event).",
    )
    event_summary: bool = Field(
        False,
        description="multiplicity=count, several units (PXD sensors): an event-wide summary of the event's tokens, "
        "drawn before any token, that every sequence's context sees through a learned linear map that starts at "
        "zero: the mean shape size in pixels (log; cluster tokens) and the mean value (charge) class over all the "
        "event's tokens, intensive statistics only (the counts are the count law's). In training a sequence sees "
        "the summary of its event's other units' tokens (leave one out), so the model learns from the data how "
        "strongly a unit follows the rest of its event. In generation the summary is a least-squares trend in the "
        "conditions and the event's log tokens per unit (the count law's draws), fitted to the training events "
        "of `fit_events`, plus the residual of one of those events, picked by the event's seed. The first of "
        "`sensor_groups` then knows the event too. Exports written before this key have none.",
    )
    count_law: Literal["power", "powers", "quadratic", "pooled", "unit_quadratic"] = Field(
        "quadratic",
        description="multiplicity=count: how eta depends on the log-scaled conditions x (every condition in "
        "`conditions`), all learned from the data. power: a_u + b_u . x (one power law per unit, free exponents); "
        "powers: log sum_k exp(a_uk + beta_k . x), `count_terms` power-law components with free real exponents "
        "beta_k shared by the units and amplitudes per unit (backgrounds made of processes that scale "
        "differently); quadratic: a_u + (b + d_u) . x + x^T Q x (shared slope and curvature, per-unit slope deviations shrunk towards "
        "the shared slope, the ridge chosen on held-out events); pooled: the quadratic form whose per-unit slope is a part "
        "proportional to the unit's level (one coefficient per condition, fitted on every unit) plus a shrunk remainder, "
        "the ridge on Q chosen by forward validation (fit on the lower half of the training range, scored on the "
        "upper half), then the ridge on the remainder on held-out events at that Q; unit_quadratic: a_u + b_u . x + c_u . x^2 (slope and curvature of every unit its own: "
        "calorimeter layers with layer_counts, whose tail grows faster than the saturating core). docs/transformer.md "
        "and docs/calorimeter.md have the measurements behind the defaults.",
    )
    layer_counts: bool = Field(
        False,
        description="Calorimeters, multiplicity=count: the count law draws the hits of every layer (one "
        "negative binomial per layer, its dependence on the conditions learned from the training showers as "
        "`count_law` says; the layers of a shower correlated through the copula, `count_factors`) and the "
        "transformer places exactly that many in each layer: the layer of every hit follows from the drawn "
        "counts, the network chooses the cell. The longitudinal profile then follows the law beyond the "
        "training range instead of the network's pacing. With pace_prior the pacing is per layer. Exports "
        "written before this key draw one count per shower.",
    )
    layer_split: bool = Field(
        False,
        description="layer_counts: draw each shower's pixel total first from a one-unit count law (`count_law`, "
        "fitted to the training showers' totals) and split it over the layers with a learned share law (a "
        "Dirichlet-multinomial whose mean shares are a softmax of per-layer quadratics in the log-scaled "
        "conditions plus a per-shower depth factor; fitted by maximum likelihood to the training showers' "
        "pixels per layer). The total then keeps the data's shower-to-shower spread beyond the training range, "
        "which a sum of per-layer draws does not (docs/calorimeter.md). count_factors does not apply. Exports "
        "written before this key draw every layer from its own law.",
    )
    share_means: bool = Field(
        False,
        description="layer_split: after the share law's maximum-likelihood fit, refit its mean shares (bias, slope "
        "and curvature of every layer; depth pattern and concentration kept) so that its expected pixels per "
        "layer, summed over the training showers, are the data's. The Dirichlet-multinomial likelihood is "
        "nearly flat along directions that move the deep layers' mean share at the top energies, so the maximum "
        "alone can leave them off by several per cent (docs/calorimeter.md, \"Share law: mean shares\").",
    )
    share_curvature: Literal["free", "forward"] = Field(
        "free",
        description="layer_split: the per-layer curvatures of the share law's logits in the log-scaled conditions. "
        "free: fitted by maximum likelihood alone; forward: with a ridge towards zero whose strength (none to "
        "1e5 showers' worth of log-likelihood) is the strongest whose fit to the lower half of the training "
        "range predicts every layer's mean pixels over the upper half as well as the best within the layers' "
        "noise. A curvature is multiplied by the square of the log-energy beyond the range "
        "(docs/calorimeter.md, \"Share law: curvatures chosen forward\"). Exports written before this key: free.",
    )
    cell_field: bool = Field(
        False,
        description="layer_counts, cartesian calorimeter layers (epical): the cell of every pixel is paced by a "
        "smooth per-cell fire probability over the layer, learned by the network from a radial basis of the "
        "cell's distance to the layer centre (and its x, y), in place of pace_prior's uniform spacing: the next "
        "fired cell in (row, column) order is the first of independent per-cell draws, so a layer's pixels "
        "gather where the network's field is high. Starts equal to the uniform pacing (the field's weights are "
        "zero) and every token input also carries its cell's basis. docs/calorimeter.md. Exports written "
        "before this key have none.",
    )
    cell_profile: bool = Field(
        False,
        description="cell_field: the field starts from each layer's mean fired-cell profile q, "
        "fitted before training to the training showers (a softmax over the layer's cells of cell_field's radial "
        "basis, per layer, by maximum likelihood), not from an even spacing: with a zero field the next pixel of a "
        "layer is the smallest of its N pixels still to place drawn independently from q over the cells left, so a "
        "layer's pixels come out as N draws from q in whatever order they are placed. The even spacing spreads "
        "the pixels left over the cells left, which are below the placement, and a field short of its fit lets "
        "a layer's pixels drift down the rows (docs/calorimeter.md, \"Fired-cell profile\"). With "
        "pixel_head=factorised q is a softmax over the field's tiles (constant on a tile), the pixel row and "
        "then the column carry that law exactly, and the field multiplies it by its own first-success law "
        "over the uniform pacing's. Exports written before this key pace evenly.",
    )
    cell_neighbours: bool = Field(
        False,
        description="cell_field with pixel_head=flat: the logit of each candidate cell also gets a learned weight "
        "per causal neighbour already fired in the same layer (the two cells to its left, the three above it and "
        "the one two rows above), the weights set by the network from the token's state. The field alone is "
        "smooth over the layer, so it cannot say that a fired pixel makes its neighbours likely: on epical-mini "
        "the model without it generated 7.9 / 8.6 % fewer pixels with a fired left / upper neighbour than the "
        "simulation (docs/calorimeter.md). Starts equal to the model without it (zero weights).",
    )
    pixel_head: Literal["flat", "factorised"] = Field(
        "flat",
        description="layer_counts: how the cell of a pixel within its layer is predicted. flat: one categorical over "
        "the layer's cells (at most 65 536; epical-mini). factorised: the pixel row, then the pixel column given the "
        "row, each a categorical over one side of the grid, so a layer of 1024 x 1024 pixels (the full 25 M-channel "
        "epical) costs two 1024-way heads per pixel; with cell_field the field is constant on tiles of "
        "`field_tile` x `field_tile` pixels, which keeps its row and column sums exact and cheap (docs/calorimeter.md).",
    )
    field_tile: int = Field(
        32, ge=1, le=1024,
        description="pixel_head=factorised with cell_field: side in pixels of the square tiles on which the cell "
        "field is constant (it must divide both sides of the layer grid).",
    )
    count_factors: int = Field(
        1, ge=1, le=8,
        description="multiplicity=count: factors of the Gaussian copula that correlates the units' counts (1: "
        "one event-wide factor, all units busier together; more let a shower's layers move in several "
        "patterns, e.g. earlier or later as well as busier). Exports written before this key have one.",
    )
    count_terms: int = Field(2, ge=1, le=8, description="count_law=powers: number of power-law components.")
    count_dispersion: Literal["constant", "power", "forward"] = Field(
        "constant",
        description="multiplicity=count: the negative-binomial dispersion of each unit's count. constant: r_u "
        "(extra variance grows as the mean squared); power: r_u (mean / positions)^k with k fitted to the "
        "training events with the rest of the law (k = 0 is constant, k = 1 extra variance proportional to "
        "the mean). On pxd-mini a constant r_u, fitted over the whole training range, gave 17-28 % too much "
        "variance per sensor at its top (docs/results.md). forward: constant or power, whichever, fitted to "
        "the lower half of the training range, gives the events of the upper half the higher likelihood "
        "(power only by more than their noise): the spread is chosen as it will be used, beyond the top "
        "(docs/calorimeter.md, \"Spread of the pixel total\"). Exports written before this key have constant.",
    )
    count_bootstrap: int = Field(
        16, ge=0, le=256,
        description="multiplicity=count: refits of the law's mean parameters on resampled training events, kept "
        "with the model; `uhg eval extrapolate` reports the band they give on the predicted mean occupancy "
        "(0 = no band).",
    )
    fit_events: int = Field(
        8192, ge=1,
        description="Training events (evenly spread over the store) that the laws (count, share, response) "
        "and the cluster vocabulary are first fitted to: a law with a few parameters per sensor needs "
        "thousands of events for percent-level per-sensor means (on pxd-mini the count law's per-sensor miss "
        "at the top of the range fell from 2.6 % on 3612 events to 1.4 % on 14 429: docs/results.md). Only "
        "per-unit counts and energy sums are kept, so memory does not grow with the hits.",
    )
    law_lr: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Learning rate of the count and response laws after their maximum-likelihood start, as a "
        "fraction of train.lr. 0: they stay at their fit and only the network trains (a law trained on small "
        "batches with Adam at the network's rate drifts away from its fit and extrapolates with the drift; "
        "docs/transformer.md has the measurement).",
    )
    response_model: bool = Field(
        False,
        description="Calorimeters: draw each shower's deposited energy first, E_dep / E_inc from a "
        "log-normal whose mean and log-width are linear in the log-scaled conditions (response "
        "and resolution laws), and scale the sampled cell energies to it.",
    )
    ema_decay: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="EMA decay of the weights that are validated and exported (0 = the trained weights).",
    )
    generate_batch_sequences: int = Field(
        4096, gt=0, description="Generation: sequences sampled together (events per pass = this / sensors).",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_energy_range(cls, data: Any) -> Any:
        """Fill the bin range of the chosen energy_reference, so the export records the numbers."""
        if not isinstance(data, dict):
            return data
        ref = data.get("energy_reference", "absolute")
        keys = _RANGE_KEYS.get(ref) if isinstance(ref, str) else None
        if keys is None:
            return data  # an invalid reference is reported by its field
        data = dict(data)
        for key, default in zip(keys, ABSOLUTE_RANGE_MEV if ref == "absolute" else INCIDENT_RANGE_FRACTION,
                                strict=True):
            if data.get(key) is None:
                data[key] = default
        return data

    @model_validator(mode="after")
    def _shapes(self) -> TransformerConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        if self.rotary and (self.d_model // self.n_heads) % 4:
            raise ValueError(
                f"with rotary=true the head width d_model/n_heads ({self.d_model // self.n_heads}) must be a multiple of 4"
            )
        if self.latent_prior != "standard" and not self.latent_dim:
            raise ValueError(f"latent_prior ({self.latent_prior}) is the law of the event latent: set latent_dim > 0")
        if self.latent_aux and self.latent_dim < (2 if self.token == "cluster" else 1):
            raise ValueError(f"latent_aux ({self.latent_aux}) reads the event latent's first "
                             f"{2 if self.token == 'cluster' else 1} dimensions: latent_dim ({self.latent_dim}) is too small")
        if self.rotary_grid and not self.rotary:
            raise ValueError("rotary_grid chooses the positions of the rotary embedding: set rotary: true")
        if self.rotary_grid and self.d_model // self.n_heads < 6:
            raise ValueError(f"rotary_grid rotates by layer, pixel row and pixel column: the head width d_model/n_heads "
                             f"({self.d_model // self.n_heads}) must be at least 6")
        ref = self.energy_reference
        other = "incident" if ref == "absolute" else "absolute"
        for key in _RANGE_KEYS[other]:
            if getattr(self, key) is not None:
                lo, hi = _RANGE_KEYS[ref]
                raise ValueError(f"{key} ({getattr(self, key)}) is a bin edge of energy_reference={other}, but "
                                 f"energy_reference={ref}: remove {key} and give the range as {lo}/{hi}")
        lo_key, hi_key = _RANGE_KEYS[ref]
        lo, hi = getattr(self, lo_key), getattr(self, hi_key)
        if lo is None or hi is None:
            raise ValueError(f"energy_reference={ref} needs {lo_key} and {hi_key}")
        if hi <= lo:
            raise ValueError(f"{hi_key} ({hi}) must be > {lo_key} ({lo})")
        if ref == "incident" and "incident_energy" not in self.conditions:
            raise ValueError(f"energy_reference=incident decodes cell energies with the incident energy, so "
                             f"conditions must include incident_energy (got {self.conditions})")
        if self.pace_prior and self.multiplicity != "count":
            raise ValueError("pace_prior spaces the tokens a count law has drawn, so it needs multiplicity=count "
                             f"(got multiplicity={self.multiplicity})")
        if self.pace_law != "geometric" and (not self.pace_prior or self.layer_counts):
            raise ValueError(f"pace_law={self.pace_law} is the gap law of pace_prior's row and column term, so it needs "
                             f"pace_prior: true without layer_counts (got pace_prior={str(self.pace_prior).lower()}, "
                             f"layer_counts={str(self.layer_counts).lower()})")
        if self.event_counts and (self.multiplicity != "count" or self.layer_counts):
            raise ValueError("event_counts feeds every sequence the counts the law has drawn for its event's units, so it "
                             f"needs multiplicity=count without layer_counts (got multiplicity={self.multiplicity}, "
                             f"layer_counts={self.layer_counts})")
        if self.event_summary and (self.multiplicity != "count" or self.layer_counts):
            raise ValueError("event_summary draws an event's summary given the counts the law has drawn for its units, so "
                             f"it needs multiplicity=count without layer_counts (got multiplicity={self.multiplicity}, "
                             f"layer_counts={self.layer_counts})")
        if self.layer_counts and self.multiplicity != "count":
            raise ValueError("layer_counts draws the hits of each layer from the count law, so it needs "
                             f"multiplicity=count (got multiplicity={self.multiplicity})")
        if self.layer_split and not self.layer_counts:
            raise ValueError("layer_split splits a shower's pixel total over its layers, so it needs "
                             "layer_counts: true (got layer_counts=false)")
        if self.share_curvature != "free" and not self.layer_split:
            raise ValueError(f"share_curvature ({self.share_curvature}) fits the share law of layer_split, so it "
                             "needs layer_split: true (got layer_split=false)")
        if self.share_means and not self.layer_split:
            raise ValueError("share_means refits the share law of layer_split, so it needs layer_split: true "
                             "(got layer_split=false)")
        if self.cell_field and not self.layer_counts:
            raise ValueError("cell_field paces the cells of a layer whose pixels the count law has drawn, so it "
                             "needs layer_counts: true (got layer_counts=false)")
        if self.cell_field and self.pace_prior:
            raise ValueError("cell_field replaces pace_prior's uniform spacing of a layer's cells: set pace_prior: "
                             "false (or cell_field: false)")
        if self.cell_neighbours and not (self.cell_field and self.pixel_head == "flat"):
            raise ValueError("cell_neighbours weights the fired neighbours of a layer's cells in cell_field's flat "
                             f"head, so it needs cell_field: true and pixel_head: flat (got cell_field="
                             f"{str(self.cell_field).lower()}, pixel_head={self.pixel_head})")
        if self.cell_profile and not self.cell_field:
            raise ValueError("cell_profile paces a layer's pixels in cell_field's law, so it needs cell_field: true")
        if self.pixel_head == "factorised" and not self.layer_counts:
            raise ValueError("pixel_head=factorised predicts the pixel of a hit within the layer the count law has "
                             "drawn, so it needs layer_counts: true (got layer_counts=false)")
        if self.cluster_exclusive and self.token != "cluster":
            raise ValueError(f"cluster_exclusive keeps the pixels of cluster tokens apart, so it needs token: cluster "
                             f"(got token={self.token!r})")
        if self.cluster_merge_redraws and not self.cluster_exclusive:
            raise ValueError("cluster_merge_redraws checks tokens against the pixels earlier tokens fired, which "
                             "cluster_exclusive keeps: set cluster_exclusive: true (got false)")
        if self.cluster_charge_redraws and self.cluster_pixel_context:
            raise ValueError("cluster_charge_redraws redraws independently drawn pixel codes, but "
                             "cluster_pixel_context draws them slot by slot: switch one of them off")
        if self.cluster_code_bank and self.token != "cluster":
            raise ValueError(f"cluster_code_bank holds the pixel codes of cluster tokens, so it needs token: cluster "
                             f"(got token={self.token!r})")
        if self.cluster_code_bank_per_sensor and not self.cluster_code_bank:
            raise ValueError("cluster_code_bank_per_sensor needs cluster_code_bank > 0")
        if self.response_model and "incident_energy" not in self.conditions:
            raise ValueError(f"response_model draws E_dep / E_inc, so conditions must include incident_energy "
                             f"(got {self.conditions})")
        return self

    @property
    def energy_range(self) -> tuple[float, float]:
        """(lowest, highest) bin edge: MeV (absolute) or fractions of the incident energy (incident)."""
        lo_key, hi_key = _RANGE_KEYS[self.energy_reference]
        return float(getattr(self, lo_key)), float(getattr(self, hi_key))
