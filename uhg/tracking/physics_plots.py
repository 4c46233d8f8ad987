"""End-of-training physics plots for the MLflow run: generated vs held-out reference events.

Pixel detectors: occupancy per sensor and the pixel charge spectrum; calorimeters: energy
response (E_dep / E_inc) and energy per layer. The features come from the end-of-run held-out
sample (`uhg.train.evaluation.held_out_sample`): the same events the held-out report compares.
"""

from __future__ import annotations

import logging
from typing import Any

from uhg.eval.features import FeatureSet

log = logging.getLogger(__name__)

PIXEL_PLOTS = {"occupancy_per_sensor": "profile", "charge": "distribution"}
CALO_PLOTS = {"response": "distribution", "energy_per_layer": "profile"}


def physics_figures(reference: FeatureSet, generated: FeatureSet, title: str) -> dict[str, Any]:
    """{artifact name: matplotlib Figure} comparing the features of reference and generated
    events; `title` prefixes each figure's title."""
    from uhg.eval.plots import distribution_figure, profile_figure

    if reference.n_events == 0:
        return {}
    figures = {}
    for name, style in (PIXEL_PLOTS if reference.kind == "pixel" else CALO_PLOTS).items():
        if style == "profile":
            samples = {"reference": reference.profiles[name], "generated": generated.profiles[name]}
            figures[f"plots/{name}.png"] = profile_figure(samples, title=f"{title}: {name}")
        else:
            samples = {"reference": reference.distributions[name], "generated": generated.distributions[name]}
            figures[f"plots/{name}.png"] = distribution_figure(samples, title=f"{title}: {name}")
    return figures


def log_physics_plots(logger: Any, reference: FeatureSet, generated: FeatureSet, title: str) -> list[str]:
    """Logs the figures as PNG artifacts; returns their names. A failure here is reported as a
    warning and tag `uhg.plots_error` (the trained model and checkpoints are already saved)."""
    try:
        figures = physics_figures(reference, generated, title)
        for name, figure in figures.items():
            logger.log_figure(figure, name)
    except Exception as err:  # plotting must never fail a finished training run
        log.warning("physics plots skipped: %s: %s", type(err).__name__, err)
        logger.set_tags({"uhg.plots_error": f"{type(err).__name__}: {err}"[:500]})
        return []
    return sorted(figures)
