"""A latent prior fitted to an encoder's latents, shared by the model families with an event or
shower latent (calorimeter layers, hit transformer).

A VAE's KL term pulls each posterior q(z | x) towards the unit normal but does not make their
union over the training data (the aggregate posterior) the unit normal: with free bits a
posterior can narrow without carrying information, and an informative latent can spread wider or
narrower than 1. A decoder only learned the region the encoder fills, so generated latents are
drawn from `LatentPrior`, a conditional mixture of diagonal Gaussians fitted after training by
`fit_latent_prior` to draws of the encoder's posteriors of training events."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

LOG_2PI = math.log(2 * math.pi)


def mlp(d_in: int, hidden: int, d_out: int, depth: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.SiLU()]
        d = hidden
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


class LatentPrior(nn.Module):
    """Conditional mixture of diagonal Gaussians over the VAE's latent, p(z | ctx): what the
    generated latents are drawn from with `latent_prior: mixture`, fitted to the encoder's latents
    of training showers. The KL term pulls each q(z | shower) towards the unit normal but does not
    make their union (the aggregate posterior) the unit normal; the decoder only learned the
    region the encoder fills."""

    def __init__(self, latent: int, n_ctx: int, hidden: int, components: int):
        super().__init__()
        self.latent, self.components = latent, components
        self.net = mlp(n_ctx, hidden, components * (1 + 2 * latent))
        # the mixture lives in latents standardised with the fitted latents' mean and spread (set
        # by `fit_latent_prior`), so its network starts at the right place and scale
        self.register_buffer("z_mean", torch.zeros(latent))
        self.register_buffer("z_std", torch.ones(latent))

    def _params(self, ctx: torch.Tensor):
        """(log weights (B, K), means (B, K, D), log sigmas (B, K, D)) for contexts (B, C)."""
        out = self.net(ctx)
        k, d = self.components, self.latent
        log_w = F.log_softmax(out[:, :k], -1)
        mu, log_sigma = out[:, k:].view(len(ctx), k, 2 * d).chunk(2, dim=-1)
        log_sigma = log_sigma.clamp(-7.0, 3.0) + self.z_std.log()
        return log_w, self.z_mean + mu * self.z_std, log_sigma

    def log_prob(self, z: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """(B,) log density of latents z (B, D) given contexts (B, C)."""
        log_w, mu, log_sigma = self._params(ctx)
        r = (z[:, None, :] - mu) / log_sigma.exp()
        comp = (-0.5 * r * r - log_sigma - 0.5 * LOG_2PI).sum(-1)
        return torch.logsumexp(log_w + comp, -1)

    @torch.no_grad()
    def sample(self, ctx: torch.Tensor, u: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """(B, D) latents from uniforms u (B, 1) (component choice) and normals eps (B, D)."""
        log_w, mu, log_sigma = self._params(ctx)
        cdf = log_w.exp().cumsum(-1)
        k = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_max(self.components - 1)
        idx = k[:, :, None].expand(-1, 1, self.latent)
        return mu.gather(1, idx)[:, 0] + log_sigma.gather(1, idx)[:, 0].exp() * eps


def fit_latent_prior(prior: LatentPrior, mu_z: torch.Tensor, logvar_z: torch.Tensor, ctx: torch.Tensor,
                     steps: int, seed: int = 0) -> dict[str, float]:
    """Fit `prior` by maximum likelihood to draws of the posteriors N(mu_z, exp(logvar_z)) (B, D)
    of training events with their contexts ctx (B, C), a fresh draw per event and step: `steps`
    Adam steps of 512 events. One event in ten is held out; returns the fit's last NLL and the mean
    log density of the held-out posterior means under the unit normal and under the fitted prior
    (how far the aggregate posterior is from the unit normal)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = len(mu_z)
    order = torch.randperm(n, generator=gen).to(mu_z.device)
    n_held = max(1, n // 10) if n > 1 else 0
    held, fit = order[:n_held], order[n_held:]
    draws = mu_z[fit] + torch.randn(mu_z[fit].shape, generator=gen).to(mu_z) * (0.5 * logvar_z[fit]).exp()
    prior.z_mean.copy_(draws.mean(0))
    prior.z_std.copy_(draws.std(0).clamp_min(1e-3) if len(draws) > 1 else torch.ones_like(prior.z_std))
    prior.requires_grad_(True)
    opt = torch.optim.Adam(prior.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                pick = fit[torch.randint(len(fit), (min(512, len(fit)),), generator=gen).to(fit.device)]
                eps = torch.randn(len(pick), prior.latent, generator=gen).to(mu_z)
                z = mu_z[pick] + eps * (0.5 * logvar_z[pick]).exp()
                loss = -prior.log_prob(z, ctx[pick]).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    finally:
        prior.requires_grad_(False)
    out = {"latent_prior_fit_nll": float(loss.detach())}
    if n_held:
        with torch.no_grad():
            z = mu_z[held]
            unit = (-0.5 * z * z - 0.5 * LOG_2PI).sum(-1)
            out["latent_heldout_logp_unit"] = float(unit.mean())
            out["latent_heldout_logp_prior"] = float(prior.log_prob(z, ctx[held]).mean())
    return out
