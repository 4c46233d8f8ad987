"""The after-training fit of the layer-energy law (`model.law_fit_steps`): the law alone trained
further on the fit showers with a decaying learning rate, the voxel stage untouched."""

import numpy as np
import torch
from calo_law import finalise_fresh
from calo_law import small_ds1_family as _family

from uhg.geometry import get_geometry
from uhg.sim.calo import simulate_calo_showers


def test_fit_events_sets_the_fit_sample():
    assert len(_family().fit_sample(20000)) == 4096
    assert len(_family(fit_events=1000).fit_sample(20000)) == 1000
    assert np.array_equal(_family(fit_events=50000).fit_sample(300), np.arange(300))


def test_law_fit_trains_the_law_alone_after_training(one_torch_thread):
    g = get_geometry("ds1-photons")
    showers = simulate_calo_showers(g, 400, seed=21, energy_min=1e3, energy_max=1e5)
    results = [finalise_fresh(_family(law_fit_steps=steps), showers, "law.") for steps in (0, 150, 150)]
    (off, off_moved, _, _, _), (on, on_moved, on_kept, _, law1), (_, _, _, _, law2) = results
    assert off == {} and not off_moved
    assert on_moved and on_kept
    assert on["law_fit_nll_after"] < on["law_fit_nll_before"] - 1.0, on
    assert all(torch.equal(law1[k], law2[k]) for k in law1)  # seeded: the same fit twice
