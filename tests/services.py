"""Waiting for a server a test started (MLflow servers, a Ray head's dashboard)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request

# seconds between two looks at a starting server or node: a look is one local HTTP request or GCS
# call, and every second a start is noticed late is a second of the suite
POLL_S = 0.25


def wait_until_healthy(url: str | urllib.request.Request, proc: subprocess.Popen, what: str,
                       timeout: float = 240) -> None:
    """Poll `url` until it answers 200. If `proc` (started with start_new_session=True) ends
    first or the timeout passes, kill its process group and fail with its last output (an MLflow
    server takes 10-70 s to start on 2 shared cores, a Ray head 10-30 s)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            state = f"ended (exit {proc.returncode})" if proc.poll() is not None else f"did not answer in {timeout:.0f} s"
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the output ends only with every process holding it
            except ProcessLookupError:
                pass
            stream = proc.stderr or proc.stdout
            text = stream.read() if stream else ""
            text = text.decode(errors="replace") if isinstance(text, bytes) else text
            raise AssertionError(f"{what} {state}:\n{text[-3000:]}")
        time.sleep(POLL_S)
