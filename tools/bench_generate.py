"""Generation speed of a generator export (or of a freshly initialised model of a config):
ms/event at several batch sizes, model forward + conversion to sparse hits (no store I/O).

    python tools/bench_generate.py --model runs/pxd_gan_mini/export --batch-sizes 1 16 64
    python tools/bench_generate.py --model runs/pxd_gan/export --batch-sizes 1 --condition luminosity=8e35 \
        --condition her_current=2.6 --condition ler_current=3.6 --condition beta_y_star=0.27
    python tools/bench_generate.py --config configs/pxd_gan.yaml --batch-sizes 1 4 --device cpu
    python tools/bench_generate.py --config configs/pxd_gan.yaml --set model.cluster_shapes=4096 --set model.charge_noise=true
    python tools/bench_generate.py --config configs/calo_gan_mini.yaml --batch-sizes 1 100 10000
    python tools/bench_generate.py --config configs/pxd_gan.yaml --batch-sizes 64 --device cuda --precision bf16 --compile

With --config the weights are freshly initialised (the cost of a forward pass does not depend
on training; the number of hits does, through the gate's initial 1% occupancy). Each
measurement generates max(batch, --min-events) events after one warm-up batch; prints one
JSON line per batch size, with the SHA-256 of the generated events (seed 1; equal digests
before and after a change: the same events, bit for bit) and the CPU and wall time of each stage
of generation that the model marks (`uhg.models.stages`; GAN: noise, decoder, seeds, clusters,
hits and charges). `cpu_ms_per_event` is the process CPU time: on a loaded shared
machine it is closer than wall time to what one dedicated core would take (with --threads 1).
Like a generation worker, the process keeps freed memory for the next batch
(`uhg.generate.memory`; --release-freed-memory leaves glibc's defaults, to compare).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path


def export_from_config(config: str, out: Path, overrides: list[str] | None = None) -> Path:
    import torch

    from uhg.config import load_config
    from uhg.geometry import get_geometry
    from uhg.models.common import ConditionNorm
    from uhg.train.export import export_generator
    from uhg.train.family import build_family

    cfg = load_config(config, overrides or [])
    geometry = get_geometry(cfg.geometry)
    ranges = {"luminosity": (1e34, 4e34), "her_current": (1.0, 2.0), "ler_current": (1.0, 2.0),
              "beta_y_star": (0.2, 0.4), "incident_energy": (1e3, 1e5)}
    family = build_family(geometry, cfg.model, ConditionNorm.from_ranges(ranges, cfg.model.conditions))
    torch.manual_seed(0)
    module = family.build_modules()[family.generator_name]
    return export_generator(out, family, cfg, module.state_dict(), step=0)


def hits_sha256(hits) -> str:
    """SHA-256 of a HitBatch's columns (by name), offsets and conditions: equal digests, equal events."""
    import numpy as np

    h = hashlib.sha256()
    for name, group in (("columns", hits.columns), ("conditions", hits.conditions)):
        for k in sorted(group):
            h.update(f"{name}.{k}".encode())
            h.update(np.ascontiguousarray(group[k]).tobytes())
    h.update(np.ascontiguousarray(hits.offsets).tobytes())
    return h.hexdigest()


def _condition(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--condition {text!r}: expected NAME=VALUE")
    return name.strip(), float(value)


def _model_overrides(items: list[str]) -> dict[str, object]:
    import yaml

    out = {}
    for text in items:
        key, sep, value = text.partition("=")
        if not sep or not key.startswith("model."):
            raise SystemExit(f"--set {text!r}: with --model, expected model.KEY=VALUE")
        out[key.removeprefix("model.")] = yaml.safe_load(value)
    return out


def main() -> None:
    import numpy as np
    import torch

    from uhg.models.generator import Generator
    from uhg.models.stages import recording

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="generator export directory")
    src.add_argument("--config", help="run config: benchmark its model with fresh weights")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="with --config: override a config key (e.g. model.cluster_shapes=4096); with --model: a "
                         "model key of the export (e.g. model.sample_precision=bf16); repeatable")
    ap.add_argument("--condition", action="append", default=[], metavar="NAME=VALUE",
                    help="event condition (default luminosity=2e34, her_current=1.5, ler_current=1.5, beta_y_star=0.3); "
                         "a trained export is timed at its own conditions, where its hit count is realistic")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--min-events", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: generate under autocast")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the generator module (GAN: its sampling pass; the warm-up compiles)")
    ap.add_argument("--release-freed-memory", action="store_true",
                    help="leave glibc's defaults: freed maps go back to the OS (generation workers keep them, "
                         "uhg.generate.memory)")
    args = ap.parse_args()
    if not args.release_freed_memory:
        from uhg.generate.memory import keep_freed_memory

        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else export_from_config(args.config, Path(tmp) / "export", args.set)
        gen = Generator.load(path, device=args.device, model_overrides=_model_overrides(args.set) if args.model else None)
        if args.compile and hasattr(gen.module, "sample_maps"):  # the GAN samples through it, not forward
            gen.module.sample_maps = torch.compile(gen.module.sample_maps)
        elif args.compile:
            gen.module = torch.compile(gen.module)
        device_type = torch.device(args.device).type
        autocast = (torch.autocast(device_type, dtype=torch.bfloat16) if args.precision == "bf16"
                    else contextlib.nullcontext())
        for bs in args.batch_sizes:
            n = max(bs, args.min_events)
            values = {"luminosity": 2e34, "her_current": 1.5, "ler_current": 1.5, "beta_y_star": 0.3,
                      "incident_energy": 1e4} | dict(_condition(c) for c in args.condition)
            conds = {k: np.full(n, values[k]) for k in gen.condition_names}
            with autocast:
                gen.generate({k: v[: min(bs, 64)] for k, v in conds.items()}, seed=0, batch_size=bs)  # warm-up
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0, c0 = time.perf_counter(), time.process_time()
            with autocast, recording() as stages:
                hits = gen.generate(conds, seed=1, batch_size=bs)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            print(json.dumps({"model": str(args.model or args.config), "overrides": args.set, "geometry": gen.geometry.name,
                              "channels_per_event": int(gen.geometry.n_channels), "batch": bs, "events": n,
                              "ms_per_event": round(1000 * dt / n, 3),
                              "cpu_ms_per_event": round(1000 * cpu / n, 3),
                              "system_cpu_ms_per_event": round(1000 * (r1.ru_stime - r0.ru_stime) / n, 3),
                              "page_faults_per_event": round((r1.ru_minflt - r0.ru_minflt) / n),
                              "events_per_s": round(n / dt, 2),
                              "stage_cpu_ms_per_event": {k: round(1000 * v["cpu_s"] / n, 1) for k, v in stages.items()},
                              "stage_wall_ms_per_event": {k: round(1000 * v["wall_s"] / n, 1) for k, v in stages.items()},
                              "hits_per_event": float(hits.hits_per_event.mean()), "sha256": hits_sha256(hits),
                              "device": args.device,
                              "precision": args.precision, "compiled": args.compile,
                              "freed_memory_kept": not args.release_freed_memory,
                              "torch_threads": torch.get_num_threads(),
                              "machine": f"{platform.machine()} {os.cpu_count()} cores",
                              "load_avg_1m": os.getloadavg()[0]}), flush=True)


if __name__ == "__main__":
    main()
