"""Laws a generator draws from before it places hits: hits (or clusters) per unit, and a
calorimeter's response.

Multiplicity and total energy are the quantities that must follow the conditions beyond the
training range. A network that learns them through attention and FiLM saturates outside the
range it saw; a law with a handful of parameters per unit, fitted by maximum likelihood to the
training events (its dependence on the conditions learned from them: `count_law`), extrapolates
as the law does. The hit transformer draws its token count from them; the GAN (`count_law`)
draws each sensor's cluster seeds.

Every function of a per-sequence quantity here is elementwise (no matrix products), so a
sequence's draw does not depend on the batch it is computed in (see transformer_sampling).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from scipy import special, stats
from torch import nn

INIT_FRACTION = 0.05  # starting occupancy of every unit (logit -2.9): within 3 of any detector's
QUANTILE_SIGMAS = 12.0  # support of an inverse-CDF count draw: mean + this many standard deviations
QUANTILE_CHUNK = 1024  # sequences per inverse-CDF block (bounds memory to chunk x support)
LOG_DISPERSION_RANGE = (-5.0, 12.0)  # log r kept finite: r from a near-geometric count to a Poisson one


def nb_log_prob(n: torch.Tensor, mean: torch.Tensor, r: torch.Tensor,
                log_factorial: torch.Tensor | None = None) -> torch.Tensor:
    """log NB(n | mean, dispersion r): variance mean + mean^2 / r (Poisson as r -> inf).
    `log_factorial`: lgamma(n + 1) computed beforehand (a fit evaluates the likelihood of the same
    counts hundreds of times; the values, and so the result, are the same)."""
    log_mean, log_r = mean.clamp_min(1e-12).log(), r.log()
    return (torch.lgamma(n + r) - torch.lgamma(r) - (torch.lgamma(n + 1) if log_factorial is None else log_factorial)
            - r * F.softplus(log_mean - log_r) - n * F.softplus(log_r - log_mean))


def nb_unit_log_prob(n: torch.Tensor, mean: torch.Tensor, log_r: torch.Tensor, histogram: torch.Tensor,
                     log_factorial: torch.Tensor) -> torch.Tensor:
    """Sum over events and units of log NB(n | mean, r_u) (nb_log_prob) for counts n (B, U) whose
    dispersion r_u = exp(log_r) (U,) is one per unit: lgamma(n + r_u) - lgamma(r_u) then takes one
    value per unit and count, so it is computed on the (U, K) table of how many events have k counts
    in each unit (`histogram`) instead of on every event, and so are its digamma gradients (the
    costliest part of a fit's evaluation). The same likelihood up to rounding."""
    r = log_r.exp()
    k = torch.arange(histogram.shape[1], dtype=histogram.dtype, device=histogram.device)
    gamma = (histogram * (torch.lgamma(k[None] + r[:, None]) - torch.lgamma(r)[:, None])).sum()
    log_mean = mean.clamp_min(1e-12).log()
    return (gamma - log_factorial.sum() - (r[None] * F.softplus(log_mean - log_r[None])).sum()
            - (n * F.softplus(log_r[None] - log_mean)).sum())


def nb_quantile(u: torch.Tensor, mean: torch.Tensor, r: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """(N,) long: inverse-CDF draws of NB(mean, r) by uniforms u (N,), clamped to `upper` (N,).
    Each row's support is its own (mean + QUANTILE_SIGMAS sd), so a draw does not depend on the
    other rows of the batch."""
    u, mean, r = u.double(), mean.double(), r.double()
    sd = (mean + mean.square() / r).sqrt()
    support = (mean + QUANTILE_SIGMAS * sd).ceil().long() + 16
    support = torch.minimum(support, upper.long() + 1)
    out = torch.zeros(len(u), dtype=torch.long, device=u.device)
    for lo in range(0, len(u), QUANTILE_CHUNK):
        sl = slice(lo, lo + QUANTILE_CHUNK)
        K = int(support[sl].max()) if len(support[sl]) else 0
        if K <= 0:
            continue
        k = torch.arange(K, dtype=torch.float64, device=u.device)[None]
        p = nb_log_prob(k, mean[sl, None], r[sl, None]).exp() * (k < support[sl, None])
        cdf = torch.cumsum(p, -1)
        choice = torch.searchsorted(cdf, (u[sl] * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
        out[sl] = torch.minimum(choice, support[sl] - 1)
    return torch.minimum(out, upper.long())


def _dot(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(B, U): sum_c x[b, c] w[u, c], elementwise (no BLAS) for batch-independent rounding."""
    return (x[:, None, :] * w[None]).sum(-1)


COUNT_LAWS = ("power", "powers", "quadratic", "pooled", "unit_quadratic")
COUNT_DISPERSIONS = ("constant", "power", "forward")


class CountLaw(nn.Module):
    """Hits per unit: NB(mean, r_u), mean = P_u sigmoid(eta), P_u the unit's grid positions, x
    the normalised conditions (log of the physical ones, training range -> [-1, 1]). The
    dependence on every condition is learned; nothing about the physics of the detector is
    fixed in advance. Forms (`form`):

    - power: eta = a_u + b_u . x, one power law per unit with its own free exponents;
    - powers: eta = log sum_k exp(a_uk + beta_k . x), K = `terms` power-law components whose
      real exponents beta_k (one per condition) are shared by all units and whose amplitudes
      a_uk are per unit: backgrounds made of processes that scale differently, each with its
      own pattern over the units; the effective exponent of every unit can only grow with the
      conditions (a log-sum-exp is convex), which is how a mixture of power laws behaves;
    - quadratic: eta = a_u + (b + d_u) . x + x^T Q x, a shared slope b and symmetric Q and
      per-unit slope deviations d_u shrunk towards 0 (a ridge whose strength is chosen on held-out events, `choose_shrink`): a low-order polynomial in the
      log-conditions whose per-unit part stays as precise as the data on each unit allow;
    - pooled: eta = a_u + (b + k (a_u - mean_v a_v) + d_u) . x + x^T Q x, the quadratic law whose
      per-unit slope is mostly pooled: a part proportional to the unit's own level (one k per
      condition, estimated from every unit's events: busier units grow more slowly as their
      clusters start to merge, or faster where a steeper process dominates them) and a remainder
      d_u shrunk towards 0. The strength of the ridge on Q is chosen by forward validation
      (`choose_forward`: fitted on the lower part of the training range, scored on the upper
      part, as the law will be used beyond it), the one on d_u on held-out events (`choose_pooled`);
    - unit_quadratic: eta = a_u + b_u . x + c_u . (x * x), a second-order polynomial per unit
      with its own slope and curvature in each log-condition: units whose counts bend
      differently with the conditions (a calorimeter's layers: the tail grows faster than the
      core, which saturates).

    All forms saturate at the full grid (sigmoid). docs/transformer.md has the measurement that
    chose the default.

    Event-wide fluctuations (all sensors of an event busier together) come from a one-factor
    Gaussian copula: the normal score of unit u's count is l_u g + sqrt(1 - l_u^2) e_u with one
    g per event. The marginal of each unit stays exactly its NB law, so the mean occupancy a
    law predicts is what generation delivers; l_u is fitted on the normal scores of the data.
    (An event latent inside eta would be inferred from the counts themselves in training and
    let the law's own mean drift away from the data's.)

    Parameter uncertainty: `bootstrap` holds the mean parameters refitted on resampled training
    events (`set_bootstrap`), from which `occupancy_band` gives a band on the predicted mean
    occupancy (+- one standard deviation of the refits' predictions)."""

    def __init__(self, n_units: int, n_cond: int, positions: int | Sequence[int], form: str = "quadratic",
                 terms: int = 2, bootstrap: int = 0, factors: int = 1, dispersion: str = "constant"):
        super().__init__()
        if form not in COUNT_LAWS:
            raise ValueError(f"count law form must be one of {COUNT_LAWS}, got {form!r}")
        if dispersion not in COUNT_DISPERSIONS:
            raise ValueError(f"count law dispersion must be one of {COUNT_DISPERSIONS}, got {dispersion!r}")
        if dispersion != "constant" and factors > 1:
            raise ValueError(f"count law dispersion {dispersion!r} has one copula factor; got factors > 1")
        self.form, self.factors = form, factors
        c = max(n_cond, 1)
        grid = [float(positions)] * n_units if isinstance(positions, int) else [float(p) for p in positions]
        if len(grid) != n_units:
            raise ValueError(f"{len(grid)} unit sizes for {n_units} units")
        self.register_buffer("positions", torch.tensor(grid))
        init = math.log(INIT_FRACTION / (1 - INIT_FRACTION))
        if form == "powers":
            self.amplitude = nn.Parameter(torch.full((n_units, terms), init - math.log(terms)))
            # distinct starting exponents, or every term would stay a copy of the others
            spread = torch.linspace(-0.5, 0.5, terms) if terms > 1 else torch.zeros(1)
            self.exponent = nn.Parameter((1.0 + spread)[:, None].repeat(1, c) / c)
        else:
            self.bias = nn.Parameter(torch.full((n_units,), init))
            self.slope = nn.Parameter(torch.zeros(n_units, c))
            if form == "unit_quadratic":
                self.unit_curvature = nn.Parameter(torch.zeros(n_units, c))
            if form in ("quadratic", "pooled"):
                self.shared_slope = nn.Parameter(torch.zeros(c))
                self.curvature = nn.Parameter(torch.zeros(c, c))
            if form == "pooled":
                self.level_slope = nn.Parameter(torch.zeros(c))
        # atanh of l_u; not 0, where the copula density is flat in every loading (a saddle)
        self.loading = nn.Parameter(torch.full((n_units,), math.atanh(0.3)))
        if factors > 1:
            # several factors: raw loadings W (U, K), used as W / sqrt(1 + |W_u|^2) so that every
            # unit keeps a positive specific variance; distinct starts (a common one is a saddle)
            ramp = torch.linspace(-0.3, 0.3, n_units)[:, None] * torch.arange(1, factors)[None].float()
            self.factor_loading = nn.Parameter(torch.cat([torch.full((n_units, 1), 0.3), ramp], 1))
        self.log_dispersion = nn.Parameter(torch.full((n_units,), math.log(20.0)))
        if dispersion != "constant":  # log r_u and atanh l_u move with the unit's log expected occupancy (0: constant)
            self.dispersion_power = nn.Parameter(torch.zeros(1))
            self.loading_power = nn.Parameter(torch.zeros(1))
        if dispersion == "forward":  # 1: the powers act, 0: constant; set by `choose_dispersion` before the fit
            self.register_buffer("dispersion_gate", torch.ones(1))
        self.register_buffer("bootstrap", torch.zeros(bootstrap, self.n_mean_parameters()))

    def mean_parameters(self) -> list[nn.Parameter]:
        """The parameters that set the expected counts (the bootstrap refits these)."""
        names = {"powers": ("amplitude", "exponent"), "power": ("bias", "slope"),
                 "unit_quadratic": ("bias", "slope", "unit_curvature"),
                 "quadratic": ("bias", "slope", "shared_slope", "curvature"),
                 "pooled": ("bias", "slope", "shared_slope", "curvature", "level_slope")}[self.form]
        return [getattr(self, n) for n in names]

    def n_mean_parameters(self) -> int:
        return sum(p.numel() for p in self.mean_parameters())

    def eta(self, cond: torch.Tensor, params: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(B, U) logit of the expected occupancy of each unit. cond (B, C); `params`: mean
        parameters to use instead of the module's (same shapes as `mean_parameters`)."""
        x = cond if cond.shape[1] else cond.new_zeros(len(cond), 1)
        p = params if params is not None else self.mean_parameters()
        if self.form == "powers":
            amplitude, exponent = p
            return torch.logsumexp(amplitude[None] + _dot(x, exponent)[:, None, :], -1)
        if self.form == "power":
            return p[0][None] + _dot(x, p[1])
        if self.form == "unit_quadratic":
            return p[0][None] + _dot(x, p[1]) + _dot(x * x, p[2])
        if self.form == "pooled":
            bias, unit_slope, slope, curvature, level_slope = p
            level = bias - bias.mean()
            unit_slope = unit_slope + level[:, None] * level_slope[None]
        else:
            bias, unit_slope, slope, curvature = p
        q = (curvature + curvature.T) / 2
        return bias[None] + _dot(x, unit_slope + slope[None]) + ((x @ q) * x).sum(-1, keepdim=True)

    @torch.no_grad()
    def shift_level(self, delta: torch.Tensor | float) -> None:
        """Add `delta` (per unit (U,), or one number) to every unit's log-odds at all conditions,
        each unit's slope unchanged. In the pooled form a unit's level also sets part of its slope
        (k (a_u - mean_v a_v)), so a level moved after the fit (the GAN's overlap and merge
        corrections: placed shapes lose hits where they merge) would tilt the slope fitted to the
        data's counts too; the remainder d_u takes the opposite tilt."""
        d = torch.as_tensor(delta, dtype=torch.float64).to(self.positions.device)
        d = d.expand(len(self.positions)) if d.dim() == 0 else d
        if self.form == "powers":
            self.amplitude.data += d.to(self.amplitude)[:, None]
            return
        if self.form == "pooled":
            moved = (d - d.mean()).to(self.slope)
            self.slope.data -= moved[:, None] * self.level_slope.data[None]
        self.bias.data += d.to(self.bias)

    def mean_occupancy(self, cond: torch.Tensor, params: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(B,) expected fraction of fired positions over all units."""
        return self.mean(cond, params).sum(-1) / self.positions.sum()

    def set_bootstrap(self, samples: torch.Tensor) -> None:
        """Store (n, n_mean_parameters) refitted mean parameters."""
        self.bootstrap = samples.detach().to(self.bootstrap.dtype).clone()

    def _unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, i = [], 0
        for p in self.mean_parameters():
            out.append(flat[i:i + p.numel()].view_as(p).to(p.dtype))
            i += p.numel()
        return out

    def occupancy_band(self, cond: torch.Tensor) -> tuple[float, float, float] | None:
        """(predicted, low, high) mean occupancy over the events `cond` (B, C): the law's own
        prediction +- the standard deviation of the bootstrap refits' predictions (None without
        a bootstrap). A standard deviation, not quantiles: with heavy-tailed counts (injection
        bursts) a few refits land far off, and 16 refits give unstable quantiles."""
        if len(self.bootstrap) < 2:
            return None
        with torch.no_grad():
            cond = cond.to(self.positions.dtype)
            mean = float(self.mean_occupancy(cond).mean())
            draws = torch.stack([self.mean_occupancy(cond, self._unflatten(b)).mean() for b in self.bootstrap])
            sd = float(draws.double().std())
        return mean, mean - sd, mean + sd

    def mean(self, cond: torch.Tensor, params: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(B, U) expected hits (`params`: as in `eta`)."""
        return self.positions[None] * torch.sigmoid(self.eta(cond, params))

    def _log_occupancy(self, mean: torch.Tensor) -> torch.Tensor:
        """(B, U) log(mean / positions): what the dispersion and loading powers multiply."""
        return (mean / self.positions[None]).clamp_min(1e-12).log()

    def dispersion(self, mean: torch.Tensor) -> torch.Tensor:
        """NB dispersion r of each count whose expected value is `mean` (B, U): r_u, or with
        dispersion="power" r_u (mean / positions_u)^k, k shared and fitted. Variance mean + mean^2 / r:
        a constant r makes the extra variance grow as the mean squared, k = 1 as the mean (extra
        variance from bursts of clusters whose number, not size, follows the conditions), and the
        data choose between them; a constant r fitted over the whole range overstates the variance
        at its busy end when the data's grows more slowly than the mean squared."""
        log_r = self.log_dispersion[None]
        if hasattr(self, "dispersion_power"):
            log_r = log_r + self._power(self.dispersion_power) * self._log_occupancy(mean)
        return log_r.clamp(*LOG_DISPERSION_RANGE).exp().expand_as(mean)

    def _power(self, power: torch.Tensor) -> torch.Tensor:
        """A dispersion or loading power as it acts: with dispersion="forward" times the gate its
        forward validation set (0: the constant dispersion was chosen)."""
        return power * self.dispersion_gate if hasattr(self, "dispersion_gate") else power

    def unit_log_dispersion(self) -> torch.Tensor | None:
        """(U,) log r_u as `dispersion` bounds it, where the dispersion is one per unit; None with
        dispersion="power", whose r follows each count's mean."""
        return None if hasattr(self, "dispersion_power") else self.log_dispersion.clamp(*LOG_DISPERSION_RANGE)

    def loadings(self, mean: torch.Tensor | None = None) -> torch.Tensor:
        """(U,) copula loadings, or (B, U) at expected counts `mean` (B, U) with dispersion="power":
        atanh l_u + c log(mean / positions_u), c shared and fitted. When the extra variance grows as
        the mean, the part all units share (event-wide fluctuations, ~ mean^2) is a growing share of
        each unit's variance: the correlation rises with the occupancy, which one l_u per unit,
        fitted over the whole range, cannot follow."""
        z = self.loading if mean is None else self.loading[None].expand_as(mean)
        if mean is not None and hasattr(self, "loading_power"):
            z = z + self._power(self.loading_power) * self._log_occupancy(mean)
        return torch.tanh(z).clamp(-0.999, 0.999)

    def loading_matrix(self) -> torch.Tensor:
        """(U, K) loadings of the K copula factors (K = 1: `loadings` as one column)."""
        if self.factors == 1:
            return self.loadings()[:, None]
        w = self.factor_loading
        return w / (1 + w.square().sum(1, keepdim=True)).sqrt()

    def marginal_log_prob(self, counts: torch.Tensor, cond: torch.Tensor,
                          log_factorial: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) sum over units of the NB log-likelihood of hits per unit `counts` (B, U)
        (`log_factorial`: as in nb_log_prob)."""
        mean = self.mean(cond)
        return nb_log_prob(counts.to(cond.dtype), mean, self.dispersion(mean), log_factorial).sum(-1)

    def scores(self, counts: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """(B, U) normal scores of the counts under the current marginals (no gradient)."""
        with torch.no_grad():
            mean = self.mean(cond)
            return normal_scores(counts, mean, self.dispersion(mean))

    def copula_log_prob(self, y: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) Gaussian log-density of normal scores y (B, U) under the one-factor copula; `mean`
        (B, U): the expected counts the loadings depend on (dispersion="power")."""
        if self.factors == 1:
            return one_factor_log_density(y, self.loadings(mean).to(y.dtype))
        return factor_log_density(y, self.loading_matrix().to(y.dtype))

    def log_prob(self, counts: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """(B,) log-likelihood of observed hits per unit `counts` (B, U): the NB marginals plus
        the copula's Gaussian log-density of the (fixed) normal scores."""
        return self.marginal_log_prob(counts, cond) + self.copula_log_prob(self.scores(counts, cond), self.mean(cond))

    def sample(self, u_unit: torch.Tensor, u_event: torch.Tensor, cond: torch.Tensor, cap: int) -> tuple[torch.Tensor, int]:
        """(B*U,) counts (event-major) from uniforms u_unit (B*U,) and u_event (B,) (one per
        event and factor: (B, K) with K factors), at most min(cap, positions); and how many
        draws the cap cut."""
        B, U = len(cond), len(self.positions)
        mean = self.mean(cond)
        r = self.dispersion(mean).reshape(-1)
        mean = mean.reshape(-1)
        e = torch.special.ndtri(u_unit.double().clamp(1e-12, 1 - 1e-12))
        if self.factors == 1:
            load = self.loadings(mean.view(B, U)).double().reshape(-1)
            g = torch.special.ndtri(u_event.double().reshape(-1).clamp(1e-12, 1 - 1e-12)).repeat_interleave(U)
            u = torch.special.ndtr(load * g + (1 - load.square()).sqrt() * e)
        else:
            lam = self.loading_matrix().double()  # (U, K)
            g = torch.special.ndtri(u_event.double().reshape(B, -1).clamp(1e-12, 1 - 1e-12))  # (B, K)
            common = (g[:, None, :] * lam[None]).sum(-1).reshape(-1)  # elementwise: batch-independent
            specific = (1 - lam.square().sum(1)).clamp_min(1e-6).sqrt().repeat(B)
            u = torch.special.ndtr(common + specific * e)
        raw = nb_quantile(u, mean, r, self.positions.long().repeat(B))
        capped = int((raw > cap).sum())
        return raw.clamp_max(cap), capped


def normal_scores(counts: torch.Tensor, mean: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(B, U) Phi^-1 of the mid-point NB CDF of each count (the randomised-PIT centre)."""
    dtype = mean.dtype
    n, mean, r = counts.long().reshape(-1), mean.double().reshape(-1), r.double().reshape(-1)
    mid = torch.zeros(len(n), dtype=torch.float64, device=n.device)
    for lo in range(0, len(n), QUANTILE_CHUNK):
        sl = slice(lo, lo + QUANTILE_CHUNK)
        k = torch.arange(int(n[sl].max()) + 1, dtype=torch.float64, device=n.device)
        p = nb_log_prob(k[None], mean[sl, None], r[sl, None]).exp()
        at = n[sl, None]
        mid[sl] = (torch.cumsum(p, -1).gather(-1, at) - 0.5 * p.gather(-1, at)).squeeze(-1)
    return torch.special.ndtri(mid.clamp(1e-6, 1 - 1e-6)).view(counts.shape).to(dtype)


def one_factor_log_density(y: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """(B,) log N(y | 0, diag(1 - l^2) + l l^T) for y (B, U), loadings l (U,) or one row per event
    (B, U) (Woodbury)."""
    d = 1 - load.square()
    a = load / d
    quad = (y.square() / d).sum(-1) - (y * a).sum(-1).square() / (1 + (load * a).sum(-1))
    logdet = d.log().sum(-1) + torch.log1p((load * a).sum(-1))
    return -0.5 * (quad + logdet + y.shape[-1] * math.log(2 * math.pi))


def factor_log_density(y: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """(B,) log N(y | 0, diag(1 - |lam_u|^2) + lam lam^T) for y (B, U), loadings lam (U, K) (Woodbury)."""
    d = (1 - lam.square().sum(1)).clamp_min(1e-6)
    a = lam / d[:, None]  # D^-1 lam
    inner = torch.eye(lam.shape[1], dtype=y.dtype, device=y.device) + lam.T @ a
    proj = y @ a  # (B, K)
    quad = (y.square() / d).sum(-1) - (proj * torch.linalg.solve(inner, proj.T).T).sum(-1)
    logdet = d.log().sum() + torch.logdet(inner)
    return -0.5 * (quad + logdet + y.shape[-1] * math.log(2 * math.pi))


class ResponseLaw(nn.Module):
    """log(E_dep / E_inc) ~ Normal(m_0 + m . x, exp(s_0 + s . x)): a response and a resolution
    that are power laws of the (log-scaled) conditions."""

    def __init__(self, n_cond: int):
        super().__init__()
        # (1,), not 0-d: DeepSpeed broadcasts parameters as byte views, which 0-d tensors refuse
        self.m0 = nn.Parameter(torch.zeros(1))
        self.m = nn.Parameter(torch.zeros(max(n_cond, 1)))
        self.s0 = nn.Parameter(torch.full((1,), math.log(0.1)))
        self.s = nn.Parameter(torch.zeros(max(n_cond, 1)))

    def params(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = cond if cond.shape[1] else cond.new_zeros(len(cond), 1)
        mu = self.m0 + (x * self.m[None]).sum(-1)
        log_sigma = (self.s0 + (x * self.s[None]).sum(-1)).clamp(-12.0, 3.0)
        return mu, log_sigma

    def log_prob(self, log_response: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """(B,) log-density of observed log(E_dep / E_inc)."""
        mu, log_sigma = self.params(cond)
        return -0.5 * ((log_response - mu) / log_sigma.exp()).square() - log_sigma - 0.5 * math.log(2 * math.pi)

    def sample(self, u: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """(B,) E_dep / E_inc drawn by uniforms u (B,) in (0, 1)."""
        mu, log_sigma = self.params(cond.double())
        normal = torch.special.ndtri(u.double().clamp(1e-12, 1 - 1e-12))
        return (mu.double() + log_sigma.double().exp() * normal).exp()


def fit_law(law: nn.Module, loss_fn, max_iter: int = 200) -> float:
    """Minimise loss_fn(law) over the law's parameters by full-batch L-BFGS in float64 (a
    deterministic maximum-likelihood fit); the parameters keep their dtype. Returns the loss."""
    dtype = next(law.parameters()).dtype
    law.double()
    opt = torch.optim.LBFGS(law.parameters(), lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(law)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        final = float(loss_fn(law))
    law.to(dtype)
    return final


RIDGE = 1e-4  # per-event weight of a ridge on the shared exponent-like parameters: conditions that
# move together in the training data (currents that follow the luminosity) make only their sum identifiable
SHRINK_GRID = (30.0, 100.0, 300.0, 1000.0, 3000.0)  # strengths (in events' worth of log-likelihood)
# of the ridge on per-unit slope deviations (quadratic) among which the fit chooses: one unit's
# counts are far noisier than the detector's (curlers leave many hits on one sensor), and a noisy
# slope is multiplied by the distance beyond the training range; how much per-unit structure the
# data hold depends on how many events there are, so the strength is chosen on held-out events
HOLDOUT = 0.25  # fraction of the events held out to choose the strength
POOLED_SHRINK_GRID = (300.0, 3000.0, 30000.0, 300000.0)  # per-unit slope remainders of the pooled law:
# the level-linked part carries much of the pattern's drift, so the choices reach stronger ridges
CURVATURE_GRID = (0.0, 1e5, 1e8)  # strengths (in events) of a ridge on the pooled law's curvature Q:
# none, some, and as good as none (a power law): a curvature fitted inside the range grows with the
# square of the distance beyond it, so whether the data's bend is worth extrapolating is measured
FORWARD = 0.5  # upper fraction of the training range (along the conditions' main direction) that
# forward validation holds out


def count_law_loss(law: CountLaw, counts: torch.Tensor, cond: torch.Tensor, shrink: float = SHRINK_GRID[-1],
                   curvature_ridge: float = 0.0, log_factorial: torch.Tensor | None = None,
                   histogram: torch.Tensor | None = None) -> torch.Tensor:
    """Mean negative NB log-likelihood per event plus the ridges on the shape parameters; `shrink`
    is the strength of the ridge on per-unit slope deviations in events (a prior: it weighs as
    much whatever the number of events, so more events let more per-unit structure through);
    `curvature_ridge` (pooled law) the strength of the one on its curvature, in events too
    (`log_factorial`: as in nb_log_prob; `histogram`: as in nb_unit_log_prob; `CountEvents` holds both)."""
    log_r = None if histogram is None else law.unit_log_dispersion()
    if log_r is not None:
        nll = -nb_unit_log_prob(counts.to(cond.dtype), law.mean(cond), log_r, histogram, log_factorial) / len(counts)
    else:
        nll = -law.marginal_log_prob(counts, cond, log_factorial).mean()
    if law.form == "pooled":
        _, unit_slope, slope, curvature, level_slope = law.mean_parameters()
        return (nll + shrink / len(counts) * unit_slope.square().sum()
                + (RIDGE + curvature_ridge / len(counts)) * curvature.square().sum()
                + RIDGE * (slope.square().sum() + level_slope.square().sum()))
    if law.form == "quadratic":
        _, unit_slope, slope, curvature = law.mean_parameters()
        return (nll + shrink / len(counts) * unit_slope.square().sum()
                + RIDGE * (slope.square().sum() + curvature.square().sum()))
    return nll + RIDGE * sum(p.square().sum() for p in law.mean_parameters()[1:])


class CountEvents:
    """Events a count law is fitted to, with what every L-BFGS evaluation of `count_law_loss` would
    otherwise recompute: the selected events, their counts in the conditions' dtype and the counts'
    log-factorials. A fit evaluates the loss hundreds of times; the values are the same."""

    def __init__(self, counts: torch.Tensor, cond: torch.Tensor, index: torch.Tensor | None = None):
        if index is not None:
            counts, cond = counts[index], cond[index]
        self.counts, self.cond = counts.to(cond.dtype), cond
        self.log_factorial = torch.lgamma(self.counts + 1)
        # How many events have k counts in each unit (U, K): with one dispersion r_u per unit the
        # likelihood's lgamma(n + r_u) - lgamma(r_u) takes K values per unit, not one per event
        # (`nb_unit_log_prob`). Only for whole counts, and where that table is smaller than the events'.
        n = self.counts.long()
        k = int(n.max()) + 1 if n.numel() else 1
        self.histogram = None
        if n.dim() == 2 and k < len(n) and bool((n >= 0).all()) and torch.equal(n.to(self.counts.dtype), self.counts):
            self.histogram = torch.zeros(n.shape[1], k, dtype=cond.dtype).scatter_add_(
                1, n.T, torch.ones(n.shape[1], len(n), dtype=cond.dtype))

    def loss(self, law: CountLaw, shrink: float = SHRINK_GRID[-1], curvature_ridge: float = 0.0) -> torch.Tensor:
        """count_law_loss of `law` on these events."""
        return count_law_loss(law, self.counts, self.cond, shrink, curvature_ridge, self.log_factorial,
                              self.histogram)


@contextmanager
def trial_fit(law: nn.Module) -> Iterator[None]:
    """A fit inside is a trial: the law's parameters are put back as they were when it ends (the
    choices of a ridge or form below fit once per candidate, each from the same start)."""
    start = [p.detach().clone() for p in law.parameters()]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(law.parameters(), start, strict=True):
                p.copy_(s)


def choose_shrink(law: CountLaw, counts: torch.Tensor, cond: torch.Tensor, seed: int = 0) -> float:
    """The strength in SHRINK_GRID whose fit to a random (1 - HOLDOUT) of the events gives the
    held-out events the highest NB likelihood (quadratic law; others have no per-unit ridge)."""
    if law.form != "quadratic" or len(counts) < 8:
        return SHRINK_GRID[-1]
    perm = torch.randperm(len(counts), generator=torch.Generator().manual_seed(seed + 1))
    n_out = max(1, int(HOLDOUT * len(counts)))
    out, fit = perm[:n_out], perm[n_out:]
    scores = []
    events = CountEvents(counts, cond, fit)
    for strength in SHRINK_GRID:
        with trial_fit(law):
            fit_law(law, lambda m, k=strength: events.loss(m, k))
            with torch.no_grad():
                dtype = law.positions.dtype
                scores.append(float(-law.marginal_log_prob(counts[out].to(dtype), cond[out].to(dtype)).mean()))
    return SHRINK_GRID[min(range(len(scores)), key=scores.__getitem__)]


def forward_split(counts: torch.Tensor, cond: torch.Tensor, fraction: float = FORWARD) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(fit, held-out) event indices: the held-out events are the `fraction` furthest along the
    conditions' main direction (first principal axis, signed to grow with the events' total
    counts), as a law is asked for conditions beyond the top of its training range. None when
    the conditions do not vary."""
    if cond.shape[1] == 0 or len(counts) < 8:
        return None
    x = cond.double() - cond.double().mean(0)
    if float(x.square().sum()) == 0.0:
        return None
    axis = torch.linalg.svd(x, full_matrices=False).Vh[0]
    t = x @ axis
    total = counts.double().sum(1)
    if float(((t - t.mean()) * (total - total.mean())).sum()) < 0:
        t = -t
    order = torch.argsort(t, stable=True)
    n_out = max(1, int(round(fraction * len(counts))))
    return order[:-n_out], order[-n_out:]


def forward_errors(predicted: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """Squared relative error of the predicted mean count of each unit with counts over the held-out
    part: a unit empty there has no relative error to score (a clamped denominator would give it an
    error of 1e20 and let it choose alone)."""
    seen = observed > 0
    return (predicted[seen] / observed[seen] - 1).square().double()


def forward_score(predicted: torch.Tensor, observed: torch.Tensor) -> float:
    """Mean squared relative error of the predicted mean count per unit over the units with counts
    (`forward_errors`)."""
    errors = forward_errors(predicted, observed)
    return float(errors.mean()) if len(errors) else 0.0


def strongest_within_noise(losses: Sequence[torch.Tensor]) -> int:
    """Index of the first of `losses` (candidates ordered strongest ridge first, each a vector of
    losses over the same held-out items: units or events) whose mean loss exceeds the best
    candidate's by no more than one standard error of their paired difference over the items.
    A weaker ridge must earn its place by more than the noise of the held-out items: on the
    clusters of 3600 pxd-mini events of luminosity-dominated the forward scores of the pooled
    law's candidates lay within that noise of each other, and which of them scored lowest turned
    on 0.04 % of the clusters (those outside the GAN's shape window), choosing ridges 3000 / 1e5
    instead of 3e5 / 1e8: per-sensor pattern 2.2 % instead of 1.3 % at 2x the top of the range,
    mean +3.4 % instead of +1.1 % (docs/results.md)."""
    means = [float(x.mean()) if len(x) else 0.0 for x in losses]
    best = min(range(len(losses)), key=means.__getitem__)
    for i, x in enumerate(losses):
        diff = (x - losses[best]).double()
        se = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
        if means[i] - means[best] <= se:
            return i
    return best


def choose_forward(law: CountLaw, counts: torch.Tensor, cond: torch.Tensor) -> tuple[float, float]:
    """(per-unit ridge, curvature ridge) of the pooled law from POOLED_SHRINK_GRID x CURVATURE_GRID:
    the strongest pair whose fit to the lower part of the training range (`forward_split`) predicts
    each unit's mean count over the upper part as well as the best pair within the noise of the
    units (`strongest_within_noise` on `forward_errors`: the per-sensor occupancy a generator is
    judged on). Held-out events from the same range (as `choose_shrink`) barely tell a curvature
    that continues beyond the range from one that bends away; these are scored as the law is used."""
    default = (POOLED_SHRINK_GRID[-1], CURVATURE_GRID[-1])
    split = forward_split(counts, cond)
    if split is None:
        return default
    fit, out = split
    observed = counts[out].double().mean(0)
    pairs, errors = [], []
    events = CountEvents(counts, cond, fit)
    for curvature in reversed(CURVATURE_GRID):
        for shrink in reversed(POOLED_SHRINK_GRID):
            with trial_fit(law):
                fit_law(law, lambda m, k=shrink, c=curvature: events.loss(m, k, c))
                with torch.no_grad():
                    predicted = law.mean(cond[out].to(law.positions.dtype)).double().mean(0)
                    errors.append(forward_errors(predicted, observed))
            pairs.append((shrink, curvature))
    return pairs[strongest_within_noise(errors)]


def choose_pooled(law: CountLaw, counts: torch.Tensor, cond: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """(per-unit ridge, curvature ridge) of the pooled law: the curvature's by forward validation
    (`choose_forward`), then the per-unit ridge, at that curvature, by the likelihood of a random
    held-out quarter of the events (as `choose_shrink`). Per-unit structure is measured best over
    the whole range: a fit to its lower half sees less of a pattern that drifts with the
    conditions (design: the quadratic process's pattern takes over at the top) and asks for
    ridges too strong for the full range (measured in docs/results.md)."""
    _, curvature = choose_forward(law, counts, cond)
    if len(counts) < 8:
        return POOLED_SHRINK_GRID[-1], curvature
    perm = torch.randperm(len(counts), generator=torch.Generator().manual_seed(seed + 1))
    n_out = max(1, int(HOLDOUT * len(counts)))
    out, fit = perm[:n_out], perm[n_out:]
    strengths, losses = list(reversed(POOLED_SHRINK_GRID)), []
    events = CountEvents(counts, cond, fit)
    for strength in strengths:
        with trial_fit(law):
            fit_law(law, lambda m, k=strength: events.loss(m, k, curvature))
            with torch.no_grad():
                dtype = law.positions.dtype
                losses.append(-law.marginal_log_prob(counts[out].to(dtype), cond[out].to(dtype)).double())
    return strengths[strongest_within_noise(losses)], curvature


def choose_dispersion(law: CountLaw, counts: torch.Tensor, cond: torch.Tensor, shrink: float = SHRINK_GRID[-1],
                      curvature: float = 0.0) -> float:
    """dispersion="forward": 0 (a constant dispersion) or 1 (the fitted dispersion power), the gate
    `CountLaw.dispersion` applies. Both are fitted to the lower part of the training range
    (`forward_split`) and scored by the NB likelihood of each event of the upper part; the power
    must beat the constant by more than the noise of those events (`strongest_within_noise`, the
    constant first). The likelihood of events from all over the range (as `choose_shrink`) says
    how the extra variance behaves inside it; how it goes on beyond the top, where the law's
    spread is used, is what the upper part tells a fit to the lower one. Conditions that do not
    vary leave the constant."""
    split = forward_split(counts, cond)
    if split is None:
        return 0.0
    fit, out = split
    events = CountEvents(counts, cond, fit)
    losses = []
    for gate in (0.0, 1.0):
        law.dispersion_gate.fill_(gate)
        with trial_fit(law):
            fit_law(law, lambda m: events.loss(m, shrink, curvature))
            with torch.no_grad():
                dtype = law.positions.dtype
                losses.append(-law.marginal_log_prob(counts[out].to(dtype), cond[out].to(dtype)).double())
    return (0.0, 1.0)[strongest_within_noise(losses)]


def fit_count_law(law: CountLaw, counts: torch.Tensor, cond: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """Maximum-likelihood fit of `law` to hits per unit `counts` (N, U) at normalised
    conditions `cond` (N, C): the per-unit ridge's strength chosen on held-out events
    (`choose_shrink`; the pooled law's curvature ridge by forward validation, `choose_pooled`), the NB
    marginals on all events, then the copula loadings on the normal scores; then, when the law
    has a bootstrap buffer, refits of the mean parameters on events resampled with replacement
    (seeded, so deterministic), stored for `occupancy_band`. Returns the losses and the chosen
    strengths (`law_shrink`, and `law_curvature_ridge` for the pooled law)."""
    curvature = 0.0
    if law.form == "pooled":
        shrink, curvature = choose_pooled(law, counts, cond, seed)
    else:
        shrink = choose_shrink(law, counts, cond, seed)
    out = {"law_shrink": shrink}
    if law.form == "pooled":
        out["law_curvature_ridge"] = curvature
    if hasattr(law, "dispersion_gate"):
        gate = choose_dispersion(law, counts, cond, shrink, curvature)
        law.dispersion_gate.fill_(gate)
        out["law_dispersion_power_chosen"] = gate
    events = CountEvents(counts, cond)
    out["law_count_nll"] = fit_law(law, lambda m: events.loss(m, shrink, curvature))
    y = law.scores(counts, cond.to(law.loading.dtype)).double()
    # The copula is a correlation model (unit diagonal). Mid-point scores of small counts have a
    # variance below 1 (pxd-tiny, ~4 clusters per sensor: 0.82), and the one-factor density would
    # buy that smaller diagonal with large loadings (0.45 where the scores correlate by 0.035:
    # event-to-event spread of the total twice the data's). Each unit's scores are standardised first.
    y = y / y.std(0, keepdim=True).clamp_min(1e-6)
    with torch.no_grad():
        mean = law.mean(cond.to(law.positions.dtype)).double()
    out["law_copula_nll"] = fit_law(law, lambda m: -m.copula_log_prob(y, mean).mean())
    n_boot = len(law.bootstrap)
    if n_boot:
        gen = torch.Generator().manual_seed(seed)
        samples = []
        for _ in range(n_boot):
            idx = torch.randint(len(counts), (len(counts),), generator=gen)
            resampled = CountEvents(counts, cond, idx)
            with trial_fit(law):  # every refit starts from the fit to all events
                fit_law(law, lambda m: resampled.loss(m, shrink, curvature), max_iter=100)
                samples.append(torch.cat([p.detach().double().reshape(-1) for p in law.mean_parameters()]))
        law.set_bootstrap(torch.stack(samples))
    return out


SHARE_NODES = 16  # Gauss-Hermite nodes of the share law's depth factor (its likelihood integrates it out)


class LayerShareLaw(nn.Module):
    """How a shower's pixel total splits over its layers, given the total: a Dirichlet-multinomial
    over the layers whose mean shares are softmax(eta), eta_l = a_l + b_l . x + c_l . (x * x) + t_l z
    (each layer's own slope and curvature in the log-scaled conditions x, as the `unit_quadratic`
    count law), with one standard-normal depth factor z per shower (a shower that starts earlier
    or later moves all layers together in the pattern t) and a concentration kappa = exp(k_0 + k . x)
    for what the factor leaves (shares scatter less or more with the energy as the data say).

    The total is drawn first from a shower-wide law, so its spread is the data's at every energy;
    only the split comes from here. Every parameter is fitted by maximum likelihood to the
    training showers' pixels per layer (`fit_share_law`), z integrated out by Gauss-Hermite
    quadrature; nothing about a longitudinal profile is fixed in advance."""

    def __init__(self, n_layers: int, n_cond: int):
        super().__init__()
        c = max(n_cond, 1)
        self.bias = nn.Parameter(torch.zeros(n_layers))
        self.slope = nn.Parameter(torch.zeros(n_layers, c))
        self.curvature = nn.Parameter(torch.zeros(n_layers, c))
        # a ramp, not 0: with t = 0 the likelihood is flat in every direction of t (a saddle)
        self.depth = nn.Parameter(torch.linspace(-0.3, 0.3, n_layers))
        self.log_concentration = nn.Parameter(torch.full((1,), math.log(100.0)))
        self.concentration_slope = nn.Parameter(torch.zeros(c))
        nodes, weights = np.polynomial.hermite_e.hermegauss(SHARE_NODES)  # probabilists': weight exp(-z^2 / 2)
        self.register_buffer("nodes", torch.tensor(nodes))
        self.register_buffer("log_weights", torch.tensor(weights / weights.sum()).log())

    def eta(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, L) share logits at depth factor 0."""
        x = cond if cond.shape[1] else cond.new_zeros(len(cond), 1)
        return self.bias[None] + _dot(x, self.slope) + _dot(x * x, self.curvature)

    def concentration(self, cond: torch.Tensor) -> torch.Tensor:
        """(B,) Dirichlet concentration kappa."""
        x = cond if cond.shape[1] else cond.new_zeros(len(cond), 1)
        return (self.log_concentration + (x * self.concentration_slope[None]).sum(-1)).clamp(-5.0, 15.0).exp()

    def mean_shares(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, L) expected share of each layer (the depth factor averaged over its nodes)."""
        eta = self.eta(cond)[:, None] + self.nodes.to(cond.dtype)[None, :, None] * self.depth[None, None]
        return (torch.softmax(eta, -1) * self.log_weights.to(cond.dtype).exp()[None, :, None]).sum(1)

    def log_prob(self, counts: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """(B,) log-likelihood of the split `counts` (B, L) given its total (the depth factor integrated)."""
        n = counts.to(cond.dtype)
        total = n.sum(-1)
        kappa = self.concentration(cond)
        eta = self.eta(cond)[:, None] + self.nodes.to(cond.dtype)[None, :, None] * self.depth[None, None]  # (B, Q, L)
        alpha = kappa[:, None, None] * torch.softmax(eta, -1)
        per_node = (torch.lgamma(n[:, None] + alpha) - torch.lgamma(alpha)).sum(-1)  # (B, Q)
        norm = (torch.lgamma(total + 1) - torch.lgamma(n + 1).sum(-1)
                + torch.lgamma(kappa) - torch.lgamma(total + kappa))
        return norm + torch.logsumexp(per_node + self.log_weights.to(cond.dtype)[None], -1)

    def sample(self, totals: torch.Tensor, cond: torch.Tensor, u: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
        """(B, L) long: each shower's total `totals` (B,) split over the layers, at most `capacity`
        (L,) per layer. u: (B, 2L) uniforms of each shower (counter-based in generation, so a draw
        does not depend on the batch it is made in), all by inverse CDF: u[:, 0] its depth factor,
        u[:, 1:L+1] the gamma variates of its Dirichlet shares, u[:, L+1:] the binomials that deal
        its total out layer by layer (a multinomial)."""
        n_layers = len(self.bias)
        if u.shape != (len(totals), 2 * n_layers):
            raise ValueError(f"share law: need ({len(totals)}, {2 * n_layers}) uniforms, got {tuple(u.shape)}")
        with torch.no_grad():
            cond = cond.to(self.bias.dtype)
            eta, kappa = self.eta(cond).double().cpu().numpy(), self.concentration(cond).double().cpu().numpy()
            depth = self.depth.detach().double().cpu().numpy()
        u = u.double().cpu().numpy()
        logits = eta + special.ndtri(u[:, :1]) * depth[None]
        p = np.exp(logits - logits.max(1, keepdims=True))
        alpha = kappa[:, None] * p / p.sum(1, keepdims=True)
        # a layer whose share underflowed to 0 draws 0 (gammaincinv(0, u) is NaN, which would turn
        # the whole shower into the mean shares)
        g = np.where(alpha > 0, special.gammaincinv(np.where(alpha > 0, alpha, 1.0), u[:, 1:n_layers + 1]), 0.0)
        g_sum = g.sum(1, keepdims=True)
        shares = np.where(g_sum > 0, g / np.where(g_sum > 0, g_sum, 1.0), alpha / alpha.sum(1, keepdims=True))
        out = np.zeros(eta.shape, dtype=np.int64)
        left = totals.long().cpu().numpy().copy()
        rest = np.ones(len(left))
        for lay in range(n_layers - 1):
            q = np.clip(shares[:, lay] / np.maximum(rest, 1e-300), 0.0, 1.0)
            out[:, lay] = np.clip(stats.binom.ppf(u[:, n_layers + 1 + lay], left, q), 0, left).astype(np.int64)  # ppf(0) is -1
            left -= out[:, lay]
            rest = rest - shares[:, lay]
        out[:, -1] = left
        return torch.as_tensor(np.minimum(out, capacity.long().cpu().numpy()[None]), device=totals.device)


SHARE_CURVATURE_GRID = (1e5, 1e4, 1e3, 0.0)  # strengths (in showers' worth of log-likelihood) of a ridge on
# the share logits' curvatures, strongest first, among which `choose_share_curvature` chooses: a curvature
# fitted inside the range is multiplied by the square of the log-energy beyond it
SHARE_CURVATURES = ("free", "forward")


def share_law_loss(law: LayerShareLaw, counts: torch.Tensor, cond: torch.Tensor,
                   curvature_ridge: float = 0.0) -> torch.Tensor:
    """Mean negative log-likelihood per shower plus a small ridge on the slopes and curvatures;
    `curvature_ridge`: the strength (in showers) of a further ridge on the curvatures."""
    return (-law.log_prob(counts, cond).mean()
            + RIDGE * (law.slope.square().sum() + law.curvature.square().sum() + law.concentration_slope.square().sum())
            + curvature_ridge / len(counts) * law.curvature.square().sum())


def share_means_loss(law: LayerShareLaw, counts: torch.Tensor, cond: torch.Tensor,
                     curvature_ridge: float = 0.0) -> torch.Tensor:
    """Multinomial negative log-likelihood per shower of the pixels per layer under the law's mean
    shares (depth factor integrated), plus the ridges of share_law_loss: its minimum puts the law's
    mean pixels per layer, summed over the showers, where the data's are (the score equations of a
    multinomial), whatever the law's scatter."""
    return (-(counts * law.mean_shares(cond).log()).sum(-1).mean()
            + RIDGE * (law.slope.square().sum() + law.curvature.square().sum())
            + curvature_ridge / len(counts) * law.curvature.square().sum())


def _fit_share(law: LayerShareLaw, counts: torch.Tensor, cond: torch.Tensor, means: bool,
               curvature_ridge: float) -> dict[str, float]:
    """fit_share_law at a given curvature ridge."""
    with torch.no_grad():
        frac = (counts + 0.5) / (counts + 0.5).sum(-1, keepdim=True)
        law.bias.copy_(frac.log().mean(0) - frac.log().mean())
    out = {"law_share_nll": fit_law(law, lambda m: share_law_loss(m, counts, cond, curvature_ridge), max_iter=300)}
    if means:
        kept = [law.depth, law.log_concentration, law.concentration_slope]
        for p in kept:
            p.requires_grad_(False)
        try:
            out["law_share_means_nll"] = fit_law(law, lambda m: share_means_loss(m, counts, cond, curvature_ridge),
                                                 max_iter=300)
        finally:
            for p in kept:
                p.requires_grad_(True)
    return out


def choose_share_curvature(law: LayerShareLaw, counts: torch.Tensor, cond: torch.Tensor, means: bool = False) -> float:
    """The strength of the ridge on the share logits' curvatures (`SHARE_CURVATURE_GRID`): the
    strongest whose fit to the lower part of the training range (`forward_split`) predicts the mean
    pixels of every layer over the upper part (its mean shares times each shower's own total) as
    well as the best strength within the noise of the layers (`strongest_within_noise` on
    `forward_errors`), as `choose_forward` chooses the pooled count law's. Conditions that do not
    vary leave the curvatures free."""
    split = forward_split(counts, cond)
    if split is None:
        return 0.0
    fit, out = split
    observed = counts[out].double().mean(0)
    errors = []
    for ridge in SHARE_CURVATURE_GRID:
        with trial_fit(law):
            _fit_share(law, counts[fit], cond[fit], means, ridge)
            with torch.no_grad():
                predicted = (law.mean_shares(cond[out]) * counts[out].sum(1, keepdim=True)).double().mean(0)
                errors.append(forward_errors(predicted, observed))
    return SHARE_CURVATURE_GRID[strongest_within_noise(errors)]


def fit_share_law(law: LayerShareLaw, counts: torch.Tensor, cond: torch.Tensor, means: bool = False,
                  curvature: str = "free") -> dict[str, float]:
    """Maximum-likelihood fit of `law` to pixels per layer `counts` (N, L) at normalised
    conditions `cond` (N, C): the mean shares first (from the empirical ones, no depth factor),
    then everything (full-batch L-BFGS, deterministic). With `means`, then the mean shares' bias,
    slope and curvature alone to `share_means_loss`, the depth pattern and concentration kept:
    the Dirichlet-multinomial's likelihood is nearly flat along directions that move the deep
    layers' mean share at the top energies (two fits within 0.004 nats per shower of each other
    differ by 0.18 layers in mean depth there; docs/calorimeter.md), and the scatter model's misfit
    decides where along them it ends. `curvature`: "free", or "forward" for a ridge on the
    curvatures whose strength forward validation chooses (`choose_share_curvature`)."""
    if curvature not in SHARE_CURVATURES:
        raise ValueError(f"share law curvature must be one of {SHARE_CURVATURES}, got {curvature!r}")
    ridge = choose_share_curvature(law, counts, cond, means) if curvature == "forward" else 0.0
    out = _fit_share(law, counts, cond, means, ridge)
    if curvature == "forward":
        out["law_share_curvature_ridge"] = ridge
    return out


def count_feature(n: torch.Tensor, positions: int) -> torch.Tensor:
    """Hits (or hits still to place) as an O(1) input: log(1 + n) / log(1 + positions)."""
    return (torch.log1p(n.clamp_min(0).float()) / math.log1p(positions)).unsqueeze(-1)


__all__ = ["COUNT_LAWS", "CountLaw", "LayerShareLaw", "fit_share_law", "choose_share_curvature", "share_law_loss", "share_means_loss", "choose_forward", "choose_pooled", "forward_errors", "strongest_within_noise", "choose_shrink", "choose_dispersion", "CountEvents", "count_law_loss", "forward_split", "fit_count_law", "ResponseLaw", "count_feature", "fit_law", "nb_log_prob", "nb_unit_log_prob", "nb_quantile", "normal_scores",
           "factor_log_density", "one_factor_log_density"]
