"""Benchmark of the hit transformer: training step time, events/s, model FLOPs and generation.

    python tools/bench_transformer.py --config configs/pxd_transformer_mini.yaml
    python tools/bench_transformer.py --config configs/pxd_transformer.yaml --device cuda \
        --precision bf16 --peak-tflops 989   # H100 SXM dense bf16 peak, for MFU
    python tools/bench_transformer.py --config configs/pxd_transformer.yaml --threads 1 --steps 0 \
        --fit-events 32 --gen-events 4      # full-PXD generation per core, realistic hit count

Events come from the reference simulator at the config's training luminosity range (or
incident energy range), held in memory. The training step is the family's own
(`TransformerFamily.train_step`) on a plain torch engine (AdamW, no DeepSpeed), so the figure
is the model's cost; model FLOPs count matmuls of blocks, heads and attention
(`HitTransformer.flops_per_token`, 2 FLOPs per multiply-add, training = 3 x forward).
With --fit-events N the family's data-driven start (count and response laws, cluster shape
vocabulary) is fitted to N further simulated events first, so an untrained model generates
the realistic number of hits (or clusters) per sensor; --steps 0 skips the training figures.
Wall and process CPU times are both reported: on a shared machine the CPU time of a
one-thread run (--threads 1) is the stable per-core figure. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import numpy as np
import torch


def simulate(cfg, n_events: int, seed: int = 1):
    from uhg.geometry import get_geometry

    g = get_geometry(cfg.geometry)
    sim = cfg.data.simulate
    if g.kind == "pixel":
        from uhg.sim.pxd_background import simulate_pxd_background

        lo = sim.luminosity_min if sim and sim.luminosity_min else 8e35
        hi = sim.luminosity_max if sim and sim.luminosity_max else lo
        return g, simulate_pxd_background(g, n_events, seed, luminosity=lo, luminosity_max=hi)
    from uhg.sim.calo import simulate_calo_showers

    lo = sim.energy_min if sim and sim.energy_min else 1000.0
    hi = sim.energy_max if sim and sim.energy_max else 100_000.0
    return g, simulate_calo_showers(g, n_events, seed, energy_min=lo, energy_max=hi)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/pxd_transformer_mini.yaml")
    ap.add_argument("--set", action="append", default=[], help="config override key=value")
    ap.add_argument("--batch-size", type=int, default=None, help="training events per step (default: the config's)")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps (after 2 warm-up steps); 0: none")
    ap.add_argument("--fit-events", type=int, default=0,
                    help="simulated events the laws and the shape vocabulary are fitted to first (0: none)")
    ap.add_argument("--gen-events", type=int, nargs="*", default=[1, 16], help="generation batch sizes (events)")
    ap.add_argument("--warmup-events", type=int, default=None,
                    help="events of the untimed generation pass before each timed one (default: the timed batch size)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (e.g. 989 for H100 bf16)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    from uhg.config import load_config
    from uhg.models.common import ConditionNorm
    from uhg.models.transformer import count_parameters, mean_attended, padded_tokens
    from uhg.seeding import event_seed
    from uhg.sparse.torch_hits import TorchHits
    from uhg.train.engine import PlainEngine
    from uhg.train.transformer_family import TransformerFamily

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set)
    batch = args.batch_size or cfg.train.batch_size
    n_gen = max(args.gen_events or [1])
    t0 = time.perf_counter()
    geometry, events = simulate(cfg, batch * 3 + n_gen + args.fit_events)
    sim_s = time.perf_counter() - t0
    names = cfg.model.conditions
    ranges = {n: (float(events.conditions[n].min()), float(events.conditions[n].max())) for n in names}
    family = TransformerFamily(geometry, cfg.model, ConditionNorm.from_ranges(ranges, names))
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = family.build_modules()["model"]
    fitted = {}
    if args.fit_events:
        fit = events.slice(len(events) - args.fit_events, len(events))
        fitted = family.initialise_from_data({"model": model}, [fit])
    model = model.to(dev)
    engine = PlainEngine(model, family.build_optimizer("model", model, cfg.train), cfg.train.gradient_clipping)
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    batches = [TorchHits.from_batch(events.slice(i * batch, (i + 1) * batch)).to(dev) for i in range(3)]
    times, cpu, flops, tokens, hits = [], [], [], [], []
    for step in range(args.steps + 2 if args.steps else 0):
        b = batches[step % 3]
        sync()
        t, c = time.perf_counter(), time.process_time()
        with autocast:
            family.train_step({"model": engine}, b, step + 1)
        sync()
        if step >= 2:
            tok = model.tokenize(b)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            n_hits = int(b.columns["value"].numel())
            per_token = n_hits / max(int(tok.lengths.sum()), 1) if model.clusters else 1.0
            flops.append(model.flops_per_token(mean_attended(tok.lengths, model.config.attention_window), pixels_per_token=per_token) * tok.n_tokens)
            tokens.append(tok.n_tokens)
            hits.append(n_hits)
    tok0 = model.tokenize(batches[0])
    out = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads" if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "command": "python tools/bench_transformer.py " + " ".join(f"{k}={v}" for k, v in vars(args).items()),
        "config": args.config, "geometry": cfg.geometry, "parameters": count_parameters(model),
        "precision": args.precision, "token": cfg.model.token, "batch_events": batch,
        "real_hits_per_event": float(batches[0].columns["value"].numel()) / batch,
        "real_tokens_per_event": float(tok0.lengths.sum()) / batch, "simulate_s": sim_s,
        **{f"fit_{k}": float(v) for k, v in fitted.items()},
    }
    if times:
        step_s = statistics.median(times)
        achieved = sum(flops) / sum(times)
        out.update({
            "hits_per_event": float(np.mean(hits)) / batch, "sequences_per_step": len(tok0.lengths),
            "padded_tokens_per_step": padded_tokens(tok0.lengths), "tokens_per_step": float(np.mean(tokens)),
            "train_step_s_median": step_s, "train_step_cpu_s_median": statistics.median(cpu),
            "train_events_per_s": batch / step_s, "train_tokens_per_s": float(np.mean(tokens)) / step_s,
            "flops_per_token_train": float(np.mean(flops) / np.mean(tokens)), "achieved_tflops": achieved / 1e12,
        })
        if args.peak_tflops:
            out["mfu"] = achieved / (args.peak_tflops * 1e12)
    model.eval()
    gen_conditions = events.slice(3 * batch, 3 * batch + n_gen).conditions
    for n in args.gen_events:
        conds = {k: torch.from_numpy(v[:n]) for k, v in gen_conditions.items()}
        seeds = [event_seed(0, i, "generate") for i in range(n)]
        with autocast:
            w = n if args.warmup_events is None else min(args.warmup_events, n)
            if w:  # warm-up
                family.sample(model, {k: v[:w] for k, v in conds.items()}, seeds[:w])
            sync()
            t, c = time.perf_counter(), time.process_time()
            gen = family.sample(model, conds, seeds)
            sync()
        dt, dc = time.perf_counter() - t, time.process_time() - c
        out[f"generate_ms_per_event_batch{n}"] = 1000 * dt / n
        out[f"generate_cpu_ms_per_event_batch{n}"] = 1000 * dc / n
        out[f"generate_hits_per_event_batch{n}"] = float(gen.hits_per_event.mean())
        out[f"generate_cpu_s_per_event_batch{n}"] = dc / n
    for k, v in out.items():
        print(f"{k:34s} {v:.4g}" if isinstance(v, float) else f"{k:34s} {v}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
