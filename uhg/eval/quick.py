"""A cheap subset of the evaluation for validation during training (a second or less).

    metrics = validation_metrics(reference_batch, generated_batch, geometry)
    logger.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step)

No repeats and no floor: one pass over the full samples. Keys (PXD): `occupancy_rel_diff`
(relative error of the mean occupancy), `occupancy_per_sensor_mre`, `charge_sp`,
`occupancy_per_image_sp`, `cluster_size_sp`; (calorimeter): `response_rel_diff`, `response_sp`,
`energy_per_layer_mre`, `shower_depth_sp`, `hits_per_event_sp`. A value is NaN when one
sample is empty.
"""

from __future__ import annotations

import math

import numpy as np

from uhg.data.hits import HitBatch
from uhg.eval import distances
from uhg.eval.compare import mean_abs_rel_error
from uhg.eval.evaluate import features_of

_SP = {"pixel": ("charge", "occupancy_per_image", "cluster_size"),
       "calo": ("response", "shower_depth", "hits_per_event")}


def validation_metrics(reference: HitBatch, generated: HitBatch, geometry) -> dict[str, float]:
    """The cheap metrics of the module docstring for two batches of the same geometry."""
    if reference.kind != generated.kind:
        raise ValueError(f"cannot compare {reference.kind} with {generated.kind} events")
    if len(reference) == 0 or len(generated) == 0:
        keys = (["occupancy_rel_diff", "occupancy_per_sensor_mre"] if reference.kind == "pixel"
                else ["response_rel_diff", "energy_per_layer_mre"])
        return {k: math.nan for k in [*keys, *(f"{n}_sp" for n in _SP[reference.kind])]}
    ref, gen = features_of(reference, geometry), features_of(generated, geometry)
    out: dict[str, float] = {}
    if reference.kind == "pixel":
        r = ref.profiles["occupancy_per_sensor"].values.mean(axis=0)
        g = gen.profiles["occupancy_per_sensor"].values.mean(axis=0)
        out["occupancy_rel_diff"] = float((g.mean() - r.mean()) / r.mean()) if r.mean() > 0 else math.nan
        out["occupancy_per_sensor_mre"] = mean_abs_rel_error(g, r)
    else:
        r = ref.distributions["response"].values.mean()
        out["response_rel_diff"] = float((gen.distributions["response"].values.mean() - r) / r)
        out["energy_per_layer_mre"] = mean_abs_rel_error(gen.profiles["energy_per_layer"].values.mean(axis=0),
                                                         ref.profiles["energy_per_layer"].values.mean(axis=0))
    for name in _SP[reference.kind]:
        a, b = ref.distributions[name], gen.distributions[name]
        binning = distances.common_binning([a.values, b.values], a.scale)
        out[f"{name}_sp"] = distances.separation_power_samples(a.values, b.values, binning)
    return {k: float(v) if np.isfinite(v) else math.nan for k, v in out.items()}
