"""The deposited fraction's location and spread as fitted functions of the incident energy
(`model.deposit_spread` of the calorimeter layer model): a few parameters fitted by maximum
likelihood to the training showers, so that beyond the training range the spread is what the
fitted function says rather than wherever a network's weights take it (docs/calorimeter.md)."""

from __future__ import annotations

import torch
from torch import nn

DEPOSIT_SPREAD_PARAMS = {"log_linear": 2, "log_quadratic": 3, "power_floor": 3}
"""Parameters of the scale of each `deposit_spread` form, as a function of u (log E_inc mapped to
[-1, 1] over the fitting showers): log_linear log s = a + b u; log_quadratic log s = a + b u + c u^2;
power_floor s = exp(a) + exp(b - exp(c) u), a power of E_inc falling to a floor of its own."""
DEPOSIT_LOCATION_DEGREE = 2
"""Degree of the location of the deposited fraction's log as a polynomial in u (inside [-1, 1])."""


def deposit_location_scale(form: str, coef: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(location, log scale) of log(E_dep / E_inc) at u ((B,), log E_inc mapped to [-1, 1] over the
    fitting showers) for the parameters `coef` of `form` (location polynomial first)."""
    n_loc = DEPOSIT_LOCATION_DEGREE + 1
    # the location is held at its edge value beyond the fitted range: the quadratic turns over
    # within a few times the range's top (measured: docs/results.md, "Zero-shot in energy with the
    # shipped layer law, and a fitted spread of the deposit")
    powers = u.clamp(-1.0, 1.0)[:, None] ** torch.arange(n_loc, device=u.device, dtype=u.dtype)
    location = powers @ coef[:n_loc].to(u.dtype)
    p = coef[n_loc:].to(u.dtype)
    if form == "log_linear":
        log_scale = p[0] + p[1] * u
    elif form == "log_quadratic":
        log_scale = p[0] + p[1] * u + p[2] * u * u
    elif form == "power_floor":
        log_scale = torch.logaddexp(p[0].expand_as(u), p[1] - p[2].exp() * u)
    else:
        raise ValueError(f"unknown deposit_spread form {form!r}; expected one of {sorted(DEPOSIT_SPREAD_PARAMS)}")
    return location, log_scale


def fit_deposit_spread(form: str, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Maximum-likelihood parameters (location polynomial, then the scale of `form`) of the
    Gaussian t ~ N(location(u), scale(u)^2) of showers' log deposited fractions t (B,) at u (B,)
    (float64, L-BFGS). The Gaussian's variance is the mean squared deviation, so the fitted scale
    follows the standard deviation per energy, the spread that the resolution measures."""
    u, t = u.double(), t.double()
    n_loc = DEPOSIT_LOCATION_DEGREE + 1
    if len(t) < n_loc + DEPOSIT_SPREAD_PARAMS[form] + 2:
        raise ValueError(f"deposit_spread {form!r}: {len(t)} showers with a deposit are too few to fit it")
    powers = u[:, None] ** torch.arange(n_loc, dtype=u.dtype)
    loc = torch.linalg.lstsq(powers, t[:, None]).solution[:, 0]
    # start: the location by least squares, the log scale linear in u from the log squared residuals
    # (E log chi^2_1 = log sigma^2 - 1.27)
    log_r2 = torch.log((t - powers @ loc).pow(2).clamp_min(1e-30)) + 1.27
    ab = torch.linalg.lstsq(torch.stack([torch.ones_like(u), u], -1), log_r2[:, None]).solution[:, 0] / 2
    if form == "log_linear":
        start = ab
    elif form == "log_quadratic":
        start = torch.cat([ab, ab.new_zeros(1)])
    else:
        # half of the spread at the top of the range as the floor, the rest a power with the slope
        # of the linear start
        top = torch.exp(ab[0] + ab[1])
        mid = torch.exp(ab[0])
        start = torch.stack([torch.log(0.5 * top), torch.log((mid - 0.5 * top).clamp_min(1e-12)),
                             torch.log((-ab[1]).clamp_min(1e-3))])
    coef = torch.cat([loc, start]).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([coef], lr=1.0, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        location, log_scale = deposit_location_scale(form, coef, u)
        nll = (0.5 * ((t - location) / log_scale.exp()).pow(2) + log_scale).mean()
        nll.backward()
        return nll

    with torch.enable_grad():
        for _ in range(4):
            opt.step(closure)
    return coef.detach()


class DepositLaw(nn.Module):
    """Location and scale of log(E_dep / E_inc) as fitted functions of log E_inc
    (`deposit_spread`): the law's first variable is the deposited fraction standardised by them,
    so its spread beyond the training range is the fitted function's, not the network's."""

    def __init__(self, form: str):
        super().__init__()
        if form not in DEPOSIT_SPREAD_PARAMS:
            raise ValueError(f"unknown deposit_spread form {form!r}; expected one of {sorted(DEPOSIT_SPREAD_PARAMS)}")
        self.form = form
        self.register_buffer("coef", torch.zeros(DEPOSIT_LOCATION_DEGREE + 1 + DEPOSIT_SPREAD_PARAMS[form],
                                                 dtype=torch.float64))
        # log E_inc at the middle of the fitting showers' range, and half that range: u = 0 and 1
        self.register_buffer("log_e", torch.tensor([0.0, 1.0], dtype=torch.float64))

    def u(self, e_inc: torch.Tensor) -> torch.Tensor:
        return (torch.log(e_inc.double()) - self.log_e[0]) / self.log_e[1]

    def location_scale(self, e_inc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(location, scale) of log(E_dep / E_inc) at incident energies (B,) MeV, in their dtype."""
        location, log_scale = deposit_location_scale(self.form, self.coef, self.u(e_inc))
        return location.to(e_inc.dtype), log_scale.exp().to(e_inc.dtype)

    @torch.no_grad()
    def fit(self, e_inc: torch.Tensor, t: torch.Tensor) -> None:
        """Fit to showers' incident energies (B,) MeV and log deposited fractions t (B,) (-inf:
        no deposit, left out)."""
        held = torch.isfinite(t)
        log_e = torch.log(e_inc.double())
        lo, hi = float(log_e.min()), float(log_e.max())
        self.log_e.copy_(torch.tensor([(lo + hi) / 2, max((hi - lo) / 2, 1e-6)], dtype=torch.float64))
        self.coef.copy_(fit_deposit_spread(self.form, self.u(e_inc)[held], t[held]))
