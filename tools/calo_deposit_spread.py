"""Forward validation of the `deposit_spread` forms of `calo_layers` (how the spread of the
deposited fraction log(E_dep / E_inc) depends on log E_inc), inside a training store: each form is
fitted (`uhg.models.calo_deposit.fit_deposit_spread`, the fit the model makes) to the showers below
a cut T of the store's incident energies and predicts the spread in log bins around 2x, 5x and 10x
T that lie inside the store; then fitted to the whole store, it predicts the spread at fixed
energies above it, against showers simulated there (optional, `--reference-energies`).

    python tools/calo_deposit_spread.py --train data/ds1_photons_24k.zarr --cuts 10000,20000 \
        [--reference-energies 200000,500000,1000000 --events 2000 --seed 301]

The observed spread of a bin is the standard deviation of log(E_dep / E_inc) of its showers (bins
span a factor 1.25 either side of their centre, where the location moves by far less than the
spread); the predicted one is the fitted scale's root mean square over the same showers. At a
fixed energy it also prints std / mean of E_dep / E_inc, the resolution of `uhg eval extrapolate`.
Energies in MeV.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def deposits(batch) -> tuple[np.ndarray, np.ndarray]:
    """(incident energies, E_dep / E_inc) of a calorimeter HitBatch."""
    e = np.asarray(batch.conditions["incident_energy"], dtype=np.float64)
    dep = np.bincount(batch.event_index(), weights=batch.columns["value"].astype(np.float64), minlength=len(batch))
    return e, dep / e


def predict(form: str, coef: torch.Tensor, log_e: tuple[float, float], e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from uhg.models.calo_deposit import deposit_location_scale

    u = (torch.as_tensor(np.log(e)) - log_e[0]) / log_e[1]
    location, log_scale = deposit_location_scale(form, coef, u)
    return location.numpy(), np.exp(log_scale.numpy())


def fit(form: str, e: np.ndarray, r: np.ndarray):
    from uhg.models.calo_deposit import fit_deposit_spread

    ok = r > 0
    log_e = np.log(e[ok])
    ref = ((log_e.min() + log_e.max()) / 2, (log_e.max() - log_e.min()) / 2)
    u = torch.as_tensor((log_e - ref[0]) / ref[1])
    return fit_deposit_spread(form, u, torch.as_tensor(np.log(r[ok]))), ref


def main() -> None:
    from uhg.data import open_store
    from uhg.models.calo_deposit import DEPOSIT_SPREAD_PARAMS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--cuts", default="10000,20000", help="fit ranges' tops T (MeV) of the forward validation")
    ap.add_argument("--factors", default="2,5,10", help="test bins around these multiples of T")
    ap.add_argument("--forms", default=",".join(DEPOSIT_SPREAD_PARAMS))
    ap.add_argument("--reference-energies", default="", help="MeV, comma-separated: simulate showers there")
    ap.add_argument("--events", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=301)
    a = ap.parse_args()
    torch.set_num_threads(1)
    store = open_store(a.train)
    e, r = deposits(store.read(0, len(store)))
    forms = a.forms.split(",")
    factors = [float(f) for f in a.factors.split(",")]
    print(f"{len(e)} showers, {e.min() / 1e3:.1f}-{e.max() / 1e3:.1f} GeV, {(r <= 0).sum()} without a deposit\n")
    print("| fit range | test bin | showers | observed std of log(E_dep/E_inc) | "
          + " | ".join(f"{f}: spread / observed - 1, mean response error" for f in forms) + " |")
    print("|---|---|---|---|" + "---|" * len(forms))
    for cut in (float(c) for c in a.cuts.split(",")):
        below = e <= cut
        fits = {f: fit(f, e[below], r[below]) for f in forms}
        for k in factors:
            lo, hi = k * cut / 1.25, min(k * cut * 1.25, e.max())
            m = (e >= lo) & (e < hi) & (r > 0)
            if lo >= e.max() or m.sum() < 50:
                continue
            t = np.log(r[m])
            cells = []
            for f in forms:
                location, scale = predict(f, *fits[f], e[m])
                cells.append(f"{np.sqrt((scale ** 2).mean()) / t.std() - 1:+.3f}, "
                             f"{np.exp(t.mean() - location.mean()) - 1:+.4f}")
            print(f"| {e.min() / 1e3:.0f}-{cut / 1e3:.0f} GeV | {lo / 1e3:.0f}-{hi / 1e3:.0f} GeV ({k:g}x) | {m.sum()} "
                  f"| {t.std():.4f} | " + " | ".join(cells) + " |")
    if not a.reference_energies:
        return
    from uhg.sim.calo import simulate_calo_showers

    fits = {f: fit(f, e, r) for f in forms}
    print("\nfitted to the whole store, at fixed energies (simulated, seed "
          f"{a.seed}, {a.events} showers each):\n")
    print("| E_inc | std/mean of E_dep/E_inc | std of log | " + " | ".join(f"{f}: scale / std of log - 1" for f in forms)
          + " |\n|---|---|---|" + "---|" * len(forms))
    for energy in (float(x) for x in a.reference_energies.split(",")):
        batch = simulate_calo_showers(store.geometry, a.events, a.seed, energies=np.full(a.events, energy))
        _, rr = deposits(batch)
        t = np.log(rr[rr > 0])
        cells = [f"{predict(f, *fits[f], np.array([energy]))[1][0] / t.std() - 1:+.3f}" for f in forms]
        print(f"| {energy / 1e3:.0f} GeV | {rr.std() / rr.mean():.5f} | {t.std():.5f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
