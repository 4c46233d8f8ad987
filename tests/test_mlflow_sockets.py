"""The MLflow servers uhg tells users to start listen on 127.0.0.1 only (checked at run time).

uhg starts no MLflow server itself; it prints the command to start one: `uhg train` and
`uhg demo` (uhg.tracking.store.ui_hint) and `cluster/local.sh start` ("Follow the run"). Each
printed command is run for real, and every listening TCP socket of the server and of all the
processes it starts (uvicorn workers, job runners) must be on loopback, and the port must refuse
a connection at the host's network address. A server meant for a cluster (cluster/README.md,
cluster/k8s/mlflow.yaml) binds a private address only when the user writes it, next to a
warning that MLflow has no authentication of its own.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from services import wait_until_healthy

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket of process `pid` and all its descendants."""
    import psutil

    root = psutil.Process(pid)
    out = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            out |= {(c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="tcp")
                    if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _host_ipv4() -> str | None:
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


@pytest.fixture
def started() -> Iterator:
    """Start a command line in its own session (process group); kill the group afterwards."""
    procs: list[subprocess.Popen] = []

    def start(argv: list[str], cwd: Path) -> subprocess.Popen:
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:  # nothing of these servers is kept: no need to wait for a clean shutdown
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def test_the_socket_check_sees_a_wildcard_bind(started, tmp_path: Path) -> None:
    """Control: the same check reports a server bound to every interface."""
    port = _free_port()
    proc = started([sys.executable, "-m", "http.server", "--bind", "0.0.0.0", str(port)], tmp_path)
    deadline = time.monotonic() + 30
    while not _listening(proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline, "http.server did not listen"
        time.sleep(0.2)
    assert _listening(proc.pid) == {("0.0.0.0", port)}


def _hint_command(tmp_path: Path) -> str:
    """What `uhg train` / `uhg demo` print after a run tracked into a sqlite store."""
    from uhg.tracking.store import ui_hint

    hint = ui_hint(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", "0")
    command, _, page = hint.partition(", then open ")
    assert page.startswith("http://127.0.0.1:5000/"), hint
    return command


def _local_sh_command(tmp_path: Path) -> str:
    """The "Follow the run" line `cluster/local.sh start` prints, from the script's own print
    function (no Ray head needed), with the repository root at tmp_path."""
    script = ROOT / "cluster" / "local.sh"
    program = (f'eval "$(sed -n "/^print_submit()/,/^}}/p" {shlex.quote(str(script))})"; '
               f"ROOT={shlex.quote(str(tmp_path))} ADDRESS=http://127.0.0.1:8265 RAY_AUTH_MODE=token print_submit")
    out = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30, check=True).stdout
    (line,) = [ln for ln in out.splitlines() if ln.startswith("Follow the run:")]
    return line.removeprefix("Follow the run:").strip()


@pytest.mark.slow  # an MLflow server starts 4 web workers and 7 job consumers: 20-70 s on 2 shared cores
@pytest.mark.parametrize("printed_by", [_hint_command, _local_sh_command], ids=["ui_hint", "local.sh"])
def test_printed_mlflow_ui_command_listens_on_loopback_only(printed_by, started, tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    command = printed_by(tmp_path)
    argv = shlex.split(command)
    assert argv[:2] == ["mlflow", "ui"], command
    port = _free_port()  # the printed port (or MLflow's default 5000) may be taken on this machine
    if "--port" in argv:
        argv[argv.index("--port") + 1] = str(port)
    else:
        argv += ["--port", str(port)]
    proc = started([str(BIN / "mlflow"), *argv[1:]], tmp_path)
    wait_until_healthy(f"http://127.0.0.1:{port}/health", proc, f"`{command}`")
    time.sleep(3)  # the job runner and its consumers start after the web server answers
    listening = _listening(proc.pid)
    assert ("127.0.0.1", port) in listening, listening
    wider = {s for s in listening if s[0] not in LOOPBACK}
    assert not wider, f"`{command}` listens beyond loopback: {sorted(wider)}"
    host = _host_ipv4()
    if host is not None:
        with pytest.raises(ConnectionRefusedError), socket.create_connection((host, port), timeout=5):
            pass


def _documented_commands() -> list[tuple[str, str, str]]:
    """(file, section, command) of every `mlflow ui` / `mlflow server` command in the docs,
    recipes and scripts (continuation lines and inline code over two lines joined)."""
    found = []
    for path in [ROOT / "README.md", ROOT / "cluster" / "README.md", ROOT / "cluster" / "local.sh",
                 *sorted((ROOT / "docs").glob("*.md"))]:
        section = ""
        text = path.read_text().replace("\\\n", " ").replace("```", "\n")
        text = re.sub(r"`[^`]+`", lambda span: span.group(0).replace("\n", " "), text)  # inline code over 2 lines
        for line in text.splitlines():
            if line.startswith("#"):
                section = line.lstrip("# ").strip()
            for match in re.finditer(r"mlflow (?:ui|server)\b[^`'\n]*", line):
                if "--" in match.group(0) and "..." not in match.group(0):  # a command to copy, not prose
                    found.append((path.relative_to(ROOT).as_posix(), section, match.group(0)))
    return found


def test_documented_mlflow_servers_bind_loopback_unless_shared_on_purpose() -> None:
    """A command a user copies binds 127.0.0.1; the one exception is the shared tracking server
    for a cluster, which binds a private address in its own section with the no-auth warning."""
    commands = _documented_commands()
    assert len(commands) >= 4, commands
    shared = []
    for file, section, command in commands:
        host = re.search(r"--host[= ](\S+)", command)
        if host and host.group(1) == "127.0.0.1":
            continue
        assert host is not None, f"{file}: `{command}` has no --host (state it: 127.0.0.1)"
        assert section == "A shared MLflow tracking server", f"{file} ({section}): `{command}` binds {host.group(1)}"
        assert re.fullmatch(r"10\.\d+\.\d+\.\d+|192\.168\.\d+\.\d+|172\.(1[6-9]|2\d|3[01])\.\d+\.\d+", host.group(1)), command
        shared.append(file)
    assert shared == ["cluster/README.md"], shared
    guide = (ROOT / "cluster" / "README.md").read_text()
    assert "never 0.0.0.0 on a public interface" in guide and "no\nauthentication" in guide
    # Kubernetes: 0.0.0.0 inside the pod, reachable only through a ClusterIP Service
    manifest = (ROOT / "cluster" / "k8s" / "mlflow.yaml").read_text()
    assert "--host=0.0.0.0" in manifest and "type: ClusterIP" in manifest and "No authentication" in manifest
