"""Stage timing of generation (`uhg.models.stages`): recorded only inside `recording`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uhg.config.gan import GanConfig
from uhg.geometry import get_geometry
from uhg.models.common import ConditionNorm
from uhg.models.gan_family import GanFamily
from uhg.models.stages import recording, stage


def test_gan_sampling_reports_its_stages_while_recording() -> None:
    fam = GanFamily(get_geometry("pxd-tiny"), GanConfig(conditions=["luminosity"]),
                    ConditionNorm.from_ranges({"luminosity": (1e34, 4e34)}, ["luminosity"]))
    torch.manual_seed(0)
    g = fam.build_modules()["generator"]
    lum = {"luminosity": torch.tensor([2e34, 3e34])}
    with recording() as totals:
        inside = fam.sample(g, lum, seeds=[1, 2])
    assert set(totals) == {"noise", "decoder", "seeds", "clusters", "hits and charges"}
    assert all(t["calls"] == 1 and t["cpu_s"] >= 0 and t["wall_s"] > 0 for t in totals.values())
    outside = fam.sample(g, lum, seeds=[1, 2])  # not recorded, same events
    assert all(t["calls"] == 1 for t in totals.values())
    assert np.array_equal(inside.columns["col"], outside.columns["col"])
    with recording():
        with pytest.raises(RuntimeError, match="already on"), recording():
            pass
        with stage("x"):
            pass
