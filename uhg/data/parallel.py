"""Fill a store's missing parts in parallel worker processes.

Each worker produces whole parts (`make_part(start, stop) -> HitBatch`) and commits them itself
with `write_part`, so the parent never holds event data and a crash loses at most the parts in
flight; rerunning `fill_store` does only what is still missing. Workers are started with
"forkserver" (or "spawn"): never "fork", because zarr's background I/O thread does not survive
a fork and the child can deadlock.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from uhg.data.hits import HitBatch
from uhg.data.layout import PARTS, missing_parts, part_name, part_range, read_attrs
from uhg.data.writer import PartExistsError, write_part
from uhg.errors import StoreError

MakePart = Callable[[int, int], HitBatch]


def _produce(path: str, part: int, start: int, stop: int, make_part: MakePart) -> int:
    """Worker body: make events start..stop-1 and commit them as part `part`. A part that
    another process committed meanwhile counts as done (its events are the same: every event
    depends only on the run's seed and its index)."""
    if (Path(path) / PARTS / part_name(part)).exists():
        return stop - start
    try:
        write_part(path, part, make_part(start, stop))
    except PartExistsError:
        pass
    return stop - start


def fill_store(path: str | os.PathLike, make_part: MakePart, workers: int = 1, desc: str = "events",
               progress: bool = True, start_method: str = "forkserver") -> int:
    """Write every missing part of the store at `path`; returns the number of events in the parts
    that were missing (parts another process commits meanwhile are taken as done).

    `make_part(start, stop)` returns the HitBatch of events start..stop-1 (it must be
    picklable for `workers > 1`, e.g. a functools.partial of a module-level function).
    `workers == 1` runs in this process. A tqdm bar (events, events/s, ETA) shows progress.
    """
    path = Path(path)
    attrs = read_attrs(path)
    if workers < 1:
        raise StoreError(f"store {path}: workers must be >= 1, got {workers}")
    if start_method not in ("forkserver", "spawn"):
        raise StoreError(f"start_method must be 'forkserver' or 'spawn' (fork deadlocks zarr), got {start_method!r}")
    todo = [(p, *part_range(attrs, p)) for p in missing_parts(path)]
    total = sum(stop - start for _, start, stop in todo)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="ev", disable=not progress or total == 0, smoothing=0.1,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    done = 0
    try:
        if workers == 1 or len(todo) <= 1:
            for part, start, stop in todo:
                done += _produce(str(path), part, start, stop, make_part)
                bar.update(stop - start)
        else:
            ctx = mp.get_context(start_method)
            if start_method == "forkserver":
                # the server imports the writer and make_part's module once; workers fork from it
                module = getattr(getattr(make_part, "func", make_part), "__module__", None)
                ctx.set_forkserver_preload(["uhg.data.writer"] + ([module] if module and module != "__main__" else []))
            with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as pool:
                pending = {pool.submit(_produce, str(path), part, start, stop, make_part) for part, start, stop in todo}
                try:
                    while pending:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            n = fut.result()  # re-raises a worker's error here
                            done += n
                            bar.update(n)
                except BaseException as err:
                    for fut in pending:
                        fut.cancel()
                    if isinstance(err, KeyboardInterrupt):
                        # Stop now rather than wait for the parts in flight: a killed writer
                        # leaves no visible partial part, and a rerun redoes those parts.
                        for proc in list(getattr(pool, "_processes", {}).values()):
                            proc.terminate()
                    raise
    finally:
        bar.close()
    if progress and total:
        elapsed = time.perf_counter() - t0
        bar.write(f"{desc}: wrote {done} events in {len(todo)} parts, {elapsed:.1f} s ({done / max(elapsed, 1e-9):.0f} events/s)")
    return done
