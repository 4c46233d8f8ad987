"""SuperKEKB machine model for the PXD background simulator: luminosity, beam currents, beam
focusing and the rate of each beam-induced background process relative to the calibration point.

Calibration point (`L_CAL`): SuperKEKB design, L = 8e35 cm^-2 s^-1 with I_LER = 3.6 A
(e+, 4 GeV), I_HER = 2.6 A (e-, 7 GeV) in 2500 bunches and beta_y* = 0.27 mm. The DESIGN.md
targets (0.90 % mean PXD occupancy) come from a simulated background sample at design
conditions, so the simulator reproduces them exactly at this point and scales away from it
with the laws of a machine scenario (`MachineScenario`, YAML files in configs/machine/).

Conditions (recorded per event in every store; `CONDITION_UNITS`)
    luminosity   cm^-2 s^-1
    her_current  A     (x_HER = I_HER / I_HER_DESIGN)
    ler_current  A     (x_LER = I_LER / I_LER_DESIGN)
    beta_y_star  mm    vertical beta function at the IP

Luminosity, currents and focusing: in the beam-beam-limited regime
L = gamma / (2 e r_e) * I * xi_y / beta_y* (times geometry factors), so at the limiting xi_y
    L / L_CAL = sqrt(x_LER * x_HER) * BETA_Y_DESIGN / beta_y*.
A scenario says how the currents follow a requested luminosity, x = (L / L_CAL)^a at the
design current ratio (`current_exponent` a); beta_y* supplies the rest (squeezing the beam,
beta_y* ~ l^(a - 1)). The design scenario keeps beta_y* fixed (a = 1): the vertical beam size
grows with bunch current and the specific luminosity falls as 1 / I_bunch.

Processes: a scenario gives, per process, its share of the occupancy at the calibration point
and its rate relative to that point as a sum of terms, each a weight times a product of power
laws of the conditions normalised to the calibration point (l, x_HER, x_LER, b = beta_y* /
BETA_Y_DESIGN) with real exponents; the weights of a process sum to 1. The design scenario
(configs/machine/design.yaml) is the textbook machine:
    two-photon QED (ee -> eeee)      l                 low-pT pairs: curling tracks from the IP
    radiative Bhabha                 l                 photons -> neutrons, conversions
    Touschek                         0.8 x_LER^2 + 0.2 x_HER^2     (intra-bunch scattering ~ I_b^2,
                                                                   fixed number of bunches)
    beam-gas (Coulomb, bremsstr.)    0.6 g(x_LER) + 0.4 g(x_HER),  g(x) = x (1 + k x) / (1 + k)
                                     = 0.25 x + 0.75 x^2 (rate ~ I * P, dynamic pressure
                                     P = P0 (1 + k I / I_design), k = 3)
    synchrotron radiation            x_HER             (7 GeV HER dominates SR into the IR)
Its total occupancy grows faster than linearly at every luminosity: about as L^1.1 at low
luminosity (luminosity-driven terms and SR dominate) and L^1.3 around L_CAL (measured table in
docs/calibration.md, with the effective exponents of the other shipped scenarios).
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from uhg.data.hits import CONDITION_UNITS as ALL_CONDITION_UNITS
from uhg.errors import ConditionError, ConfigError

L_CAL = 8.0e35
"""Calibration luminosity (cm^-2 s^-1): SuperKEKB design."""
I_LER_DESIGN = 3.6
"""LER (positron) design current, A."""
I_HER_DESIGN = 2.6
"""HER (electron) design current, A."""
BETA_Y_DESIGN = 0.27
"""Vertical beta function at the IP at the calibration point, mm (SuperKEKB LER design)."""

PROCESSES = ("two_photon", "rad_bhabha", "touschek", "beam_gas", "synchrotron")
"""Background processes, in the order used by the rate arrays."""
CONDITIONS = ("luminosity", "her_current", "ler_current", "beta_y_star")
"""Conditions that drive the rates, recorded per event in every background store."""
CONDITION_UNITS = {name: ALL_CONDITION_UNITS[name] for name in CONDITIONS}
CALIBRATION_VALUES = {"luminosity": L_CAL, "her_current": I_HER_DESIGN, "ler_current": I_LER_DESIGN,
                      "beta_y_star": BETA_Y_DESIGN}
SHIPPED_SCENARIOS = ("design", "squeeze", "high-vacuum", "luminosity-dominated")
DEFAULT_SCENARIO = "design"


# ------------------------------------------------------------------------------ scenario schema
class RateTerm(BaseModel):
    """weight * prod_c (condition_c / calibration value_c)^power_c."""

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(gt=0, description="share of the process rate this term carries at the calibration point")
    powers: dict[Literal["luminosity", "her_current", "ler_current", "beta_y_star"], float] = Field(
        default_factory=dict, description="real exponent of each condition (normalised to the calibration point)")

    @field_validator("powers")
    @classmethod
    def _finite(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: p for k, p in v.items() if not math.isfinite(p)}
        if bad:
            raise ValueError(f"exponents must be finite numbers, got {bad}")
        return v


class LayerShare(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layer1: float | None = Field(None, gt=0, lt=1, description="fraction of layer-1 occupancy (lambda) at the "
                                                               "calibration point")
    layer2: float | None = Field(None, gt=0, description="proportion of the layer-2 occupancy the curlers leave")


class Process(BaseModel):
    """One background process of a scenario."""

    model_config = ConfigDict(extra="forbid")

    share: LayerShare = Field(description="share of the occupancy at the calibration point, per layer")
    fluctuation: Literal["luminosity", "beam"] = Field(
        description="event-to-event factor: bunch-to-bunch luminosity (log-normal 5 %) or beam losses "
                    "(log-normal 12 % and injection bursts)")
    rate: list[RateTerm] = Field(min_length=1, description="rate relative to the calibration point: sum of terms")

    @model_validator(mode="after")
    def _weights(self) -> Process:
        total = sum(t.weight for t in self.rate)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"rate weights must sum to 1 (the rate is 1 at the calibration point), got {total:.6g}")
        return self


class Processes(BaseModel):
    model_config = ConfigDict(extra="forbid")

    two_photon: Process
    rad_bhabha: Process
    touschek: Process
    beam_gas: Process
    synchrotron: Process


class Machine(BaseModel):
    model_config = ConfigDict(extra="forbid")

    current_exponent: float = Field(
        gt=0, le=2, description="a: both currents follow a requested luminosity as (L / L_CAL)^a at the design "
                                "current ratio; beta_y* ~ (L / L_CAL)^(a - 1) supplies the rest")


class MachineScenario(BaseModel):
    """A machine scenario file (configs/machine/*.yaml; schema in docs/calibration.md)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="scenario name, recorded in the store attributes")
    description: str = Field("", description="what the scenario stands for")
    machine: Machine
    processes: Processes

    @model_validator(mode="after")
    def _shares(self) -> MachineScenario:
        shares = {n: getattr(self.processes, n).share for n in PROCESSES}
        missing = [f"processes.{n}.share.layer1" for n, s in shares.items() if s.layer1 is None]
        missing += [f"processes.{n}.share.layer2" for n, s in shares.items() if s.layer2 is None and n != "two_photon"]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        if shares["two_photon"].layer2 is not None:
            raise ValueError("processes.two_photon.share.layer2 must be left out: the curler geometry fixes it")
        total = sum(s.layer1 for s in shares.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"layer1 shares must sum to 1, got {total:.6g}")
        return self

    def layer_shares(self) -> dict[int, dict[str, float]]:
        """{layer: {process: share}} as the calibration wants them (layer 2 without two_photon)."""
        procs = {n: getattr(self.processes, n) for n in PROCESSES}
        return {1: {n: p.share.layer1 for n, p in procs.items()},
                2: {n: p.share.layer2 for n, p in procs.items() if n != "two_photon"}}

    def luminosity_driven(self) -> np.ndarray:
        """(5,) bool: processes that fluctuate with the bunch-to-bunch luminosity."""
        return np.array([getattr(self.processes, n).fluctuation == "luminosity" for n in PROCESSES])

    # -- machine
    def currents_for_luminosity(self, luminosity: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """(I_HER, I_LER) in A for `luminosity` (cm^-2 s^-1) at the design current ratio."""
        x = np.asarray(luminosity, dtype=np.float64) / L_CAL
        a = self.machine.current_exponent
        if a != 1.0:
            x = x**a
        return x * I_HER_DESIGN, x * I_LER_DESIGN

    def beta_y_star(self, luminosity, her_current, ler_current) -> np.ndarray:
        """beta_y* (mm) that delivers `luminosity` with the given currents at the beam-beam limit."""
        lum = np.asarray(luminosity, dtype=np.float64) / L_CAL
        x = np.sqrt((np.asarray(her_current, np.float64) / I_HER_DESIGN) * (np.asarray(ler_current, np.float64) / I_LER_DESIGN))
        return BETA_Y_DESIGN * x / lum

    def conditions(self, luminosity, her_current=None, ler_current=None) -> dict[str, np.ndarray]:
        """Every condition of `CONDITIONS` (arrays) for the given luminosity and, optionally, currents."""
        lum = np.asarray(luminosity, dtype=np.float64)
        if her_current is None:
            her, ler = self.currents_for_luminosity(lum)
            a = self.machine.current_exponent
            beta = np.full(lum.shape, BETA_Y_DESIGN) if a == 1.0 else BETA_Y_DESIGN * (lum / L_CAL) ** (a - 1)
        else:
            her = np.broadcast_to(np.asarray(her_current, np.float64), lum.shape).copy()
            ler = np.broadcast_to(np.asarray(ler_current, np.float64), lum.shape).copy()
            beta = self.beta_y_star(lum, her, ler)
        return {"luminosity": lum, "her_current": her, "ler_current": ler, "beta_y_star": beta}

    def process_rates(self, conditions: dict[str, np.ndarray]) -> np.ndarray:
        """(..., 5) rate of each process in `PROCESSES` relative to the calibration point."""
        ratio = {c: np.asarray(conditions[c], dtype=np.float64) / CALIBRATION_VALUES[c] for c in CONDITIONS}
        rates = []
        for name in PROCESSES:
            total = 0.0
            for term in getattr(self.processes, name).rate:
                value = term.weight
                for c, p in term.powers.items():
                    value = value * (ratio[c] if p == 1.0 else ratio[c] ** p)
                total = total + value
            rates.append(np.broadcast_to(total, ratio["luminosity"].shape))
        return np.stack(rates, axis=-1)


def scenario_directory() -> Path:
    """configs/machine of the source tree (or of the installed package)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "configs" / "machine", here.parent.parent / "configs" / "machine"):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"cannot find the shipped machine scenarios (configs/machine next to {here.parent})")


def load_scenario(spec: str | Path = DEFAULT_SCENARIO) -> MachineScenario:
    """A shipped scenario by name (`SHIPPED_SCENARIOS`) or a YAML file; ConfigError names the
    file and the key."""
    from uhg.config.loading import describe_errors, read_yaml_mapping

    text = str(spec)
    if text in SHIPPED_SCENARIOS:
        return _shipped(text)
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"machine scenario {text!r}: neither a shipped scenario ({', '.join(SHIPPED_SCENARIOS)}) "
                          "nor a YAML file")
    raw = read_yaml_mapping(path, "machine scenario", "(name, machine, processes)")
    try:
        return MachineScenario.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{path}: " + describe_errors(err)) from None


@cache
def _shipped(name: str) -> MachineScenario:
    return load_scenario(scenario_directory() / f"{name}.yaml")


def as_scenario(scenario: MachineScenario | str | Path | None) -> MachineScenario:
    return scenario if isinstance(scenario, MachineScenario) else load_scenario(scenario or DEFAULT_SCENARIO)


def currents_for_luminosity(luminosity: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """(I_HER, I_LER) in A that deliver `luminosity` (cm^-2 s^-1) in the design scenario."""
    return _shipped(DEFAULT_SCENARIO).currents_for_luminosity(luminosity)


def luminosity_for_currents(her_current: np.ndarray | float, ler_current: np.ndarray | float) -> np.ndarray:
    """Luminosity (cm^-2 s^-1) the machine delivers at the given currents (A) and design beta_y*."""
    x_her = np.asarray(her_current, dtype=np.float64) / I_HER_DESIGN
    x_ler = np.asarray(ler_current, dtype=np.float64) / I_LER_DESIGN
    return L_CAL * np.sqrt(x_ler * x_her)


def check_conditions(luminosity: float, luminosity_max: float | None, her_current: float | None,
                     ler_current: float | None) -> None:
    """Raise ConditionError for physically impossible requests."""
    if not (math.isfinite(luminosity) and luminosity > 0):
        raise ConditionError(f"luminosity must be a positive number in cm^-2 s^-1, got {luminosity!r}")
    if luminosity_max is not None:
        if not (math.isfinite(luminosity_max) and luminosity_max >= luminosity):
            raise ConditionError(f"luminosity_max must be >= luminosity ({luminosity:g}), got {luminosity_max!r}")
    if (her_current is None) != (ler_current is None):
        raise ConditionError("give both beam currents (her_current and ler_current) or neither; "
                             f"got her_current={her_current!r}, ler_current={ler_current!r}")
    for name, value in (("her_current", her_current), ("ler_current", ler_current)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConditionError(f"{name} must be a positive current in A, got {value!r}")
    if her_current is not None and luminosity_max is not None:
        raise ConditionError("fixed beam currents cannot be combined with a luminosity range "
                             "(luminosity_max); leave the currents out so they follow the luminosity")
