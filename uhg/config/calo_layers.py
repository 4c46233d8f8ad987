"""Configuration of the layer-energy calorimeter family (uhg.models.calo_layers)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from uhg.config.base import Section


class CaloLayersConfig(Section):
    """Calorimeter showers in two stages: the energy of every layer first (an autoregressive
    mixture law conditioned on the incident energy), then the voxel energies of each layer given
    those layer energies (a conditional VAE over the energy shares within each layer)."""

    family: Literal["calo_layers"] = Field("calo_layers", description="Model family selector.")
    conditions: list[str] = Field(default_factory=lambda: ["incident_energy"],
                                  description="Event conditions (log-scaled; training range -> [-1, 1]).")
    law_hidden: int = Field(128, gt=0, description="Hidden width of the layer-energy law's network.")
    law_components: int = Field(8, gt=0, description="Gaussian components per layer of the layer-energy law.")
    layer_floor: float = Field(
        1e-7, gt=0.0,
        description="Layer energies are modelled as log(E_layer / E_inc + layer_floor): an empty layer sits at "
        "log(layer_floor).")
    layer_target: Literal["layers", "total_shares"] = Field(
        "layers",
        description="What the layer-energy law models. 'layers': log(E_layer / E_inc + layer_floor) of every layer, "
        "autoregressively; the total deposit and its spread come out of the sum. 'total_shares': first "
        "log(E_dep / E_inc), the total deposited fraction, then log(E_layer / E_dep + layer_floor) of every layer "
        "given it, the sampled shares renormalised to sum to one: the response and its spread per incident energy "
        "are learned as one variable, not as a small difference of large anticorrelated layer fluctuations.")
    empty_layers: Literal["floor", "bernoulli"] = Field(
        "floor",
        description="How the layer-energy law treats a layer without energy. 'floor': as the value "
        "log(layer_floor), a spike far below the layers that hold energy, which then also sets the scale the law's "
        "values are standardised with. 'bernoulli': whether each layer is empty is its own variable of the law "
        "(a probability from the same autoregressive network, given the earlier layers and which of them were "
        "empty), the mixture models only the layers that hold energy, and the standardisation is over those "
        "(measured on layers that are often empty: docs/calorimeter.md). Needs layer_target 'total_shares'.")
    law_condition_skip: bool = Field(
        False,
        description="Give every variable of the layer-energy law its own linear dependence on the condition (log "
        "E_inc), added to all its outputs (mixture weights, means, widths, empty logit), besides the shared network: "
        "how each layer's share moves with the energy is then learned directly instead of from the product of the "
        "layer's one-hot and the condition inside the network (measured: docs/results.md).")
    law_fit_steps: int = Field(
        0, ge=0,
        description="After training, train the layer-energy law alone this many more Adam steps (batch 512) on the "
        "layer energies of `fit_events` training showers, its learning rate decayed from `law_fit_lr` to 0 (cosine): "
        "the law trained together with the voxel stage at a constant rate ends wherever its last steps left it "
        "(measured: the energy per layer moved by 2-5x between initialisations; docs/results.md). 0: off.")
    deposit_spread: Literal["network", "log_linear", "log_quadratic", "power_floor"] = Field(
        "network",
        description="How the spread of the deposited fraction log(E_dep / E_inc) depends on the incident energy. "
        "'network': the law's network, fed log E_inc, learns it with everything else (beyond the training range it "
        "is the network's extrapolation). Otherwise the fraction is standardised per shower by a location (a "
        "quadratic in log E_inc) and a scale fitted to the training showers by maximum likelihood with the "
        "standardisation, and the law's first variable sees the condition only inside the training range: "
        "'log_linear' log scale = a + b log E, 'log_quadratic' adds c (log E)^2, 'power_floor' scale = a power of "
        "E_inc falling to a fitted floor. The form is chosen by forward validation inside the training range "
        "(docs/calorimeter.md, 'Zero-shot in energy'). Needs layer_target 'total_shares'.")
    law_fit_lr: float = Field(1e-3, gt=0.0, description="Start learning rate of the after-training law fit.")
    vae_fit_steps: int = Field(
        0, ge=0,
        description="After training (and the law fit), train the voxel-share VAE alone this many more Adam steps "
        "(batch 512) on `fit_events` training showers, its learning rate decayed from `vae_fit_lr` to 0 (cosine): "
        "trained at a constant rate together with the law, its loss stops falling early and its end state, and "
        "with it the voxel classifier's AUC, moves from one training to the next (measured: docs/results.md). "
        "The residual quantiles and the latent prior are fitted after it. 0: off.")
    vae_fit_lr: float = Field(1e-3, gt=0.0, description="Start learning rate of the after-training VAE fit.")
    fit_events: int = Field(
        4096, gt=0,
        description="Training showers (spread over the training range) that set the layer-energy standardisation "
        "before training and that the after-training fits (law, residual quantiles, latent prior) use.")
    latent_dim: int = Field(32, gt=0, description="Latent dimension of the voxel VAE (carries the shower's shape).")
    hidden_dim: int = Field(512, gt=0, description="Hidden width of the voxel VAE's encoder and decoder.")
    kl_weight: float = Field(1.0, ge=0.0, description="Weight of the VAE's KL term.")
    free_bits: float = Field(0.05, ge=0.0, description="KL nats per latent dimension not penalised.")
    share_floor: float = Field(
        1e-6, gt=0.0,
        description="Voxel shares (energy / layer energy) below this are clipped in the log-share target.")
    share_temperature: float = Field(
        1.0, ge=0.0,
        description="Generation: scale of the per-voxel noise of the log shares (1 = the learned width; smaller "
        "values leave more of the shower-to-shower variation to the latent, whose shapes are coherent).")
    ring_correlation: bool = Field(
        False,
        description="Let the log-share noise of the voxels of one ring (same layer and radial bin) be correlated, "
        "with a correlation per ring learned by the VAE's decoder (False: independent per voxel). Needs a polar "
        "(r, alpha) geometry.")
    share_cap: bool = Field(
        False,
        description="Generation: cap every voxel's sampled share of its layer at the largest share that voxel has in "
        "the training showers (set with the layer-energy standardisation), then renormalise: a tail draw of the "
        "log-normal noise of a rarely hit outer voxel cannot pull the centre of energy further out than the data "
        "ever did.")
    empty_layer_voxel: Literal["most_likely", "drawn"] = Field(
        "most_likely",
        description="Generation: where the energy of a layer goes when the law gives it energy but none of its "
        "voxels' hit Bernoullis fires (in DS2's last layers, 40-50 % of the showers that reach them). "
        "'most_likely': the voxel with the highest hit probability, always the same central voxel for a given "
        "shower shape, which narrows the centre-of-energy distribution of nearly empty layers. 'drawn': one voxel "
        "drawn with probability proportional to the layer's voxel hit probabilities, so a one-hit layer lands "
        "where the decoder says hits land (measured: docs/results.md, 'DS2: the tail layers' centres').")
    share_noise: Literal["gaussian", "empirical", "empirical_correlated"] = Field(
        "gaussian",
        description="Generation: law of the standardised log-share noise of each voxel. 'gaussian': the VAE's "
        "normal. 'empirical': the quantiles of that voxel's standardised residuals in training showers "
        "(fitted after training, `CaloLayersModel.fit_residual_quantiles`), drawn through the same normals "
        "(a Gaussian copula, so ring correlations are kept): the measured residuals are skewed to the left, and "
        "the normal's heavier right tail is what pushed the centre of energy sideways. 'empirical_correlated': "
        "the same quantiles, drawn through normals with the within-layer correlation of the residuals' normal "
        "scores in those training showers (also fitted after training; not with ring_correlation).")
    latent_prior: Literal["standard", "mixture"] = Field(
        "standard",
        description="Generation: law the VAE's latent is drawn from. 'standard': the unit normal of the KL term. "
        "'mixture': a conditional mixture of diagonal Gaussians p(z | log E_inc, layer energies) fitted after "
        "training to the latents the encoder gives the training showers (draws of q(z | shower)), so generated "
        "latents fill the region the decoder was trained on rather than the unit normal, which the aggregate "
        "posterior does not match (`CaloLayersModel.fit_latent_prior`).")
    prior_components: int = Field(8, gt=0, description="Gaussian components of the 'mixture' latent prior.")
    prior_hidden: int = Field(128, gt=0, description="Hidden width of the 'mixture' latent prior's network.")
    prior_steps: int = Field(
        3000, gt=0, description="Adam steps (512 latents each) fitting the 'mixture' latent prior after training.")
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0, description="EMA of the exported weights (0 = off).")
    generate_batch: int = Field(1024, gt=0, description="Showers generated together.")

    @model_validator(mode="after")
    def _empty_layers_need_shares(self):
        if self.empty_layers == "bernoulli" and self.layer_target != "total_shares":
            raise ValueError("model.empty_layers 'bernoulli' models the layer shares of the deposit; "
                             "set model.layer_target to 'total_shares'")
        return self

    @model_validator(mode="after")
    def _deposit_spread_needs_shares(self):
        if self.deposit_spread != "network" and self.layer_target != "total_shares":
            raise ValueError("model.deposit_spread standardises the deposited fraction, the first variable of "
                             "layer_target 'total_shares'; set model.layer_target to 'total_shares'")
        return self

    @model_validator(mode="after")
    def _one_noise_correlation(self):
        # the ring correlation already mixes the normals that the fitted correlation would mix again
        if self.share_noise == "empirical_correlated" and self.ring_correlation:
            raise ValueError("model.share_noise 'empirical_correlated' fits its own within-layer correlation; "
                             "set model.ring_correlation to false")
        return self
