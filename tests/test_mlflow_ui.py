"""The MLflow UI, opened as a user would after the demo: an `mlflow server` on 127.0.0.1 over the
sqlite store of two tiny real runs (a GAN and a transformer, each with its end-of-run evaluation),
rendered by a real headless Chromium at the links uhg prints (`uhg.tracking.store.ui_url`). Both
runs, their metrics and the evaluation report artifact must be listed, in the model-training view
(not the GenAI overview a plain experiment link opens in MLflow 3.17)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from services import wait_until_healthy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
COMMON = {
    "geometry": "pxd-tiny", "seed": 3,
    "train": {"steps": 3, "batch_size": 2, "log_every": 1},
    "evaluate": {"final": True, "events": 8, "repeats": 2, "classifier": False, "plots": False},
    "tracking": {"experiment": "ui-check"},
}
MODELS = {
    "gan": {"family": "gan", "z_dim": 8, "sensor_noise_dim": 2, "embed_dim": 16, "attention_layers": 1,
            "attention_heads": 2, "decoder_channels": [8, 4], "discriminator_channels": [4, 8]},
    "transformer": {"family": "transformer", "d_model": 32, "n_layers": 1, "n_heads": 2, "latent_dim": 4,
                    "max_hits": 256},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, dict[str, str]]:
    """Two tiny runs tracked into one sqlite store: (uri, experiment id, {family: run id})."""
    if CHROMIUM is None:
        pytest.skip("headless Chromium is not installed (Debian/Ubuntu: apt-get install chromium)")
    from uhg.config import config_from_dict
    from uhg.tracking.mlflow_logger import find_run_id
    from uhg.train.local import run_local

    root = tmp_path_factory.mktemp("mlflow-ui")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        for family, model in MODELS.items():
            cfg = config_from_dict({**COMMON, "name": f"ui-{family}", "model": model, "output_dir": str(root / family),
                                    "data": {"store": str(root / "tiny.zarr"), "validation_fraction": 0.25,
                                             "simulate": {"n_events": 24, "part_size": 12, "luminosity_min": 1.0e34,
                                                          "luminosity_max": 4.0e34}}})
            run_local(cfg)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before
    from mlflow import MlflowClient

    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name("ui-check")
    runs = {f: find_run_id(f"ui-{f}", experiment="ui-check", tracking_uri=uri) for f in MODELS}
    return uri, experiment.experiment_id, runs


@pytest.fixture(scope="module")
def server(tracked: tuple[str, str, dict[str, str]]):
    uri = tracked[0]
    port = _free_port()
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(f"{url}/health", proc, "mlflow server")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its worker process
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _rendered(url: str, profile: Path) -> str:
    """The text of the page after its scripts ran, as headless Chromium renders it."""
    import html
    import re

    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--user-data-dir={profile}", "--virtual-time-budget=30000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    text = re.sub(r"<style.*?</style>|<script.*?</script>|<svg.*?</svg>", " ", done.stdout, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", text)).split())


def test_ui_lists_both_runs_their_metrics_and_the_evaluation_report(tracked, server: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from uhg.tracking.store import ui_url

    _, experiment_id, runs = tracked
    tags = MlflowClient(tracking_uri=tracked[0]).get_experiment(experiment_id).tags
    assert tags.get("mlflow.experimentKind") == "custom_model_development"

    page = _rendered(ui_url(server, experiment_id), tmp_path / "profile")
    assert "Token Usage" not in page, f"the GenAI overview opened: {page[:2000]}"
    assert "ui-gan" in page and "ui-transformer" in page and "2 matching runs" in page, page[:3000]
    for family, run_id in runs.items():
        run_page = _rendered(ui_url(server, experiment_id, run_id), tmp_path / "profile")
        for metric in ("loss_generator" if family == "gan" else "nll", "val_hits_per_event_rel_error"):
            assert f" {metric} " in run_page, f"{metric} not listed: {run_page[:3000]}"
        artifacts = _rendered(ui_url(server, experiment_id, run_id).replace("?", "/artifacts/eval/report.html?"),
                              tmp_path / "profile")
        assert "report.html" in artifacts and "metrics.json" in artifacts, artifacts[:3000]
