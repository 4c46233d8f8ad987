"""Store benchmark: bytes per hit on disk, read throughput against raw decompression, and
sparse vs dense memory per event, for full-size PXD events (40 x 250 x 768 pixels).

    .venv/bin/python tools/bench_store.py [--events 100] [--occupancies 0.003,0.01] [--json out.json]

Hits are synthetic clustered PXD-like hits at a fixed occupancy (clusters of 1-8 pixels grown
by a random walk on the pixel grid, Landau-like charge with the 7 ADU threshold and 255
saturation), or events of the PXD background simulator (`--source sim`) at the luminosity
that reaches the requested occupancy, when it is installed. Targets (docs/benchmarks.md):
<= 3 bytes per hit on disk, loader >= 60% of raw decompression throughput (shuffled >= 40%), sparse memory
>= 100x below dense at 0.3% occupancy.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from uhg.data import HitBatch, create_store, fill_store, open_store
from uhg.geometry import get_geometry


def synthetic_events(geometry_name: str, occupancy: float, seed: int, start: int, stop: int) -> HitBatch:
    """Clustered hits: events start..stop-1, each with ~occupancy * n_channels fired pixels."""
    from scipy.stats import moyal

    g = get_geometry(geometry_name)
    sensors, rows, cols, values, counts = [], [], [], [], []
    for e in range(start, stop):
        rng = np.random.default_rng([seed, e])
        target = rng.poisson(occupancy * g.n_channels)
        n_clusters = max(1, int(target / 2.0))  # ~2.0 pixels survive per cluster after threshold and merging
        size = np.minimum(1 + rng.geometric(0.45, n_clusters) - 1, 8)
        total = int(size.sum())
        cl = np.repeat(np.arange(n_clusters), size)
        first = np.concatenate([[0], np.cumsum(size)[:-1]])
        # random walk of unit steps from the seed pixel: step 0 of each cluster is the seed itself
        steps = rng.integers(0, 4, total)
        dr = np.where(steps == 0, 1, np.where(steps == 1, -1, 0))
        dc = np.where(steps == 2, 1, np.where(steps == 3, -1, 0))
        dr[first], dc[first] = 0, 0
        pos = np.arange(total) - np.repeat(first, size)
        cr, cc = np.cumsum(dr), np.cumsum(dc)
        base = np.repeat(first, size)
        r = rng.integers(0, g.rows, n_clusters)[cl] + (cr - cr[base])
        c = rng.integers(0, g.cols, n_clusters)[cl] + (cc - cc[base])
        s = rng.integers(0, g.n_sensors, n_clusters)[cl]
        charge = moyal.rvs(loc=28, scale=7, size=n_clusters, random_state=rng)[cl] * np.where(pos == 0, 1.0, 0.45)
        ok = (r >= 0) & (r < g.rows) & (c >= 0) & (c < g.cols) & (charge >= g.adc_threshold)
        ch = ((s[ok].astype(np.int64) * g.rows + r[ok]) * g.cols + c[ok])
        ch, first_hit = np.unique(ch, return_index=True)
        v = np.clip(np.rint(charge[ok][first_hit]), 0, 255)
        sens, rest = np.divmod(ch, g.rows * g.cols)
        rr, ccol = np.divmod(rest, g.cols)
        sensors.append(sens)
        rows.append(rr)
        cols.append(ccol)
        values.append(v)
        counts.append(len(ch))
    return HitBatch("pixel", {"sensor": np.concatenate(sensors), "row": np.concatenate(rows),
                              "col": np.concatenate(cols), "value": np.concatenate(values)},
                    np.concatenate([[0], np.cumsum(counts)]), {"luminosity": np.full(stop - start, 1e35)})


def simulated_events(geometry_name: str, luminosity: float, seed: int, start: int, stop: int) -> HitBatch:
    from uhg.sim import simulate_pxd_background

    batch = simulate_pxd_background(get_geometry(geometry_name), stop - start, seed, first_event=start,
                                     luminosity=luminosity)
    return HitBatch(batch.kind, {k: batch.columns[k] for k in ("sensor", "row", "col", "value")}, batch.offsets,
                    {"luminosity": batch.conditions["luminosity"]})


def disk_bytes(root: Path) -> dict[str, int]:
    out = {"hits": 0, "other": 0}
    for f in root.rglob("*"):
        if f.is_file():
            key = "hits" if f.parent.parent.name in ("channel", "value") and f.parent.name == "c" else "other"
            out[key] += f.stat().st_size
    return out


def codec_table(batch: HitBatch, geometry) -> list[dict]:
    """Bytes per hit of alternative encodings of the same hits (numcodecs, no zarr overhead)."""
    from numcodecs import Blosc, Delta, Zstd

    from uhg.sparse.dense import channel_index

    sb = batch.sorted()
    ch = channel_index("pixel", sb.columns, geometry).astype(np.uint32)
    val = sb.columns["value"]
    n = len(ch)
    z = lambda s: Blosc("zstd", 5, s)  # noqa: E731
    delta = Delta(dtype="u4").encode(ch)
    rows = [
        ("sensor,row,col,value columns; Blosc zstd noshuffle",
         sum(len(z(Blosc.NOSHUFFLE).encode(sb.columns[k])) for k in ("sensor", "row", "col", "value"))),
        ("sensor,row,col,value columns; Blosc zstd bitshuffle",
         sum(len(z(Blosc.BITSHUFFLE).encode(sb.columns[k])) for k in ("sensor", "row", "col", "value"))),
        ("channel (no delta) + value; Blosc zstd shuffle / noshuffle",
         len(z(Blosc.SHUFFLE).encode(ch)) + len(z(Blosc.NOSHUFFLE).encode(val))),
        ("channel Delta + value; Blosc zstd bitshuffle / bitshuffle",
         len(z(Blosc.BITSHUFFLE).encode(delta)) + len(z(Blosc.BITSHUFFLE).encode(val))),
        ("channel Delta + value; zstd 3 / zstd 3", len(Zstd(3).encode(delta)) + len(Zstd(3).encode(val))),
        ("channel Delta + value; Blosc lz4 shuffle / noshuffle",
         len(Blosc("lz4", 5, Blosc.SHUFFLE).encode(delta)) + len(Blosc("lz4", 5, Blosc.NOSHUFFLE).encode(val))),
        ("channel Delta + value; Blosc zstd shuffle / noshuffle (chosen)",
         len(z(Blosc.SHUFFLE).encode(delta)) + len(z(Blosc.NOSHUFFLE).encode(val))),
    ]
    return [{"encoding": name, "bytes_per_hit": size / n} for name, size in rows]


def raw_decode_throughput(store_path: Path, repeats: int) -> tuple[float, int]:
    """Seconds to decode every hit chunk (channel + value) of the store from bytes already in
    memory with the same codecs (CRC32 check, Blosc, Delta), no zarr; and the bytes decoded."""
    from numcodecs import CRC32, Blosc, Delta

    chunks = []
    for part in sorted(p for p in (store_path / "parts").iterdir() if p.is_dir()):
        for name, dtype in (("channel", "u4"), ("value", "u1")):
            for f in sorted((part / name / "c").iterdir(), key=lambda p: int(p.name)):
                chunks.append((name, dtype, f.read_bytes()))
    crc, blosc, delta = CRC32(), Blosc(), Delta(dtype="u4")
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = 0
        for name, dtype, data in chunks:
            arr = np.frombuffer(blosc.decode(crc.decode(data)), dtype=dtype)
            if name == "channel":
                arr = delta.decode(arr)
            out += arr.nbytes
        best = min(best, time.perf_counter() - t)
    return best, out


def drain(batches) -> int:
    """Consume batches the way a training loop does: one at a time, dropping each."""
    n = 0
    for _ in batches:
        n += 1
    return n


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_occupancy(work: Path, geometry_name: str, occupancy: float, events: int, part_size: int, seed: int,
                    source: str, luminosity: float | None, repeats: int) -> dict:
    g = get_geometry(geometry_name)
    path = work / f"pxd-{occupancy}"
    create_store(path, "pixel", geometry_name, events, part_size,
                 {"luminosity": {"min": 0.0, "max": 1e37, "unit": "cm^-2 s^-1"}}, overwrite=True, seed=seed)
    make = (functools.partial(simulated_events, geometry_name, luminosity, seed) if source == "sim"
            else functools.partial(synthetic_events, geometry_name, occupancy, seed))
    t = time.perf_counter()
    fill_store(path, make, workers=1, progress=False)
    write_s = time.perf_counter() - t
    store = open_store(path)
    n_hits = int(store.part_n_hits().sum())
    usage = disk_bytes(path)
    sample = store.read(0, min(events, 20))

    # read throughput, all from the page cache; each figure is the best of `repeats` passes
    from uhg.data.loader import make_loader

    # interleaved passes, best of each: the ratios hold even on a busy machine
    raw_s = parts_s = loader_s = shuffled_s = widened_s = float("inf")
    for _ in range(repeats):
        t, raw_bytes = raw_decode_throughput(path, 1)
        raw_s = min(raw_s, t)
        parts_s = min(parts_s, best_of(lambda: drain(open_store(path).iter_batches()), 1))
        loader_s = min(loader_s, best_of(lambda: drain(make_loader(path, 32, shuffle=False, in_memory=False)), 1))
        shuffled_s = min(shuffled_s, best_of(lambda: drain(make_loader(path, 32, seed=1, in_memory=False)), 1))
        widened_s = min(widened_s, best_of(lambda: drain(make_loader(path, 32, shuffle=False, in_memory=False,
                                                                     compact=False)), 1))

    hits_per_event = n_hits / events
    numpy_sparse = hits_per_event * sum(np.dtype(d).itemsize for d in ("u1", "u2", "u2", "u1")) + 8
    torch_sparse = hits_per_event * (3 * 8 + 4) + 8  # TorchHits: int64 sensor/row/col, float32 value
    compact_sparse = hits_per_event * (4 + 1) + 8  # CompactHits: int32 channel, uint8 value
    return {
        "occupancy_target": occupancy,
        "occupancy_measured": n_hits / events / g.n_channels,
        "events": events, "hits": n_hits, "hits_per_event": hits_per_event, "part_size": part_size,
        "write_events_per_s": events / write_s,
        "disk_bytes_per_hit": sum(usage.values()) / n_hits,
        "disk_hit_chunk_bytes_per_hit": usage["hits"] / n_hits,
        "codecs": codec_table(sample, g),
        "raw_decode": {"s": raw_s, "events_per_s": events / raw_s, "hits_per_s": n_hits / raw_s,
                       "mb_per_s_decoded": raw_bytes / raw_s / 1e6},
        "store_parts": {"s": parts_s, "events_per_s": events / parts_s, "hits_per_s": n_hits / parts_s,
                        "fraction_of_raw": raw_s / parts_s},
        "loader": {"s": loader_s, "events_per_s": events / loader_s, "hits_per_s": n_hits / loader_s,
                   "fraction_of_raw": raw_s / loader_s},
        "loader_widened": {"s": widened_s, "events_per_s": events / widened_s, "hits_per_s": n_hits / widened_s,
                           "fraction_of_raw": raw_s / widened_s},
        "loader_shuffled": {"s": shuffled_s, "events_per_s": events / shuffled_s, "hits_per_s": n_hits / shuffled_s,
                            "fraction_of_raw": raw_s / shuffled_s},
        "memory_per_event_bytes": {
            "dense_uint8": g.n_channels, "dense_float32": 4 * g.n_channels,
            "sparse_numpy": numpy_sparse, "sparse_torch": torch_sparse, "sparse_compact": compact_sparse,
            "ratio_dense_uint8_to_sparse_numpy": g.n_channels / numpy_sparse,
            "ratio_dense_float32_to_sparse_numpy": 4 * g.n_channels / numpy_sparse,
            "ratio_dense_float32_to_sparse_torch": 4 * g.n_channels / torch_sparse,
        },
    }


def machine() -> dict:
    model = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()}


def markdown(result: dict) -> str:
    lines = [f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, load average at start "
             f"{', '.join(f'{x:.1f}' for x in result['machine']['load_average_at_start'])}, at end "
             f"{', '.join(f'{x:.1f}' for x in result['machine'].get('load_average_at_end', ()))}",
             f"Command: `{result['command']}`", "",
             "| occupancy (measured) | hits/event | disk B/hit (all) | B/hit hit chunks | raw decode ev/s (Mhit/s) "
             "| reader, HitBatch per part: ev/s (x raw) | loader, CompactHits: ev/s (x raw) "
             "| shuffled loader: ev/s (x raw) | loader widened to TorchHits (compact=False): ev/s (x raw) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(
            f"| {r['occupancy_measured']:.3%} | {r['hits_per_event']:.0f} | {r['disk_bytes_per_hit']:.2f} "
            f"| {r['disk_hit_chunk_bytes_per_hit']:.2f} | {r['raw_decode']['events_per_s']:.0f} "
            f"({r['raw_decode']['hits_per_s'] / 1e6:.0f}) | {r['store_parts']['events_per_s']:.0f} "
            f"({r['store_parts']['fraction_of_raw']:.2f}) | {r['loader']['events_per_s']:.0f} "
            f"({r['loader']['fraction_of_raw']:.2f}) | {r['loader_shuffled']['events_per_s']:.0f} "
            f"({r['loader_shuffled']['fraction_of_raw']:.2f}) | {r['loader_widened']['events_per_s']:.0f} "
            f"({r['loader_widened']['fraction_of_raw']:.2f}) |")
    lines += ["", "| occupancy | dense uint8 | dense float32 | sparse numpy | sparse TorchHits | uint8/numpy "
              "| float32/numpy | float32/TorchHits |", "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        m = r["memory_per_event_bytes"]
        lines.append(f"| {r['occupancy_measured']:.3%} | {m['dense_uint8'] / 1e6:.2f} MB | {m['dense_float32'] / 1e6:.2f} MB "
                     f"| {m['sparse_numpy'] / 1e3:.0f} kB | {m['sparse_torch'] / 1e3:.0f} kB "
                     f"| {m['ratio_dense_uint8_to_sparse_numpy']:.0f}x | {m['ratio_dense_float32_to_sparse_numpy']:.0f}x "
                     f"| {m['ratio_dense_float32_to_sparse_torch']:.0f}x |")
    lines += ["", "| encoding (first 20 events) | " + " | ".join(f"{r['occupancy_measured']:.3%}" for r in result["runs"]) + " |",
              "|---|" + "---|" * len(result["runs"])]
    for i, row in enumerate(result["runs"][0]["codecs"]):
        lines.append(f"| {row['encoding']} | " + " | ".join(f"{r['codecs'][i]['bytes_per_hit']:.2f}"
                                                           for r in result["runs"]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--geometry", default="pxd")
    ap.add_argument("--events", type=int, default=100)
    ap.add_argument("--part-size", type=int, default=50)
    ap.add_argument("--occupancies", default="0.003,0.01")
    ap.add_argument("--source", choices=["synthetic", "sim"], default="synthetic")
    ap.add_argument("--luminosities", default="", help="with --source sim: one luminosity per occupancy")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="")
    ap.add_argument("--json", default="", help="also write the full result here")
    args = ap.parse_args()
    occs = [float(x) for x in args.occupancies.split(",")]
    lumis = [float(x) for x in args.luminosities.split(",")] if args.luminosities else [None] * len(occs)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="uhg-bench-store-"))
    result = {"machine": machine(), "command": " ".join(["python", *sys.argv]), "source": args.source, "runs": []}
    try:
        for occ, lumi in zip(occs, lumis, strict=True):
            result["runs"].append(bench_occupancy(work, args.geometry, occ, args.events, args.part_size, args.seed,
                                                  args.source, lumi, args.repeats))
            print(f"done occupancy {occ}", file=sys.stderr)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
