"""Training throughput per model family: step time and events/s of one worker.

    python tools/bench_train.py --config configs/pxd_gan_mini.yaml --config configs/calo_gan_mini.yaml \
        [--steps 10] [--warmup 2] [--threads 1] [--set train.batch_size=8]

Builds the config's data (simulating the store if the config says so), family and DeepSpeed
engines in a world of one (the same code path as `uhg train --local`), times `steps` training
steps after `warmup`, and prints one JSON line per config: median / mean step time (s),
events/s, process CPU seconds per step, torch threads, and the machine's load average (other
processes skew wall-clock figures on a shared machine; CPU time much less so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time


def bench(config: str, overrides: list[str], steps: int, warmup: int) -> dict:
    import torch

    from uhg.config import load_config
    from uhg.geometry import get_geometry
    from uhg.models.common import ConditionNorm
    from uhg.train.engine import build_engines, init_distributed, select_device
    from uhg.train.family import build_family
    from uhg.train.loop import prepare_data, seed_everything

    cfg = load_config(config, overrides)
    rank, world, local_rank = init_distributed()
    device = select_device(cfg.train.device, local_rank)
    data = prepare_data(cfg, rank, world)
    norm = ConditionNorm.from_ranges(data.condition_ranges(cfg.model.conditions), cfg.model.conditions)
    geometry = get_geometry(cfg.geometry)
    family = build_family(geometry, cfg.model, norm)
    seed_everything(cfg.seed)
    modules = family.build_modules()
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()}
    micro = cfg.batch_size_for(world)
    engines = build_engines(cfg, family, modules, micro, world, device)
    times, cpu_times = [], []
    for step in range(1, warmup + steps + 1):
        batch = data.dataset.make_batch(data.dataset.step_ids(step)).widen(geometry, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        family.train_step(engines, batch, step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step > warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    med = statistics.median(times)
    return {"config": config, "overrides": overrides, "family": family.name, "geometry": cfg.geometry,
            "batch_events": micro, "zero_stage": cfg.train.zero_stage, "precision": cfg.train.precision,
            "device": str(device), "parameters": n_params, "steps": steps,
            "step_s_median": round(med, 4), "step_s_mean": round(statistics.mean(times), 4),
            "events_per_s": round(micro / med, 2),
            "cpu_s_per_step_median": round(statistics.median(cpu_times), 4), "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {os.cpu_count()} cores", "load_avg_1m": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    for config in args.config:
        print(json.dumps(bench(config, args.overrides, args.steps, args.warmup)), flush=True)


if __name__ == "__main__":
    main()
