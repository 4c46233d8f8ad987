"""`uhg overlay` end to end on small stores: content, provenance, resume after SIGKILL, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from overlay_stores import part_files, simulated_store

from uhg.cli import main
from uhg.data.layout import missing_parts
from uhg.data.reader import open_store
from uhg.sparse.overlay import merge_overlay


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    return {
        "signal": simulated_store(root / "signal", "signal", "pxd-tiny", 30, 8, seed=1),
        "background": simulated_store(root / "background", "background", "pxd-tiny", 7, 4, seed=2),
        "mini": simulated_store(root / "mini", "signal", "pxd-mini", 3, 3, seed=3),
    }


def test_overlay_with_background_store(stores, tmp_path) -> None:
    out = tmp_path / "overlay"
    assert main(["overlay", "--signal", str(stores["signal"]), "--background", str(stores["background"]),
                 "--out", str(out), "--part-size", "5"]) == 0
    result, sig, bg = open_store(out), open_store(stores["signal"]), open_store(stores["background"])
    assert len(result) == 30 and result.attrs["part_size"] == 5
    assert result.attrs["extra_columns"] == {"origin": "uint8"}
    for j in (0, 6, 7, 29):  # background event j mod 7: 7 and 29 wrap around
        expected = merge_overlay(sig.read(j, j + 1), bg.read(j % 7, j % 7 + 1), sig.geometry).event(0)
        got = result[j]
        for column in ("sensor", "row", "col", "value"):
            np.testing.assert_array_equal(getattr(got, column), getattr(expected, column))
        np.testing.assert_array_equal(got.extra["origin"], expected.extra["origin"])
        assert got.conditions == expected.conditions
        assert set(got.conditions) == {"n_tracks", "luminosity", "her_current", "ler_current", "beta_y_star"}
    origin = result.read().columns["origin"]
    assert set(np.unique(origin)) == {1, 2, 3}
    provenance = result.attrs["attributes"]["overlay"]
    assert provenance["signal"]["path"] == str(stores["signal"].resolve())
    assert provenance["background"]["store"] == str(stores["background"].resolve())
    assert provenance["origin_flags"] == {"1": "signal", "2": "background", "3": "both"}


def test_resume_after_sigkill_is_byte_identical(stores, tmp_path) -> None:
    """Kill the writer after a few parts, rerun the same command: only missing parts are
    written and every part file equals that of an uninterrupted run."""
    args = ["--signal", str(stores["signal"]), "--background", str(stores["background"]), "--part-size", "1"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "uhg", "overlay", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (killed / "parts").is_dir() and len(os.listdir(killed / "parts")) >= 3:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the overlay finished before it could be killed"
    left = missing_parts(killed)
    assert 0 < len(left) < 30

    assert main(["overlay", *args, "--out", str(killed)]) == 0
    assert missing_parts(killed) == []
    clean = tmp_path / "clean"
    assert main(["overlay", *args, "--out", str(clean)]) == 0
    assert part_files(killed) == part_files(clean)


def test_bad_input_gives_clear_messages(stores, tmp_path, capsys) -> None:
    out = str(tmp_path / "out")

    def error_of(*args: str) -> str:
        assert main(["overlay", *args, "--out", out]) == 2
        return capsys.readouterr().err

    err = error_of("--signal", str(stores["mini"]), "--background", str(stores["background"]))
    assert "geometry 'pxd-tiny'" in err and "'pxd-mini'" in err and "must match" in err
    err = error_of("--signal", str(stores["signal"]), "--model", str(tmp_path / "no-such-export"), "--luminosity", "1e34")
    assert "no-such-export" in err and "not a folder" in err
    err = error_of("--signal", str(tmp_path / "nowhere"), "--background", str(stores["background"]))
    assert "nowhere" in err and "does not exist" in err
    assert "not both" in error_of("--signal", str(stores["signal"]), "--background", str(stores["background"]),
                                  "--model", "m")
    assert "need --distributed" in error_of("--signal", str(stores["signal"]), "--background",
                                            str(stores["background"]), "--workers", "2")
