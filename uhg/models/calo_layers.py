"""Layer-energy calorimeter model: how the energy is shared between layers first, then how each
layer's energy is shared between its voxels.

Stage 1, `LayerEnergyLaw`: y_l = log(E_layer_l / E_inc + floor) for the layers that hold voxels,
an autoregressive mixture of Gaussians in layer order, p(y) = prod_l p(y_l | y_<l, condition),
one shared network fed the condition, the masked earlier layers and a one-hot of l. The
classifiers of the CaloChallenge see the layer energies first; this stage learns their joint law
(longitudinal profile and its event-by-event fluctuations) exactly by maximum likelihood. With
`layer_target: total_shares` its variables are log(E_dep / E_inc) first, then each layer's log
share of E_dep: the response and its spread are then one learned variable rather than the sum of
large anticorrelated layer fluctuations, whose spread the law got too wide (docs/calorimeter.md).
With `empty_layers: bernoulli` whether each variable is empty is a Bernoulli of the same network
and the mixture covers only layers that hold energy (an empty layer as the value log(floor) was a
spike that took the mixture's components and set the standardisation's scale); with
`law_condition_skip` each variable has its own linear dependence on the condition; with
`law_fit_steps` the law is trained alone after the joint training, to a decayed rate (`fit_law`).
With `deposit_spread` other than `network` the deposited fraction is standardised per incident
energy by a location and a scale that are low-order functions of log E_inc fitted to the training
showers (`uhg.models.calo_deposit.DepositLaw`), and the law's first variable sees the condition only inside the training
range: beyond it the fraction's spread follows the fitted function instead of whatever the
network's extrapolation gives (measured: docs/results.md).

Stage 2, `VoxelShareVae`: the share s_v = E_v / E_layer of every voxel inside its layer, from a
conditional VAE given the condition and the (normalised) layer energies: per voxel a hit
probability and a Gaussian of log s_v; the latent carries the shower's lateral shape and
position. Optionally (`ring_correlation`) the Gaussian noise of the voxels of one ring (same layer
and radial bin) shares a learned correlation rho per ring: a fluctuation of the radial profile
moves a whole ring together, and independent per-voxel noise that had to absorb it shifts the
centre of energy sideways (measured: docs/calorimeter.md). Sampled shares are renormalised
within each layer and multiplied by the stage-1 layer energies, so the energy per layer is
exactly that of stage 1.

With `latent_prior: mixture` generated latents come from `LatentPrior` (uhg.models.latent_prior, shared
with the hit transformer), a conditional mixture
p(z | condition, layer energies) fitted after training to the encoder's latents of training
showers, instead of the unit normal (measured on DS2: docs/calorimeter.md).

Nothing here is specific to one simulator: all shapes and fluctuations are learned from showers.
The model is dense in voxels (the CaloChallenge geometries have <= 40 500); stores and generated
showers stay sparse (the fired voxels).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from uhg.models.calo_deposit import DepositLaw
from uhg.models.latent_prior import LOG_2PI, LatentPrior, fit_latent_prior, mlp


class LayerEnergyLaw(nn.Module):
    """Autoregressive Gaussian mixture over n_layers normalised log layer energies. With
    `empty_logit` every variable is first empty or not (a Bernoulli of the same network, fed the
    earlier variables and which of them were empty), and the mixture models only the values of
    variables that are not empty; an empty variable is -inf in `log_prob` and `sample`."""

    def __init__(self, n_layers: int, n_cond: int, hidden: int, components: int, empty_logit: bool = False,
                 condition_skip: bool = False, bounded_rows: int = 0):
        super().__init__()
        self.n_layers, self.components, self.empty_logit = n_layers, components, empty_logit
        # the first `bounded_rows` variables see the (normalised) condition clipped to the training
        # range [-1, 1]: their law beyond it is the law at its edge
        self.register_buffer("bounded", torch.arange(n_layers) < bounded_rows, persistent=False)
        n_in = n_cond + (3 if empty_logit else 2) * n_layers
        n_out = 3 * components + (1 if empty_logit else 0)
        self.net = mlp(n_in, hidden, n_out)
        if condition_skip:
            # every layer's own linear dependence of all its outputs on the condition, added to the
            # network's (which must otherwise learn it from the product of the one-hot and the
            # condition); zero at the start
            self.skip = nn.Linear(n_cond, n_layers * n_out, bias=False)
            nn.init.zeros_(self.skip.weight)
        # earlier layers only: row l sees y_0 .. y_{l-1}
        self.register_buffer("mask", torch.tril(torch.ones(n_layers, n_layers), diagonal=-1), persistent=False)

    def _params(self, y: torch.Tensor, cond: torch.Tensor, rows: torch.Tensor):
        """Mixture parameters of layers `rows` ((R,) long) given y (B, L) and cond (B, C) -> (B, R, K) x3,
        and the empty logit (B, R) (None without `empty_logit`)."""
        b, r = len(y), len(rows)
        eye = torch.eye(self.n_layers, device=y.device)[rows]
        empty = torch.isneginf(y)
        cond_rows = cond[:, None, :].expand(b, r, -1)
        if bool(self.bounded.any()):
            cond_rows = torch.where(self.bounded[rows][None, :, None], cond_rows.clamp(-1.0, 1.0), cond_rows)
        parts = [cond_rows, torch.where(empty, 0.0, y)[:, None, :] * self.mask[rows]]
        if self.empty_logit:
            parts.append(empty.to(y.dtype)[:, None, :] * self.mask[rows])
        out = self.net(torch.cat([*parts, eye.expand(b, r, -1)], -1))
        if hasattr(self, "skip"):
            skip = self.skip(cond).view(b, self.n_layers, -1)[:, rows]
            if bool(self.bounded.any()):
                bounded = self.skip(cond.clamp(-1.0, 1.0)).view(b, self.n_layers, -1)[:, rows]
                skip = torch.where(self.bounded[rows][None, :, None], bounded, skip)
            out = out + skip
        logit, mu, log_sigma = out[..., :3 * self.components].chunk(3, dim=-1)
        empty_logit = out[..., -1] if self.empty_logit else None
        return F.log_softmax(logit, -1), mu, log_sigma.clamp(-7.0, 3.0), empty_logit

    def log_prob(self, y: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """(B,) log density of normalised log layer energies y (B, L) (-inf: empty, with `empty_logit`)."""
        log_w, mu, log_sigma, empty_logit = self._params(y, cond, torch.arange(self.n_layers, device=y.device))
        empty = torch.isneginf(y)
        z = (torch.where(empty, 0.0, y)[..., None] - mu) / log_sigma.exp()
        comp = log_w - 0.5 * z * z - log_sigma - 0.5 * LOG_2PI
        value = torch.logsumexp(comp, -1)
        if empty_logit is None:
            return value.sum(-1)
        return torch.where(empty, F.logsigmoid(empty_logit), F.logsigmoid(-empty_logit) + value).sum(-1)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, u: torch.Tensor, eps: torch.Tensor,
               lo: torch.Tensor | None = None, hi: torch.Tensor | None = None,
               can_empty: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) samples from uniforms u (B, L) (emptiness, then component choice) and normals eps
        (B, L), each layer clamped to [lo, hi] ((L,)) before the next layer conditions on it; a
        layer with can_empty ((L,) bool) false is never drawn empty."""
        y = torch.zeros(len(cond), self.n_layers, device=cond.device)
        for layer in range(self.n_layers):
            log_w, mu, log_sigma, empty_logit = self._params(y, cond, torch.tensor([layer], device=cond.device))
            u_k = u[:, layer]
            if empty_logit is not None:
                # one uniform decides both: below p_empty the layer is empty, above it the rest of
                # its range, rescaled to [0, 1), picks the component
                p_empty = torch.sigmoid(empty_logit[:, 0])
                if can_empty is not None and not bool(can_empty[layer]):
                    p_empty = torch.zeros_like(p_empty)
                empty = u_k < p_empty
                u_k = ((u_k - p_empty) / (1.0 - p_empty).clamp_min(1e-12)).clamp(0.0, 1.0)
            cdf = log_w[:, 0].exp().cumsum(-1)
            k = torch.searchsorted(cdf, u_k[:, None] * cdf[:, -1:]).clamp_max(self.components - 1)
            m, s = mu[:, 0].gather(1, k)[:, 0], log_sigma[:, 0].gather(1, k)[:, 0].exp()
            y[:, layer] = m + s * eps[:, layer]
            if lo is not None and hi is not None:
                y[:, layer] = y[:, layer].clamp(lo[layer], hi[layer])
            if empty_logit is not None:
                y[:, layer] = torch.where(empty, -torch.inf, y[:, layer])
        return y


RESIDUAL_LEVELS = 64
"""Quantile levels (k + 0.5) / 64 of the empirical log-share noise of each voxel."""
RESIDUAL_MIN_HITS = 50
"""A voxel hit fewer times than this in the fitting showers takes its layer's pooled residuals."""

RHO_MAX = 0.98
"""Largest within-ring correlation (keeps the ring covariance well conditioned)."""


class VoxelShareVae(nn.Module):
    """Conditional VAE of the voxel shares within layers. With `voxel_ring` ((V,) long ring index
    of every voxel) the log-share noise is equicorrelated within each ring, with a correlation
    per ring and shower from the decoder; without it the voxels' noise is independent."""

    def __init__(self, n_voxels: int, n_ctx: int, latent: int, hidden: int, voxel_ring: torch.Tensor | None = None):
        super().__init__()
        self.latent, self.n_voxels = latent, n_voxels
        self.n_rings = 0 if voxel_ring is None else int(voxel_ring.max()) + 1
        if voxel_ring is not None:
            self.register_buffer("voxel_ring", voxel_ring.long())
        self.encoder = mlp(2 * n_voxels + n_ctx, hidden, 2 * latent)
        self.decoder = mlp(latent + n_ctx, hidden, 3 * n_voxels + self.n_rings)

    def decode(self, z: torch.Tensor, ctx: torch.Tensor):
        """(hit logit, mean of log share, log sigma of log share), each (B, V), and the
        within-ring correlation (B, n_rings) (None without rings)."""
        out = self.decoder(torch.cat([z, ctx], -1))
        hit, mu, log_sigma = out[:, :3 * self.n_voxels].chunk(3, dim=-1)
        rho = torch.sigmoid(out[:, 3 * self.n_voxels:]) * RHO_MAX if self.n_rings else None
        return hit, mu, log_sigma.clamp(-5.0, 2.0), rho

    def _ring_sum(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(x), self.n_rings, device=x.device, dtype=x.dtype).index_add_(1, self.voxel_ring, x)

    def gauss_nll(self, log_share: torch.Tensor, hit: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor,
                  rho: torch.Tensor | None) -> torch.Tensor:
        """(B,) negative log density of the hit voxels' log shares. Per ring with m hit voxels and
        standardised residuals r: the equicorrelated Gaussian, C = (1 - rho) I + rho 1 1^T,
        r^T C^-1 r = (sum r^2 - rho / (1 - rho + m rho) (sum r)^2) / (1 - rho),
        log det C = (m - 1) log(1 - rho) + log(1 - rho + m rho)."""
        r = (log_share - mu) / log_sigma.exp() * hit
        base = ((log_sigma + 0.5 * LOG_2PI) * hit).sum(-1)
        if rho is None:
            return base + 0.5 * (r * r).sum(-1)
        m, s1, s2 = self._ring_sum(hit), self._ring_sum(r), self._ring_sum(r * r)
        one_minus, big = 1.0 - rho, 1.0 - rho + m * rho
        quad = (s2 - rho / big * s1 * s1) / one_minus
        log_det = (m - 1.0) * torch.log(one_minus) + torch.log(big)
        return base + 0.5 * (quad + log_det).sum(-1)

    def noise(self, log_sigma: torch.Tensor, rho: torch.Tensor | None, voxel_eps: torch.Tensor,
              ring_eps: torch.Tensor | None) -> torch.Tensor:
        """(B, V) log-share noise from per-voxel normals (B, V) and per-ring normals (B, n_rings)."""
        if rho is None:
            return log_sigma.exp() * voxel_eps
        rho_v = rho[:, self.voxel_ring]
        return log_sigma.exp() * ((1.0 - rho_v).sqrt() * voxel_eps + rho_v.sqrt() * ring_eps[:, self.voxel_ring])

    def encode(self, log_share: torch.Tensor, hit: torch.Tensor, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior (mean, log variance) (B, D) of log shares (B, V) (any value where not hit)."""
        hit_f = hit.float()
        mu_z, logvar_z = self.encoder(torch.cat([log_share * hit_f, hit_f, ctx], -1)).chunk(2, dim=-1)
        return mu_z, logvar_z.clamp(-12.0, 6.0)

    def loss(self, log_share: torch.Tensor, hit: torch.Tensor, ctx: torch.Tensor, free_bits: float):
        """Per-event (reconstruction NLL, KL) for log shares (B, V) (any value where not hit)."""
        hit_f = hit.float()
        mu_z, logvar_z = self.encode(log_share, hit, ctx)
        z = mu_z + torch.randn_like(mu_z) * (0.5 * logvar_z).exp()
        logit, mu, log_sigma, rho = self.decode(z, ctx)
        bce = F.binary_cross_entropy_with_logits(logit, hit_f, reduction="none").sum(-1)
        gauss = self.gauss_nll(log_share, hit_f, mu, log_sigma, rho)
        kl = 0.5 * (mu_z.pow(2) + logvar_z.exp() - 1.0 - logvar_z)
        kl = kl.clamp_min(free_bits).sum(-1) if free_bits > 0 else kl.sum(-1)
        return bce + gauss, kl


def fit_alone(params: Iterable[nn.Parameter], lr: float, steps: int, pool: torch.Tensor, gen: torch.Generator,
              loss_of: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """`steps` Adam steps on `params` alone, each on 512 indices drawn with replacement from `pool`
    (by `gen`), the rate decayed from `lr` to 0 by a cosine: the after-training fits of one part of
    the model, which end where the decayed rate settles rather than where the last constant-rate
    steps of the joint training left them."""
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with torch.enable_grad():
        for _ in range(steps):
            pick = pool[torch.randint(len(pool), (min(512, len(pool)),), generator=gen).to(pool.device)]
            loss = loss_of(pick)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


class CaloLayersModel(nn.Module):
    """Both stages for one geometry. `voxel_layer` ((V,) long) gives the position of each voxel's
    layer among the `n_layers` layers holding voxels; `voxel_ring` ((V,) long, optional) the ring
    (layer and radial bin) of each voxel, used when `cfg.ring_correlation` is set."""

    def __init__(self, voxel_layer: torch.Tensor, n_cond: int, cfg, voxel_ring: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.n_layers = int(voxel_layer.max()) + 1
        self.n_voxels = len(voxel_layer)
        self.register_buffer("voxel_layer", voxel_layer.long())
        # standardisation of the log layer energies, set from training showers before training
        self.register_buffer("y_mean", torch.zeros(self.n_layers))
        self.register_buffer("y_std", torch.ones(self.n_layers))
        # support of the law: the range of the training showers' standardised log layer energies
        # (a wide mixture component must not draw a layer with 10^6 x the incident energy)
        self.register_buffer("y_lo", torch.full((self.n_layers,), -1e4))
        self.register_buffer("y_hi", torch.full((self.n_layers,), 1e4))
        # `layer_target: total_shares`: the law's variables are the total deposited fraction and the
        # layer shares of it, with their own standardisation and support (set like y_*)
        self.n_law = self.n_layers + (1 if cfg.layer_target == "total_shares" else 0)
        if cfg.layer_target == "total_shares":
            self.register_buffer("t_mean", torch.zeros(self.n_law))
            self.register_buffer("t_std", torch.ones(self.n_law))
            self.register_buffer("t_lo", torch.full((self.n_law,), -1e4))
            self.register_buffer("t_hi", torch.full((self.n_law,), 1e4))
        if cfg.empty_layers == "bernoulli":
            # fraction of the training showers in which each law variable is empty: one that never
            # is (the deposit, the central layers) is never drawn empty either (the law's support)
            self.register_buffer("t_empty", torch.ones(self.n_law))
        if cfg.share_cap:
            # log of each voxel's largest share of its layer in the training showers (0: no cap)
            self.register_buffer("log_share_hi", torch.zeros(self.n_voxels))
        if cfg.share_noise != "gaussian":
            self._add_residual_quantiles()
        if cfg.share_noise == "empirical_correlated":
            self._add_noise_mix()
        spread = cfg.deposit_spread
        if spread != "network":
            if cfg.layer_target != "total_shares":
                raise ValueError("deposit_spread standardises the deposited fraction: needs layer_target total_shares")
            self.deposit = DepositLaw(spread)
        self.law = LayerEnergyLaw(self.n_law, n_cond, cfg.law_hidden, cfg.law_components,
                                  empty_logit=cfg.empty_layers == "bernoulli", condition_skip=cfg.law_condition_skip,
                                  bounded_rows=1 if spread != "network" else 0)
        if cfg.ring_correlation and voxel_ring is None:
            raise ValueError("ring_correlation needs the ring index of every voxel")
        self.vae = VoxelShareVae(self.n_voxels, n_cond + self.n_layers, cfg.latent_dim, cfg.hidden_dim,
                                 voxel_ring if cfg.ring_correlation else None)
        if cfg.latent_prior == "mixture":
            self.add_latent_prior()

    # -- representation
    def layer_energies(self, voxels: torch.Tensor) -> torch.Tensor:
        """(B, L) energy per layer of dense voxel energies (B, V)."""
        out = torch.zeros(len(voxels), self.n_layers, device=voxels.device, dtype=voxels.dtype)
        return out.index_add_(1, self.voxel_layer, voxels)

    def log_layer(self, e_layer: torch.Tensor, e_inc: torch.Tensor) -> torch.Tensor:
        return torch.log(e_layer / e_inc[:, None] + self.cfg.layer_floor)

    def law_target(self, e_layer: torch.Tensor, e_inc: torch.Tensor) -> torch.Tensor:
        """(B, n_law) the law's variables before standardisation: the log layer fractions
        (`layer_target: layers`), or log(E_dep / E_inc) followed by log(E_layer / E_dep + floor)
        (`total_shares`). With `empty_layers: bernoulli` an empty layer (or no deposit) is -inf."""
        if self.cfg.layer_target == "layers":
            return self.log_layer(e_layer, e_inc)
        e_dep = e_layer.sum(-1)
        total = torch.log(e_dep / e_inc + self.cfg.layer_floor)
        if hasattr(self, "deposit"):
            location, scale = self.deposit.location_scale(e_inc)
            total = (total - location) / scale
        shares = torch.log(e_layer / e_dep.clamp_min(1e-30)[:, None] + self.cfg.layer_floor)
        out = torch.cat([total[:, None], shares], -1)
        if self.cfg.empty_layers == "bernoulli":
            out = torch.where(torch.cat([e_dep[:, None], e_layer], -1) > 0, out, -torch.inf)
        return out

    @torch.no_grad()
    def set_standardisation(self, e_layer: torch.Tensor, e_inc: torch.Tensor) -> None:
        """Standardisation and support of the log layer fractions (y_*) and of the law's
        variables (t_*, `total_shares`) from training showers' layer energies (B, L) MeV and
        incident energies (B,) MeV."""
        if hasattr(self, "deposit"):
            e_dep = e_layer.sum(-1)
            self.deposit.fit(e_inc, torch.where(e_dep > 0, torch.log(e_dep / e_inc + self.cfg.layer_floor), -torch.inf))
        pairs = [(self.log_layer(e_layer, e_inc), "y")]
        if self.cfg.layer_target != "layers":
            pairs.append((self.law_target(e_layer, e_inc), "t"))
        for x, name in pairs:
            mean, std = getattr(self, f"{name}_mean"), getattr(self, f"{name}_std")
            # over the layers that hold energy only: with `empty_layers: bernoulli` (-inf entries)
            # the spike of empty layers no longer sets the scale the law's values are learned at
            held = torch.isfinite(x)
            if bool(held.all()):
                mean.copy_(x.mean(0))
                std.copy_(x.std(0).clamp_min(1e-3) if len(x) > 1 else torch.ones_like(std))
            else:
                n = held.sum(0)
                mean.copy_(torch.where(held, x, 0.0).sum(0) / n.clamp_min(1))
                var = (torch.where(held, x - mean, 0.0) ** 2).sum(0) / (n - 1).clamp_min(1)
                std.copy_(torch.where(n > 1, var.sqrt().clamp_min(1e-3), torch.ones_like(std)))
            x_norm = (x - mean) / std
            getattr(self, f"{name}_lo").copy_(torch.where(held, x_norm, torch.inf).min(0).values)
            getattr(self, f"{name}_hi").copy_(torch.where(held, x_norm, -torch.inf).max(0).values)
            if name == "t" and hasattr(self, "t_empty"):
                self.t_empty.copy_((~held).float().mean(0))

    def law_standardisation(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, std, lo, hi) of the law's variables: lo and hi bound the standardised values."""
        if self.cfg.layer_target == "layers":
            return self.y_mean, self.y_std, self.y_lo, self.y_hi
        return self.t_mean, self.t_std, self.t_lo, self.t_hi

    def law_input(self, e_layer: torch.Tensor, e_inc: torch.Tensor) -> torch.Tensor:
        """(B, n_law) the law's standardised variables of layer energies (B, L) MeV and incident
        energies (B,) MeV (what `law.log_prob` scores)."""
        mean, std, _, _ = self.law_standardisation()
        return (self.law_target(e_layer, e_inc) - mean) / std

    def sample_layers(self, e_inc: torch.Tensor, cond: torch.Tensor, u: torch.Tensor,
                      eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer energies from the law for incident energies (B,) MeV, normalised conditions (B, C),
        uniforms u and normals eps (B, n_law): (normalised log layer fractions (B, L), the VAE's
        context; layer energies (B, L) MeV)."""
        mean, std, lo, hi = self.law_standardisation()
        t = self.law.sample(cond, u, eps, lo, hi, self.t_empty > 0 if hasattr(self, "t_empty") else None)
        floor = self.cfg.layer_floor
        raw = t * std + mean
        if self.cfg.layer_target == "layers":
            return t, self._layer_energy(raw.exp() - floor, e_inc)
        if hasattr(self, "deposit"):
            location, scale = self.deposit.location_scale(e_inc)
            raw = torch.cat([(raw[:, 0] * scale + location)[:, None], raw[:, 1:]], -1)
        total = (raw[:, 0].exp() - floor).clamp_min(0.0)
        share = (raw[:, 1:].exp() - floor).clamp_min(0.0)  # an empty layer (-inf) is 0
        # the mixture smears the spike of empty layers (at log(floor)) over shares of ~floor
        share = torch.where(share < floor, 0.0, share)
        share = share / share.sum(-1, keepdim=True).clamp_min(1e-30)
        e_layer = share * (total * e_inc)[:, None]
        return self.normalise(self.log_layer(e_layer, e_inc)), e_layer

    def _layer_energy(self, frac: torch.Tensor, e_inc: torch.Tensor) -> torch.Tensor:
        """(B, L) MeV from layer fractions of E_inc; the mixture smears the spike of empty layers
        (at log(floor)) over fractions of ~floor: a layer within one floor of empty is empty."""
        return torch.where(frac < self.cfg.layer_floor, 0.0, frac) * e_inc[:, None]

    def log_share_max(self, voxels: torch.Tensor) -> torch.Tensor:
        """(V,) log of each voxel's largest share of its layer's energy among dense showers (B, V),
        at least log(share_floor)."""
        share = voxels / self.layer_energies(voxels)[:, self.voxel_layer].clamp_min(1e-30)
        return torch.log(share.max(0).values.clamp_min(self.cfg.share_floor))

    def _add_residual_quantiles(self) -> None:
        """Buffer of the quantiles of each voxel's standardised log-share residual (`share_noise:
        empirical`): the normal's quantiles until `fit_residual_quantiles` has seen training showers.
        Only models with that option hold it, so exports of models without it still load."""
        levels = (torch.arange(RESIDUAL_LEVELS, dtype=torch.float64) + 0.5) / RESIDUAL_LEVELS
        normal_q = torch.distributions.Normal(0.0, 1.0).icdf(levels).float()
        self.register_buffer("residual_q", normal_q.expand(self.n_voxels, -1).clone().to(self.y_mean.device))

    def _add_noise_mix(self) -> None:
        """Buffers of `share_noise: empirical_correlated`: `layer_voxels` (L, W) the voxels of each
        layer (padded with V), and `noise_mix` (L, W, W), per layer the matrix that turns
        independent standard normals into normals with the within-layer correlation of the
        training residuals (identity until `fit_residual_quantiles`)."""
        counts = torch.bincount(self.voxel_layer, minlength=self.n_layers)
        width = int(counts.max())
        index = torch.full((self.n_layers, width), self.n_voxels, dtype=torch.long)
        for layer in range(self.n_layers):
            vox = torch.nonzero(self.voxel_layer == layer).flatten().cpu()
            index[layer, :len(vox)] = vox
        self.register_buffer("layer_voxels", index.to(self.voxel_layer.device), persistent=False)
        eye = torch.eye(width, device=self.y_mean.device)
        self.register_buffer("noise_mix", eye.expand(self.n_layers, -1, -1).clone())

    @torch.no_grad()
    def _fit_noise_mix(self, resid: torch.Tensor, hit: torch.Tensor) -> float:
        """Set `noise_mix` from standardised residuals (B, V) of hit voxels: per layer the
        correlation of the residuals' normal scores (each voxel's ranks among its hit showers),
        over the showers where both voxels are hit (0 for pairs hit together fewer than
        RESIDUAL_MIN_HITS times), made positive definite and factored with unit rows, so every
        voxel's noise stays a standard normal (its quantiles are still its own). Returns the mean
        absolute off-diagonal correlation."""
        n_hit = hit.sum(0)
        rank = torch.where(hit, resid, torch.full_like(resid, torch.inf)).argsort(0).argsort(0).to(resid.dtype)
        scores = torch.special.ndtri(((rank + 0.5) / n_hit.clamp_min(1)).clamp(1e-6, 1 - 1e-6)) * hit
        off = []
        for layer in range(self.n_layers):
            vox = self.layer_voxels[layer][self.layer_voxels[layer] < self.n_voxels]
            z, h = scores[:, vox].double(), hit[:, vox].double()
            z2 = z * z
            corr = (z.T @ z) / ((z2.T @ h) * (h.T @ z2)).sqrt().clamp_min(1e-12)
            corr = torch.where((h.T @ h) >= RESIDUAL_MIN_HITS, corr, torch.zeros_like(corr))
            corr.fill_diagonal_(1.0)
            w, vecs = torch.linalg.eigh(0.5 * (corr + corr.T))
            mix = vecs * w.clamp_min(1e-3).sqrt()
            mix = mix / mix.pow(2).sum(1, keepdim=True).sqrt()
            self.noise_mix[layer].zero_()
            self.noise_mix[layer, :len(vox), :len(vox)] = mix.to(self.noise_mix)
            if len(vox) > 1:
                off.append(corr[~torch.eye(len(vox), dtype=torch.bool, device=corr.device)].abs().mean())
        return float(torch.stack(off).mean()) if off else 0.0

    def correlate(self, standard: torch.Tensor) -> torch.Tensor:
        """(B, V) independent standard normals -> standard normals with the fitted within-layer
        correlation (`noise_mix`)."""
        padded = torch.nn.functional.pad(standard, (0, 1))[:, self.layer_voxels]  # (B, L, W)
        mixed = torch.einsum("blw,lvw->blv", padded, self.noise_mix)
        out = torch.zeros_like(padded[:, 0, :1]).expand(-1, self.n_voxels + 1).clone()
        out.scatter_(1, self.layer_voxels.flatten().expand(len(standard), -1), mixed.flatten(1))
        return out[:, :self.n_voxels]

    @torch.no_grad()
    def fit_residual_quantiles(self, voxels: torch.Tensor, e_inc: torch.Tensor, cond: torch.Tensor) -> dict[str, float]:
        """Set `residual_q` from dense training showers (B, V): every hit voxel's log share minus the
        decoder's mean, over the decoder's sigma, with the latent at the encoder's posterior mean.
        A voxel hit fewer than RESIDUAL_MIN_HITS times takes the pooled residuals of its layer."""
        if not hasattr(self, "residual_q"):
            self._add_residual_quantiles()
        if self.cfg.share_noise == "empirical_correlated" and not hasattr(self, "noise_mix"):
            self._add_noise_mix()
        _, hit, log_share = self.log_shares(voxels)
        mu_z, _, ctx = self.encode_latents(voxels, e_inc, cond)
        _, mu, log_sigma, _ = self.vae.decode(mu_z, ctx)
        resid = (log_share - mu) / log_sigma.exp()
        levels = ((torch.arange(RESIDUAL_LEVELS) + 0.5) / RESIDUAL_LEVELS).to(self.residual_q)
        n_hit = hit.sum(0)
        own = 0
        for layer in range(self.n_layers):
            vox = torch.nonzero(self.voxel_layer == layer).flatten()
            pooled = resid[:, vox][hit[:, vox]]
            if len(pooled) == 0:
                continue
            layer_q = torch.quantile(pooled, levels)
            for v in vox.tolist():
                if int(n_hit[v]) >= RESIDUAL_MIN_HITS:
                    self.residual_q[v] = torch.quantile(resid[hit[:, v], v], levels)
                    own += 1
                else:
                    self.residual_q[v] = layer_q
        extra = {}
        if hasattr(self, "noise_mix"):
            extra["residual_mean_abs_correlation"] = self._fit_noise_mix(resid, hit)
        r = resid[hit]
        skew = float(((r - r.mean()) ** 3).mean() / r.std().clamp_min(1e-12) ** 3) if len(r) > 1 else 0.0
        tails = torch.quantile(r[torch.randperm(len(r))[:1_000_000]], r.new_tensor([0.01, 0.5, 0.95, 0.99])) if len(r) \
            else torch.zeros(4)
        return {"residual_skewness": skew, "residual_voxels_own_quantiles": float(own),
                **{f"residual_quantile_{p}": float(t) for p, t in zip((1, 50, 95, 99), tails, strict=True)}, **extra}

    def log_shares(self, voxels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(layer energies (B, L), hit voxels (B, V) bool, log shares of the layer energy (B, V),
        floored at `share_floor`) of dense showers (B, V)."""
        e_layer = self.layer_energies(voxels)
        share = voxels / e_layer[:, self.voxel_layer].clamp_min(1e-30)
        return e_layer, voxels > 0, torch.log(share.clamp_min(self.cfg.share_floor))

    def encode_latents(self, voxels: torch.Tensor, e_inc: torch.Tensor, cond: torch.Tensor):
        """(posterior mean (B, D), posterior log variance (B, D), decoder context (B, C + L)) of
        dense showers (B, V)."""
        e_layer, hit, log_share = self.log_shares(voxels)
        ctx = torch.cat([cond, self.normalise(self.log_layer(e_layer, e_inc))], -1)
        return (*self.vae.encode(log_share, hit, ctx), ctx)

    def add_latent_prior(self) -> None:
        """Module `prior` of `latent_prior: mixture` (sizes from cfg). It is fitted after training
        (`fit_latent_prior`), not by the training loss: frozen until then."""
        n_ctx = self.vae.decoder[0].in_features - self.cfg.latent_dim
        self.prior = LatentPrior(self.cfg.latent_dim, n_ctx, self.cfg.prior_hidden,
                                 self.cfg.prior_components).to(self.y_mean.device)
        self.prior.requires_grad_(False)

    def fit_latent_prior(self, voxels: torch.Tensor, e_inc: torch.Tensor, cond: torch.Tensor,
                         seed: int = 0) -> dict[str, float]:
        """Fit `prior` (`latent_prior: mixture`) by maximum likelihood to draws of the encoder's
        q(z | shower) of dense training showers (B, V), a fresh draw per shower and step, with
        their decoder contexts: `prior_steps` Adam steps of 512 showers. One shower in ten is held
        out; returns the mean log density of its posterior means under the unit normal and under
        the fitted prior (how far the aggregate posterior is from the unit normal)."""
        if not hasattr(self, "prior"):
            raise ValueError("fit_latent_prior needs a model built with latent_prior: mixture")
        with torch.no_grad():
            mu_z, logvar_z, ctx = self.encode_latents(voxels, e_inc, cond)
        return fit_latent_prior(self.prior, mu_z, logvar_z, ctx, self.cfg.prior_steps, seed)

    def fit_law(self, voxels: torch.Tensor, e_inc: torch.Tensor, cond: torch.Tensor, seed: int = 0) -> dict[str, float]:
        """Train the layer-energy law alone `law_fit_steps` more Adam steps of 512 on the layer
        energies of dense training showers (B, V), the learning rate decayed from `law_fit_lr` to 0
        (cosine), so the exported law is not wherever the last constant-rate steps of the joint
        training left it. Returns its mean negative log-likelihood on these showers before and after."""
        e_layer = self.layer_energies(voxels)
        if self.cfg.layer_target == "layers":
            target = self.normalise(self.log_layer(e_layer, e_inc))
        else:
            target = self.law_input(e_layer, e_inc)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            out = {"law_fit_nll_before": float(-self.law.log_prob(target, cond).mean())}
        fit_alone(self.law.parameters(), self.cfg.law_fit_lr, self.cfg.law_fit_steps,
                  torch.arange(len(target), device=target.device), gen,
                  lambda pick: -self.law.log_prob(target[pick], cond[pick]).mean())
        with torch.no_grad():
            out["law_fit_nll_after"] = float(-self.law.log_prob(target, cond).mean())
        return out

    def fit_vae(self, voxels: torch.Tensor, e_inc: torch.Tensor, cond: torch.Tensor, seed: int = 0) -> dict[str, float]:
        """Train the voxel-share VAE alone `vae_fit_steps` more Adam steps of 512 dense training
        showers (B, V), the learning rate decayed from `vae_fit_lr` to 0 (cosine): at the joint
        training's constant rate the VAE's loss stops falling long before the last step and its end
        state is wherever the last steps left it. One shower in ten is held out; returns its mean
        negative ELBO (per shower) before and after."""
        e_layer, hit, log_share = self.log_shares(voxels)
        ctx = torch.cat([cond, self.normalise(self.log_layer(e_layer, e_inc))], -1)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        n = len(voxels)
        order = torch.randperm(n, generator=gen).to(voxels.device)
        n_held = max(1, n // 10) if n > 1 else 0
        held, fit = order[:n_held], order[n_held:]

        def held_loss() -> float:
            rec, kl = self.vae.loss(log_share[held], hit[held], ctx[held], self.cfg.free_bits)
            return float((rec + self.cfg.kl_weight * kl).mean())

        def loss_of(pick: torch.Tensor) -> torch.Tensor:
            rec, kl = self.vae.loss(log_share[pick], hit[pick], ctx[pick], self.cfg.free_bits)
            return (rec + self.cfg.kl_weight * kl).mean()

        out = {}
        # the reparametrisation draws come from the global generator: seeded here, restored after
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.no_grad():
                if n_held:
                    out["vae_fit_heldout_loss_before"] = held_loss()
            fit_alone(self.vae.parameters(), self.cfg.vae_fit_lr, self.cfg.vae_fit_steps, fit, gen, loss_of)
            with torch.no_grad():
                if n_held:
                    out["vae_fit_heldout_loss_after"] = held_loss()
        return out

    def empirical_noise(self, standard: torch.Tensor) -> torch.Tensor:
        """(B, V) standard normals mapped through each voxel's residual quantiles (linear between
        the levels, the end levels beyond them)."""
        u = torch.special.ndtr(standard)
        pos = (u * RESIDUAL_LEVELS - 0.5).clamp(0.0, RESIDUAL_LEVELS - 1.0)
        lo = pos.floor().long().clamp_max(RESIDUAL_LEVELS - 2)
        frac = pos - lo
        flat = self.residual_q.flatten()
        base = torch.arange(self.n_voxels, device=standard.device) * RESIDUAL_LEVELS
        q_lo, q_hi = flat[base + lo], flat[base + lo + 1]
        return q_lo + frac * (q_hi - q_lo)

    def normalise(self, y_log: torch.Tensor) -> torch.Tensor:
        return (y_log - self.y_mean) / self.y_std

    def forward(self, voxels: torch.Tensor, e_inc: torch.Tensor, cond: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training loss of dense voxel energies (B, V) MeV, incident energies (B,) MeV and
        normalised conditions (B, C): per-event NLL of the law plus the VAE's ELBO terms."""
        e_layer, hit, log_share = self.log_shares(voxels)
        y = self.normalise(self.log_layer(e_layer, e_inc))
        if self.cfg.layer_target == "layers":
            nll_law = -self.law.log_prob(y, cond).mean()
        else:
            nll_law = -self.law.log_prob(self.law_input(e_layer, e_inc), cond).mean()
        rec, kl = self.vae.loss(log_share, hit, torch.cat([cond, y], -1), self.cfg.free_bits)
        loss = nll_law + rec.mean() + self.cfg.kl_weight * kl.mean()
        return {"loss": loss, "nll_layers": nll_law.detach(), "nll_voxels": rec.mean().detach(),
                "kl": kl.mean().detach()}

    @torch.no_grad()
    def sample(self, e_inc: torch.Tensor, cond: torch.Tensor, noise: dict[str, torch.Tensor],
               y: torch.Tensor | None = None, z: torch.Tensor | None = None) -> torch.Tensor:
        """Dense voxel energies (B, V) MeV for incident energies (B,) MeV and normalised
        conditions (B, C), all randomness from `noise` (see `noise_shapes`). `y` (B, L) replaces
        the law's normalised log layer energies, `z` (B, D) the latent (ablation studies)."""
        if y is None:
            y, e_layer = self.sample_layers(e_inc, cond, noise["law_u"], noise["law_eps"])
        else:
            e_layer = self._layer_energy((y * self.y_std + self.y_mean).exp() - self.cfg.layer_floor, e_inc)
        ctx = torch.cat([cond, y], -1)
        if z is None:
            z = self.prior.sample(ctx, noise["prior_u"], noise["z"]) if hasattr(self, "prior") else noise["z"]
        logit, mu, log_sigma, rho = self.vae.decode(z, ctx)
        hit = noise["voxel_u"] < torch.sigmoid(logit)
        eps = self.vae.noise(log_sigma, rho, noise["voxel_eps"], noise.get("ring_eps"))
        if self.cfg.share_noise != "gaussian":
            sigma = log_sigma.exp()
            standard = eps / sigma
            if self.cfg.share_noise == "empirical_correlated":
                standard = self.correlate(standard)
            eps = sigma * self.empirical_noise(standard)
        log_share = mu + self.cfg.share_temperature * eps
        if self.cfg.share_cap:
            log_share = torch.minimum(log_share, self.log_share_hi)
        share = torch.exp(log_share) * hit
        # a layer with energy but no sampled hit keeps it in one voxel: its most likely one, or one
        # drawn by the hit probabilities (`empty_layer_voxel`)
        per_layer = torch.zeros(len(share), self.n_layers, device=share.device).index_add_(1, self.voxel_layer, share)
        empty = per_layer <= 0
        if bool(empty.any()) and self.cfg.empty_layer_voxel == "drawn":
            share = torch.where(self.draw_voxel(torch.sigmoid(logit), empty, noise["empty_u"]), 1.0, share)
            per_layer = torch.zeros_like(per_layer).index_add_(1, self.voxel_layer, share)
        elif bool(empty.any()):
            masked = torch.where(empty[:, self.voxel_layer], logit, torch.full_like(logit, -torch.inf))
            best = torch.full((len(share), self.n_layers), -torch.inf, device=share.device)
            best = best.scatter_reduce(1, self.voxel_layer.expand(len(share), -1), masked, "amax")
            top = empty[:, self.voxel_layer] & (masked == best[:, self.voxel_layer])
            share = torch.where(top, torch.ones_like(share), share)
            per_layer = torch.zeros_like(per_layer).index_add_(1, self.voxel_layer, share)
        share = share / per_layer.clamp_min(1e-30)[:, self.voxel_layer]
        return share * e_layer[:, self.voxel_layer]

    def draw_voxel(self, p_hit: torch.Tensor, empty: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """(B, V) bool: in every layer flagged in `empty` (B, L), the one voxel whose interval of the
        layer's cumulative hit probabilities p_hit (B, V) holds u (B, L) times their sum."""
        chosen = torch.zeros_like(p_hit, dtype=torch.bool)
        for layer in torch.nonzero(empty.any(0)).flatten().tolist():
            vox = torch.nonzero(self.voxel_layer == layer).flatten()
            rows = torch.nonzero(empty[:, layer]).flatten()
            cum = p_hit[rows][:, vox].double().cumsum(-1)
            target = u[rows, layer].double() * cum[:, -1]
            pick = torch.searchsorted(cum, target[:, None], right=True).clamp_max(len(vox) - 1)
            chosen[rows, vox[pick[:, 0]]] = True
        return chosen

    def noise_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-shower noise: name -> shape (uniform for *_u, standard normal otherwise)."""
        shapes = {"law_u": (self.n_law,), "law_eps": (self.n_law,), "z": (self.cfg.latent_dim,),
                  "voxel_u": (self.n_voxels,), "voxel_eps": (self.n_voxels,)}
        if self.vae.n_rings:
            shapes["ring_eps"] = (self.vae.n_rings,)
        if hasattr(self, "prior"):
            shapes["prior_u"] = (1,)
        if self.cfg.empty_layer_voxel == "drawn":
            # last, so that the other draws of a seed stay those of 'most_likely'
            shapes["empty_u"] = (self.n_layers,)
        return shapes
