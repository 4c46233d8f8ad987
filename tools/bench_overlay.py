"""Benchmark full-resolution PXD overlays on Ray: events/s, ms/event, scaling 1 -> K workers.

    .venv/bin/python tools/bench_overlay.py [--events 4] [--workers 1,2] [--model EXPORT]
        [--config configs/pxd_gan.yaml] [--batch-size 1] [--work-dir /tmp/uhg-bench-overlay]
        [--gpus-per-worker 0]

Each worker count runs the same overlay (signal store + generated background at
L = 2e34 cm^-2 s^-1, one event per part) on one local Ray started once with as many CPUs as
the largest worker count; every actor holds one generator and one CPU (torch intra-op threads =
1). Reported per run: actor start-up (model load), steady-state events/s after start-up, and the
per-event wall and CPU time of each stage inside a worker (generator forward + sparsification,
merge, store write). The scaling ratio compares steady-state events/s of K workers with 1 worker in the same
invocation.

Without --model the generator is a freshly initialised (UNTRAINED) GAN built from the model
section and geometry of --config (default configs/pxd_gan.yaml, the full-resolution PXD GAN): the timing is that of its forward pass,
sparsification, merge and write, not of a trained model's output (an untrained gate fires
~1% of pixels, about the real PXD occupancy, so hit counts are realistic in size).
The signal store holds simulated IP tracks (`uhg.sim.simulate_pxd_signal`, 2-10 tracks).
"worker CPU s/event" is the actor's process CPU time per event: on a shared, oversubscribed
machine it is the figure that says what one core costs, while wall-clock rates and the scaling
ratio depend on what else runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path


def export_untrained_gan(out: Path, config: Path, seed: int = 0) -> Path:
    """The config's GAN, conditioned on luminosity, freshly initialised, in the export format."""
    import torch

    from uhg.config.loading import load_config
    from uhg.geometry import get_geometry
    from uhg.models.common import ConditionNorm
    from uhg.train.export import export_generator
    from uhg.train.family import build_family

    cfg = load_config(config, [f"seed={seed}"])
    family = build_family(get_geometry(cfg.geometry), cfg.model,
                          ConditionNorm.from_ranges({"luminosity": (1e34, 3e34)}, ["luminosity"]))
    torch.manual_seed(seed)
    generator = family.build_modules()[family.generator_name]
    return export_generator(out, family, cfg, generator.state_dict(), step=0)


def _signal_events(geometry_name: str, start: int, stop: int):
    from uhg.geometry import get_geometry
    from uhg.sim import simulate_pxd_signal

    return simulate_pxd_signal(get_geometry(geometry_name), stop - start, seed=0, first_event=start)


def make_signal(path: Path, geometry: str, n_events: int) -> Path:
    from uhg.data.parallel import fill_store
    from uhg.data.writer import create_store

    create_store(path, "pixel", geometry, n_events, 1, overwrite=True,
                 conditions={"n_tracks": {"min": 0, "max": 100, "unit": "tracks"}})
    fill_store(path, functools.partial(_signal_events, geometry), progress=False)
    return path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=4, help="overlay events per run")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--config", type=Path, default=Path("configs/pxd_gan.yaml"),
                        help="GAN config whose model and geometry the untrained generator uses (without --model)")
    parser.add_argument("--model", default=None, help="generator export (default: untrained default-config GAN)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--luminosity", type=float, default=2e34)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/uhg-bench-overlay"))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from uhg.generate.overlay import run_overlay
    from uhg.generate.ray_pool import RayOptions

    workers = [int(w) for w in args.workers.split(",")]
    load_at_start = os.getloadavg()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    from uhg.config.loading import load_config

    geometry = load_config(args.config).geometry
    model = Path(args.model) if args.model else export_untrained_gan(work / f"untrained-gan-{args.config.stem}", args.config)
    signal = make_signal(work / "signal", geometry, args.events)
    print(f"inputs ready in {time.perf_counter() - t0:.1f} s: model {model}, signal {signal}", flush=True)

    gpus = args.gpus_per_worker * max(workers)
    ray.init(address="local", num_cpus=max(workers), num_gpus=gpus or None, include_dashboard=False,
             log_to_driver=False)
    runs = []
    try:
        for k in workers:
            out = work / f"overlay-{k}"
            shutil.rmtree(out, ignore_errors=True)
            report = run_overlay(signal, out, ray_options=RayOptions(workers=k, gpus_per_worker=args.gpus_per_worker),
                                 model=str(model), conditions={"luminosity": args.luminosity}, part_size=1,
                                 batch_size=args.batch_size)
            stages: dict[str, float] = {}
            for r in report.parts:
                for name, s in r.seconds.items():
                    stages[name] = stages.get(name, 0.0) + s
            n = report.n_events
            cpu_s = stages.pop("cpu")
            cpu_stages = {name[4:]: stages.pop(name) for name in list(stages) if name.startswith("cpu_")}
            runs.append({
                "workers": k, "events": n, "startup_s": round(report.startup_s, 2), "wall_s": round(report.wall_s, 2),
                "events_per_s": report.events_per_s, "wall_ms_per_event": 1000 / report.events_per_s,
                "worker_ms_per_event": {name: 1000 * s / n for name, s in stages.items()},
                "worker_cpu_s_per_event": cpu_s / n,
                "worker_cpu_ms_per_event": {name: 1000 * s / n for name, s in cpu_stages.items()},
                "worker_s_per_event_total": sum(stages.values()) / n,
                "hits_per_event": sum(r.n_hits for r in report.parts) / n,
            })
    finally:
        ray.shutdown()
    base = runs[0]["events_per_s"]
    for run in runs:
        run["scaling_vs_first"] = run["events_per_s"] / base
    result = {
        "geometry": geometry, "model": str(model), "untrained_gan_from_config": None if args.model else str(args.config),
        "luminosity": args.luminosity, "batch_size": args.batch_size, "cpu": cpu_model(), "cores": os.cpu_count(),
        "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(), "python": sys.version.split()[0], "runs": runs,
    }
    print(json.dumps(result, indent=1))
    print("\n| workers | events | start-up s | events/s | ms/event (wall) | worker wall s/event: generate / merge / write "
          "| worker CPU s/event: generate / merge / write | worker CPU s/event | scaling |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        st, cs = r["worker_ms_per_event"], r["worker_cpu_ms_per_event"]
        print(f"| {r['workers']} | {r['events']} | {r['startup_s']:.1f} | {r['events_per_s']:.3f} | "
              f"{r['wall_ms_per_event']:.0f} | {st['background'] / 1000:.2f} / {st['merge'] / 1000:.3f} / "
              f"{st['write'] / 1000:.3f} | {cs['background'] / 1000:.2f} / {cs['merge'] / 1000:.3f} / "
              f"{cs['write'] / 1000:.3f} | {r['worker_cpu_s_per_event']:.2f} | {r['scaling_vs_first']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
