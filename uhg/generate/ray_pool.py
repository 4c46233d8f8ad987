"""Write the parts of a store with a pool of workers: in this process, or as Ray actors.

A *part job* (`PartJob`) knows how to produce one part of an output store: `open()` loads
what a worker needs once (a generator, input stores), `write_part(part)` computes the part's
events and writes them with `uhg.data.writer.write_part` (atomic: a part is visible only when
complete), returning the number of events and hits. The same job object runs

- in this process (`workers=0`): parts one after another;
- on Ray (`workers=K`): K actors, each holding ONE opened job (one loaded model, on CPU or on
  `gpus_per_worker` GPUs), pulling parts until none are left.

Only parts listed by `missing_parts` are scheduled, so rerunning a killed job redoes only what
is missing. Every event's randomness derives from (seed, event index), so which worker wrote
which part does not change a byte of the output. A worker that dies is restarted by Ray and
its part retried (`max_restarts`, `max_task_retries`). The driver holds only part numbers and
counts; events never pass through it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Protocol

from uhg.errors import ConfigError, UhgError

MAX_RESTARTS = 3
"""How often Ray restarts a dead actor, and retries a part whose worker died."""


@dataclass(frozen=True)
class PartResult:
    """What a worker reports for one written part; `seconds` holds the worker's wall time per
    stage (e.g. "background", "merge", "write"), its process CPU time per stage ("cpu_<stage>")
    and in all ("cpu")."""

    part: int
    n_events: int
    n_hits: int
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RunReport:
    """Outcome of `run_parts`: the written parts (in part order) and timings in seconds.

    startup_s: until every worker had opened its job (models loaded); wall_s: whole call.
    Steady-state throughput is `n_events / (wall_s - startup_s)`."""

    parts: list[PartResult]
    startup_s: float
    wall_s: float

    @property
    def n_events(self) -> int:
        return sum(r.n_events for r in self.parts)

    @property
    def events_per_s(self) -> float:
        busy = self.wall_s - self.startup_s
        return self.n_events / busy if busy > 0 else float("nan")


class PartJob(Protocol):
    """A picklable description of the work; opened once per worker."""

    def open(self, device: str) -> None:
        """Load models and open inputs; `device` is "cpu" or "cuda"."""

    def write_part(self, part: int) -> PartResult:
        """Compute and atomically write part `part` of the output store."""


@dataclass(frozen=True)
class RayOptions:
    """How to run on Ray.

    workers: number of actors (each holds one loaded model).
    cpus_per_worker, gpus_per_worker: resources of one actor (`num_cpus`, `num_gpus`).
    address: Ray cluster to join; None joins the cluster of a `ray job submit` job (the
        `RAY_ADDRESS` it sets) or else starts a private local Ray with just enough CPUs.
    """

    workers: int = 2
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0
    address: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.cpus_per_worker < 1:
            raise ConfigError(f"cpus per worker must be at least 1, got {self.cpus_per_worker}")
        if self.gpus_per_worker < 0:
            raise ConfigError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")


class Progress:
    """Events done, events/s and ETA on the driver (tqdm), plus a closing summary line."""

    def __init__(self, total_events: int, done_events: int, description: str) -> None:
        from tqdm.auto import tqdm

        self.start = time.perf_counter()
        self.startup_s = 0.0
        self.new_events = 0
        self.bar = tqdm(total=total_events, initial=done_events, unit="ev", desc=description,
                        dynamic_ncols=True, smoothing=0.1, mininterval=1.0)

    def mark_started(self) -> None:
        """Workers are ready: what follows is steady-state throughput."""
        self.startup_s = time.perf_counter() - self.start

    def update(self, result: PartResult) -> None:
        self.new_events += result.n_events
        self.bar.update(result.n_events)

    def close(self) -> float:
        """Close the bar; returns the wall time in seconds."""
        self.bar.close()
        return time.perf_counter() - self.start


def run_parts(job: PartJob, parts: list[int], events_per_part: dict[int, int], *,
              ray_options: RayOptions | None = None, description: str = "events",
              device: str = "cpu") -> RunReport:
    """Write `parts` of the store with `job`, in this process (on `device`) or on Ray.
    `events_per_part` (all parts of the store) drives progress and ETA."""
    total = sum(events_per_part.values())
    done = total - sum(events_per_part[p] for p in parts)
    progress = Progress(total, done, description)
    try:
        if ray_options is None:
            results = _run_here(job, parts, progress, device)
        else:
            results = _run_on_ray(job, parts, ray_options, progress)
    finally:
        wall = progress.close()
    report = RunReport(sorted(results, key=lambda r: r.part), progress.startup_s, wall)
    print(f"wrote {len(results)} part(s), {report.n_events} events, in {wall:.1f} s (workers ready after "
          f"{report.startup_s:.1f} s, then {report.events_per_s:.2f} events/s); {done} events were already written",
          flush=True)
    return report


def _run_here(job: PartJob, parts: list[int], progress: Progress, device: str) -> list[PartResult]:
    job.open(device)
    progress.mark_started()
    results = []
    for part in parts:
        result = job.write_part(part)
        progress.update(result)
        results.append(result)
    return results


def init_ray(options: RayOptions) -> bool:
    """Connect as `uhg.ray_connect.connect_ray` does, with a private local Ray sized for the
    actors. Returns True when this call connected (the caller then shuts Ray down)."""
    from uhg.ray_connect import connect_ray

    try:
        return connect_ray(options.address, num_cpus=options.workers * options.cpus_per_worker,
                           num_gpus=options.workers * options.gpus_per_worker)
    except ConfigError as err:
        raise ConfigError(f"--workers {options.workers} x --gpus-per-worker {options.gpus_per_worker}: {err}") from None


class _PartWorker:
    """Ray actor body: holds one opened job (one loaded model) for its lifetime."""

    def __init__(self, job: PartJob, device: str, threads: int) -> None:
        self.job = job
        # Ray reports an exception of __init__ only as text; keep a user error (e.g. corrupt
        # weights) to raise from the first call, where it arrives as itself.
        self.error: UhgError | None = None
        try:
            self.job.open(device)
        except UhgError as err:
            self.error = err
        if "torch" in sys.modules:  # a generator was loaded: one intra-op thread per reserved CPU
            sys.modules["torch"].set_num_threads(threads)

    def ready(self) -> bool:
        if self.error is not None:
            raise self.error
        return True

    def write_part(self, part: int) -> PartResult:
        self.ready()
        return self.job.write_part(part)


def _run_on_ray(job: PartJob, parts: list[int], options: RayOptions, progress: Progress) -> list[PartResult]:
    import ray

    if not parts:
        return []
    connected_here = init_ray(options)
    n_actors = min(options.workers, len(parts))
    worker_class = ray.remote(
        num_cpus=options.cpus_per_worker,
        num_gpus=options.gpus_per_worker,
        max_restarts=MAX_RESTARTS,
        max_task_retries=MAX_RESTARTS,
    )(_PartWorker)
    device = "cuda" if options.gpus_per_worker > 0 else "cpu"
    # The job is passed by value (small), so a restarted actor can always rebuild it.
    actors = [worker_class.remote(job, device, options.cpus_per_worker) for _ in range(n_actors)]
    pending = list(reversed(parts))  # pop() hands out parts in increasing order
    running: dict = {}
    results: list[PartResult] = []
    try:
        _get_or_raise_user_error(ray, [a.ready.remote() for a in actors])
        progress.mark_started()
        for actor in actors:
            if pending:
                running[actor.write_part.remote(pending.pop())] = actor
        while running:
            [ready], _ = ray.wait(list(running), num_returns=1)
            actor = running.pop(ready)
            result = _get_or_raise_user_error(ray, ready)
            progress.update(result)
            results.append(result)
            if pending:
                running[actor.write_part.remote(pending.pop())] = actor
    finally:
        for actor in actors:
            ray.kill(actor)
        if connected_here:
            ray.shutdown()
    return results


def _get_or_raise_user_error(ray, refs):
    """ray.get, except that bad input found by a worker (missing condition, wrong geometry)
    reads as if found here: the UhgError itself, one clear message, no remote traceback."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, UhgError):
            raise cause from None
        raise
