"""Waiting for a server a test started (MLflow UI and tracking servers)."""

from __future__ import annotations

import subprocess
import time
import urllib.request


def wait_until_healthy(url: str, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    """Poll `url` until it answers 200; fail with the server's last output if it ends first or
    the timeout passes (an MLflow server takes 10-70 s to start on 2 shared cores)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            err = proc.stderr.read().decode()[-3000:] if proc.stderr else ""
            raise AssertionError(f"{what} ended (exit {proc.returncode}): {err}")
        assert time.monotonic() < deadline, f"{what} did not answer within {timeout:.0f} s"
        time.sleep(1)
