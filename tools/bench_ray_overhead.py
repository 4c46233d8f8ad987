#!/usr/bin/env python
"""Ray orchestration overhead: step time of the same training loop under Ray Train vs torchrun.

Both launchers run the same config with the same number of workers, one after the other in
this one invocation, logging every step to a private sqlite MLflow store. The per-step wall
throughput the loop logs (`events_per_s`: events of one step over all ranks / wall time since
the previous step, so data loading, the step and logging are included) is read back; the first
`--warmup` steps (process-group set-up, JIT, caches) are dropped and the medians compared:

    overhead = median step time under Ray / median step time under torchrun - 1

Start-up costs (Ray cluster and worker-group start, torchrun rendezvous) are reported
separately as total wall times; they do not scale with the number of steps.

    python tools/bench_ray_overhead.py --config configs/pxd_gan_mini.yaml --workers 2 --steps 60
    python tools/bench_ray_overhead.py ... --append-doc docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _overrides(args: argparse.Namespace, out: Path, name: str) -> list[str]:
    sets = {
        "name": name,
        "train.steps": args.steps,
        "train.log_every": 1,
        "train.checkpoint_every": 0,
        "train.validate_every": 0,
        "distributed.workers": args.workers,
        "tracking.tracking_uri": f"sqlite:///{out}/mlflow.db",
        "tracking.experiment": "bench-ray-overhead",
        "tracking.registered_model_name": "null",
        "output_dir": str(out / name),
    }
    if args.data_store:
        sets["data.store"] = args.data_store
    sets.update(dict(item.split("=", 1) for item in args.overrides))
    return [item for key, value in sets.items() for item in ("--set", f"{key}={value}")]


def _run(cmd: list[str], env: dict[str, str], log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("w") as fh:
        done = subprocess.run(cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"{' '.join(cmd)} failed (exit {done.returncode}); log {log}:\n{tail}")
    return wall


def _run_together(jobs: list[tuple[list[str], Path]], env: dict[str, str]) -> list[float]:
    t0 = time.perf_counter()
    running = []
    for cmd, log in jobs:
        fh = log.open("w")
        running.append((cmd, log, fh, subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)))
    walls = []
    for cmd, log, fh, proc in running:
        code = proc.wait()
        walls.append(time.perf_counter() - t0)
        fh.close()
        if code != 0:
            raise SystemExit(f"{' '.join(cmd)} failed (exit {code}); log {log}:\n{log.read_text()[-4000:]}")
    return walls


def _ensure_store(args: argparse.Namespace, env: dict[str, str], out: Path) -> None:
    """Simulate the config's store first (one rank, tracking off) so that neither timed run does."""
    cmd = [str(BIN / "uhg"), "train", "--local", "--no-tracking", "--config", args.config,
           "--set", "train.steps=1", "--set", "distributed.workers=1", "--set", f"output_dir={out}/warmup"]
    if args.data_store:
        cmd += ["--set", f"data.store={args.data_store}"]
    cmd += [item for kv in args.overrides for item in ("--set", kv)]
    _run(cmd, env, out / "warmup.log")


def _step_times(store: Path, run_name: str, warmup: int) -> tuple[list[float], list[float]]:
    """(wall seconds per step, compute seconds per step) of rank 0 after the warm-up steps."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    exp = client.get_experiment_by_name("bench-ray-overhead")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`uhg.run_name` = '{run_name}'")
    if len(runs) != 1:
        raise SystemExit(f"expected one MLflow run named {run_name}, found {len(runs)}")
    run = runs[0]
    params = run.data.params
    events_per_step = int(params["train.batch_size"]) * int(params["world_size"])

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    eps, compute = history("events_per_s"), history("step_time_s")
    steps = sorted(s for s in eps if s > warmup)
    return [events_per_step / eps[s] for s in steps], [compute[s] for s in steps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pxd_gan_mini.yaml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="steps dropped from the start of each run")
    parser.add_argument("--data-store", default=None, help="override data.store (default: the config's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="further config override for both runs, e.g. --set train.device=cuda (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_ray_overhead")
    parser.add_argument("--append-doc", type=Path, default=None, help="append the result table to this markdown file")
    parser.add_argument("--concurrent", action="store_true",
                        help="run both launchers at the same time (after simulating the store), so that on a "
                             "shared, loaded machine both see the same background load; they also compete "
                             "with each other symmetrically")
    args = parser.parse_args()
    if args.steps <= args.warmup + 5:
        raise SystemExit("--steps must exceed --warmup by more than 5")

    out = args.out.resolve() / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out.mkdir(parents=True)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)  # a private local Ray, not somebody's cluster
    # Ray's OOM monitor kills workers when the *node* passes 95% memory, whoever uses it;
    # torchrun has no such monitor, so on a shared machine it would only end the Ray run.
    env.setdefault("RAY_memory_monitor_refresh_ms", "0")
    if not shutil.which("nvidia-smi"):
        env.setdefault("DS_ACCELERATOR", "cpu")

    # torchrun first: it also simulates the data store if the config says so, outside the timing.
    torchrun_cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={args.workers}", "-m", "uhg",
                    "train", "--config", args.config, *_overrides(args, out, "bench-torchrun")]
    ray_cmd = [str(BIN / "uhg"), "train", "--config", args.config, "--run-name", "bench-ray",
               "--set", f"distributed.storage_path={out}/ray", *_overrides(args, out, "bench-ray")]
    if args.concurrent:
        _ensure_store(args, env, out)
        wall_torchrun, wall_ray = _run_together([(torchrun_cmd, out / "torchrun.log"), (ray_cmd, out / "ray.log")], env)
    else:
        wall_torchrun = _run(torchrun_cmd, env, out / "torchrun.log")
        wall_ray = _run(ray_cmd, env, out / "ray.log")

    store = out / "mlflow.db"
    torchrun_wall, torchrun_compute = _step_times(store, "bench-torchrun", args.warmup)
    ray_wall, ray_compute = _step_times(store, "bench-ray", args.warmup)
    med = statistics.median
    overhead = med(ray_wall) / med(torchrun_wall) - 1
    result = {
        "config": args.config, "workers": args.workers, "steps": args.steps, "warmup": args.warmup,
        "torchrun_step_s": med(torchrun_wall), "ray_step_s": med(ray_wall),
        "torchrun_compute_s": med(torchrun_compute), "ray_compute_s": med(ray_compute),
        "overhead": overhead, "torchrun_total_s": wall_torchrun, "ray_total_s": wall_ray,
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
        "concurrent": args.concurrent, "load_average_after": os.getloadavg(),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    command = f"python tools/bench_ray_overhead.py --config {args.config} --workers {args.workers} " \
              f"--steps {args.steps} --warmup {args.warmup}" + (" --concurrent" if args.concurrent else "")
    table = (
        f"| launcher | median step wall (s) | median step compute (s) | whole command (s) |\n"
        f"|---|---|---|---|\n"
        f"| torchrun | {med(torchrun_wall):.4f} | {med(torchrun_compute):.4f} | {wall_torchrun:.1f} |\n"
        f"| Ray Train | {med(ray_wall):.4f} | {med(ray_compute):.4f} | {wall_ray:.1f} |\n\n"
        f"Ray step-time overhead: **{overhead * 100:+.1f}%** (target <= +10%), "
        f"{len(ray_wall)} / {len(torchrun_wall)} steps after {args.warmup} warm-up steps.\n"
    )
    print(table)
    print(f"details: {out}/result.json")
    print(json.dumps(result))
    if args.append_doc is not None:
        with args.append_doc.open("a") as fh:
            fh.write(f"\n### {args.config}, {args.workers} workers ({time.strftime('%Y-%m-%d', time.gmtime())})\n\n"
                     f"Machine: {result['machine']}. Command: `{command}`\n\n{table}")


if __name__ == "__main__":
    main()
