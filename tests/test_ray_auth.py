"""Every Ray head uhg starts refuses clients without the authentication token, on every port
that listens beyond loopback (checked at run time, not in the source).

Ray 2.60 binds its GCS, raylet, object manager, dashboard agent, runtime-env agent and client
server to all interfaces or to the host address, with no option for loopback, so token
authentication is the only guard. Two heads are checked: `cluster/local.sh start` and the
private local Ray that `uhg train` / `uhg generate --distributed` start (`init_ray`). Each
listening socket of the head's processes is probed without the token: HTTP ports must answer
401/403, gRPC ports UNAUTHENTICATED to every read-only method they serve. The Prometheus
metrics endpoints are the exception (read-only text, no code runs; Ray serves them without
auth and cannot bind them to loopback): the test asserts they are nothing else.
"""

from __future__ import annotations

import http.client
import importlib
import os
import pkgutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_nodes import free_ports

# Each Ray start takes 20-60 s on the shared 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _head_processes(marker: str, roots: list[int] = ()) -> list:
    """The processes of one Ray head: those whose command line or open files name its temp
    dir (every Ray process logs there), the given root PIDs, and all their children."""
    import psutil

    found = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid in roots or marker in " ".join(proc.info["cmdline"] or []) or any(
                    marker in f.path for f in proc.open_files()):
                found[proc.pid] = proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in list(found.values()):
        try:
            found.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _listening(processes: list) -> dict[tuple[str, int], str]:
    """{(address, port): process name} of every listening TCP socket of `processes`."""
    import psutil

    out = {}
    for proc in processes:
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    out[(conn.laddr.ip, conn.laddr.port)] = proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _kill(processes: list) -> None:
    import psutil

    for proc in processes:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _host_address(bound: str) -> str:
    """Where a client on another machine would connect: the host's first non-loopback IPv4
    address for wildcard binds (a dual-stack "::" socket accepts IPv4 too)."""
    import psutil

    if bound not in ("0.0.0.0", "::"):
        return bound
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    pytest.skip("this machine has no non-loopback IPv4 address to probe from")


def _http(address: str, port: int, path: str = "/", token: str | None = None) -> tuple[int, bytes] | None:
    """(status, body) of an HTTP GET, or None when the port does not speak HTTP/1."""
    host = f"[{address}]" if ":" in address else address
    request = urllib.request.Request(f"http://{host}:{port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, reply.read(4096)
    except urllib.error.HTTPError as err:
        return err.code, err.read(4096)
    except (OSError, ValueError, http.client.HTTPException):  # not HTTP/1 (gRPC speaks HTTP/2 only)
        return None


def _read_only_methods() -> list[str]:
    """Every unary read-only (Get/List/Check/Num...) method of Ray's gRPC services, and the
    object manager's Pull (its only service has no read-only method; refused before it runs)."""
    import ray.core.generated as generated

    methods = ["/ray.rpc.ObjectManagerService/Pull"]
    for module in pkgutil.iter_modules(generated.__path__):
        if not module.name.endswith("_pb2"):
            continue
        try:
            proto = importlib.import_module(f"ray.core.generated.{module.name}")
        except Exception:  # noqa: BLE001 - a generated module needing an optional dependency
            continue
        for service in proto.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                if (method.name.startswith(("Get", "List", "Check", "Num")) and not method.client_streaming
                        and not method.server_streaming):
                    methods.append(f"/{service.full_name}/{method.name}")
    return methods


def _is_metrics_only(address: str, port: int, body: bytes) -> bool:
    """A Prometheus exporter: metrics text at every path, the job API and the rest absent."""
    if not (body.startswith(b"# HELP ") and b"# TYPE " in body):
        return False
    for path in ("/api/jobs/", "/api/version", "/nodes?view=summary", "/api/actors"):
        reply = _http(address, port, path)
        if reply is None or reply[0] != 200 or not reply[1].startswith(b"# HELP "):
            return False
    return True


def _grpc_outcomes(address: str, port: int, token: str | None = None) -> dict[str, str]:
    """{method: status name} of every read-only method this port serves (UNIMPLEMENTED left out)."""
    import grpc

    host = f"[{address}]" if ":" in address else address
    metadata = [("authorization", f"Bearer {token}")] if token else None
    outcomes = {}
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        for name in _read_only_methods():
            call = channel.unary_unary(name)
            try:
                call(b"", timeout=5, metadata=metadata)
                outcomes[name] = "OK"
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    return {"<connect>": f"UNAVAILABLE: {err.details()}"}
                if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                    outcomes[name] = err.code().name
    return outcomes


def _check_every_exposed_port(listening: dict[tuple[str, int], str], token: str) -> dict[str, list]:
    """Probe every socket bound beyond loopback without the token. Returns what was found;
    asserts each one refuses (or is a read-only metrics endpoint)."""
    refused_http, refused_grpc, metrics, problems = [], [], [], []
    for (bound, port), name in sorted(listening.items()):
        if bound in LOOPBACK:
            continue
        address = _host_address(bound)
        label = f"{name} on {bound}:{port}"
        reply = _http(address, port, "/")
        if reply is not None:
            status, body = reply
            if status in (401, 403):
                refused_http.append(label)
            elif status == 200 and _is_metrics_only(address, port, body):
                metrics.append(label)
            else:
                problems.append(f"{label}: HTTP {status} without the token: {body[:120]!r}")
            continue
        outcomes = _grpc_outcomes(address, port)
        if "OK" in outcomes.values() or "UNAUTHENTICATED" not in outcomes.values():
            problems.append(f"{label}: gRPC without the token: {outcomes}")
        else:
            refused_grpc.append(label)
    assert not problems, "ports answer a client without the token:\n" + "\n".join(problems)
    assert refused_grpc, "no gRPC port was probed"
    return {"http": refused_http, "grpc": refused_grpc, "metrics": metrics}


def _positive_control(gcs: tuple[str, int], token: str) -> None:
    """The probe is able to see an open port: with the token the GCS answers."""
    outcomes = _grpc_outcomes(_host_address(gcs[0]), gcs[1], token=token)
    assert "OK" in outcomes.values() and "UNAUTHENTICATED" not in outcomes.values(), outcomes


def _wait_for(listening_of, wanted: set[int], what: str, timeout: float = 120) -> dict[tuple[str, int], str]:
    deadline = time.monotonic() + timeout
    while True:
        listening = listening_of()
        if wanted <= {port for _, port in listening}:
            time.sleep(2)  # let late starters (agents, prestarted workers) open theirs too
            return listening_of()
        assert time.monotonic() < deadline, f"{what}: ports {sorted(wanted)} not all listening: {listening}"
        time.sleep(1)


@pytest.fixture
def local_head(tmp_path: Path) -> Iterator[dict]:
    """`cluster/local.sh start` with RAY_AUTH_MODE unset (the default) and its own ports."""
    temp_dir = tempfile.mkdtemp(prefix="uhg-auth-", dir="/tmp")  # short: Ray's socket paths are length-limited
    gcs, dashboard, client, agent, metrics = free_ports(5)
    token_file = tmp_path / "ray" / "auth_token"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "UHG_RAY_PORT": str(gcs),
           "UHG_RAY_DASHBOARD_PORT": str(dashboard), "UHG_RAY_TEMP_DIR": temp_dir, "UHG_RAY_CPUS": "1",
           "UHG_RAY_GPUS": "0", "RAY_AUTH_TOKEN_PATH": str(token_file), "DASHBOARD_METRIC_PORT": str(metrics)}
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS"):
        env.pop(name, None)
    done = subprocess.run(["bash", str(ROOT / "cluster" / "local.sh"), "start", f"--ray-client-server-port={client}",
                           f"--dashboard-agent-listen-port={agent}"], env=env, capture_output=True, text=True,
                          timeout=300)
    try:
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        yield {"env": env, "out": done.stdout, "token_file": token_file, "temp_dir": temp_dir, "gcs": gcs,
               "dashboard": dashboard, "client": client, "agent": agent}
    finally:
        _kill(_head_processes(temp_dir))  # by PID: `ray stop` would end every Ray of this user
        subprocess.run(["rm", "-rf", temp_dir], check=False)


def test_local_head_refuses_clients_without_the_token(local_head: dict) -> None:
    token_file: Path = local_head["token_file"]
    assert "auth mode token" in local_head["out"]
    assert token_file.is_file() and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) == 64

    listening = _wait_for(lambda: _listening(_head_processes(local_head["temp_dir"])),
                          {local_head["gcs"], local_head["client"], local_head["agent"], local_head["dashboard"]},
                          "cluster/local.sh head")
    assert ("127.0.0.1", local_head["dashboard"]) in listening
    found = _check_every_exposed_port(listening, token)
    gcs = next(key for key in listening if key[1] == local_head["gcs"])
    _positive_control(gcs, token)
    # the job API on loopback: refused without the token, served with it
    assert _http("127.0.0.1", local_head["dashboard"], "/api/jobs/")[0] in (401, 403)
    assert _http("127.0.0.1", local_head["dashboard"], "/api/jobs/", token=token)[0] == 200

    # a driver without the token cannot join; with it (read from RAY_AUTH_TOKEN_PATH) it can
    join = "import ray; ray.init(address='127.0.0.1:{}'); print('joined', ray.cluster_resources()['CPU'])"
    # A refused driver retries its GCS connection once a second, 20 times by default, as for a GCS
    # still starting; this GCS is up (the control above), so two tries show the refusal.
    env = {k: v for k, v in local_head["env"].items() if k != "RAY_AUTH_TOKEN_PATH"} | {
        "RAY_gcs_server_port_wait_time_s": "2"}
    refused = subprocess.run([sys.executable, "-c", join.format(local_head["gcs"])], env={**env, "RAY_AUTH_MODE": "disabled"},
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "joined" not in refused.stdout
    assert "authentication" in (refused.stdout + refused.stderr).lower()
    wrong = subprocess.run([sys.executable, "-c", join.format(local_head["gcs"])],
                           env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode != 0 and "joined" not in wrong.stdout
    # (a client given an address uses the token only in token mode, as the start message says)
    joined = subprocess.run([sys.executable, "-c", join.format(local_head["gcs"])],
                            env={**local_head["env"], "RAY_AUTH_MODE": "token"},
                            capture_output=True, text=True, timeout=120)
    assert joined.returncode == 0 and "joined 1.0" in joined.stdout, (joined.stdout + joined.stderr)[-3000:]
    print(f"\n[auth] local.sh head: refused without token: gRPC {found['grpc']}; HTTP {found['http']}; "
          f"read-only metrics without token: {found['metrics']}")


PRIVATE_RAY = """
import sys, time
from uhg.generate.ray_pool import RayOptions, init_ray
import ray
init_ray(RayOptions(workers=1))
print("session", ray.get_runtime_context().gcs_address, flush=True)
time.sleep(600)
"""


def test_private_local_ray_of_uhg_refuses_clients_without_the_token(tmp_path: Path) -> None:
    """The Ray that `uhg train` / `uhg generate --distributed` start without a cluster (no
    dashboard): token auth by default, the token generated into ~/.ray/auth_token."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(ROOT)}
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        env.pop(name, None)
    driver = subprocess.Popen([sys.executable, "-c", PRIVATE_RAY], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        line = ""
        deadline = time.monotonic() + 180
        while not line.startswith("session"):
            line = driver.stdout.readline()
            assert line or driver.poll() is None, "the driver ended before Ray came up"
            assert time.monotonic() < deadline, "private Ray did not come up in 180 s"
        gcs_port = int(line.split()[1].rsplit(":", 1)[1])
        token = (home / ".ray" / "auth_token").read_text().strip()
        listening = _wait_for(lambda: _listening(_head_processes("\0", roots=[driver.pid])), {gcs_port},
                              "private Ray")
        found = _check_every_exposed_port(listening, token)
        gcs = next(key for key in listening if key[1] == gcs_port)
        _positive_control(gcs, token)
        print(f"\n[auth] private Ray: refused without token: gRPC {found['grpc']}; HTTP {found['http']}; "
              f"read-only metrics without token: {found['metrics']}")
    finally:
        _kill(_head_processes("\0", roots=[driver.pid]))
        driver.wait(timeout=60)
