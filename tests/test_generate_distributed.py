"""Generation and overlays on a real local Ray: identical stores for 0 (in-process), 1 and 2
workers, also when a worker dies mid-part (Ray restarts it and retries the part), and
`uhg generate --distributed` writes the same parts as `uhg generate` in one process."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from overlay_stores import export_untrained_gan, part_files, simulated_store

from uhg.data.layout import missing_parts
from uhg.errors import CheckpointError
from uhg.generate.overlay import OverlayJob, plan_overlay, run_overlay
from uhg.generate.ray_pool import PartResult, RayOptions, run_parts

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    # Test-defined jobs travel by value: Ray workers cannot import this test module.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    return {"signal": simulated_store(root / "signal", "signal", "pxd-tiny", 12, 4, seed=1),
            "export": export_untrained_gan(root / "export", "pxd-tiny", seed=4, embed_dim=32, z_dim=16,
                                           sensor_noise_dim=4, attention_layers=1, decoder_channels=[16, 8])}


def test_distributed_generate_equals_single_process(ray_cluster, inputs, tmp_path) -> None:
    from uhg.cli import main

    args = ["generate", "--model", str(inputs["export"]), "--events", "8", "--luminosity", "2e34", "--seed", "3",
            "--batch-size", "4", "--part-size", "4"]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    assert main([*args, "--out", str(tmp_path / "ray"), "--distributed", "--workers", "2"]) == 0
    assert part_files(tmp_path / "ray") == part_files(tmp_path / "single")


@dataclass
class DiesOnceJob(OverlayJob):
    """An overlay job whose worker process dies (hard exit) in the middle of its first part."""

    marker: str = ""

    def write_part(self, part: int) -> PartResult:
        if part == 1 and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)
        return super().write_part(part)


def test_overlay_identical_for_any_number_of_workers_even_if_one_dies(ray_cluster, inputs, tmp_path) -> None:
    args = {"model": str(inputs["export"]), "conditions": {"luminosity": 2e34}, "seed": 5, "part_size": 3,
            "batch_size": 3}
    run_overlay(inputs["signal"], tmp_path / "here", **args)
    report = run_overlay(inputs["signal"], tmp_path / "ray1", ray_options=RayOptions(workers=1), **args)
    assert [r.part for r in report.parts] == list(range(4))
    assert part_files(tmp_path / "ray1") == part_files(tmp_path / "here")

    # Two workers, one of which dies in the middle of part 1: Ray restarts it and retries the part.
    job, parts, sizes = plan_overlay(inputs["signal"], tmp_path / "ray2", **args)
    dying = DiesOnceJob(**vars(job), marker=str(tmp_path / "died"))
    report = run_parts(dying, parts, sizes, ray_options=RayOptions(workers=2))
    assert (tmp_path / "died").exists(), "no worker died: the retry was not exercised"
    assert [r.part for r in report.parts] == parts == list(range(4))
    assert missing_parts(tmp_path / "ray2") == []
    assert part_files(tmp_path / "ray2") == part_files(tmp_path / "here")


def test_worker_side_user_error_arrives_as_itself(ray_cluster, inputs, tmp_path) -> None:
    """Weights are first read in the workers: a corrupt file must read as a CheckpointError
    naming it, not as a Ray actor crash."""
    export = tmp_path / "export"
    shutil.copytree(inputs["export"], export)
    weights = export / "generator.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="generator.safetensors: corrupt weights"):
        run_overlay(inputs["signal"], tmp_path / "out", model=str(export), conditions={"luminosity": 2e34},
                    ray_options=RayOptions(workers=1))
