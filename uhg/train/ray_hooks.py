"""Training hooks inside a Ray Train worker: resume from Ray's latest checkpoint, report every
checkpoint to Ray from every rank, and (for fault-tolerance tests) kill a worker on request."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Mapping
from pathlib import Path

from uhg.errors import ConfigError
from uhg.train.hooks import TrainHooks

FAULT_ENV = "UHG_FAULT_KILL_WORKER"
"""`RANK@STEP`: the worker of that rank SIGKILLs itself after optimiser step STEP, once per
run (a marker file in the run folder keeps the restarted attempt from dying again)."""


class RayHooks(TrainHooks):
    """Hooks of one worker of a Ray Train run.

    run_folder: `<storage>/<run name>` when storage is a (shared) filesystem; the fault marker
        goes there.
    """

    def __init__(self, rank: int, world_size: int, run_folder: Path) -> None:
        self.rank = rank
        self.world_size = world_size
        self.run_folder = Path(run_folder)
        self.resumed_from: Path | None = None
        self.resumed_step: int | None = None
        self.report_extra: dict[str, str] = {}
        """Added to the metrics rank 0 reports (e.g. the MLflow run id), so the driver's
        `Result.metrics` carries them."""
        self._fault = _parse_fault(os.environ.get(FAULT_ENV))

    def resume_dir(self) -> Path | None:
        """The newest complete checkpoint of this run: Ray's latest reported checkpoint, or the
        loop's own newer one in `<run folder>/checkpoints`.

        Ray Train V2 commits a reported checkpoint only once its controller has polled the
        workers (every 2 s); a worker that dies right after reporting can leave Ray one
        checkpoint behind the loop's own, atomically committed ones on the shared run folder.
        """
        import ray.train

        from uhg.train.checkpoint import latest_checkpoint

        candidates: list[Path] = []
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            from pyarrow.fs import LocalFileSystem

            if isinstance(checkpoint.filesystem, LocalFileSystem) and Path(checkpoint.path).is_dir():
                candidates.append(Path(checkpoint.path))  # shared filesystem: read in place
            else:
                candidates.append(Path(checkpoint.to_directory()))  # downloaded once per node
        own = latest_checkpoint(self.run_folder / "checkpoints")
        if own is not None:
            candidates.append(own)
        if not candidates:
            return None
        self.resumed_from = max(candidates, key=checkpoint_step)  # Ray's copy wins a tie
        self.resumed_step = checkpoint_step(self.resumed_from)
        print(f"[uhg] rank {self.rank} resumes from step {self.resumed_step}: {self.resumed_from}", flush=True)
        return self.resumed_from

    def on_step(self, step: int, metrics: Mapping[str, float]) -> None:
        super().on_step(step, metrics)
        if self._fault is None or self._fault != (self.rank, step):
            return
        marker = self.run_folder / f".fault_injected_rank{self.rank}_step{step}"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"worker pid {os.getpid()} killed itself after step {step}\n")
        print(f"[uhg] {FAULT_ENV}: rank {self.rank} (pid {os.getpid()}) SIGKILLs itself after step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    def on_checkpoint(self, ckpt_dir: Path, step: int, metrics: Mapping[str, float]) -> None:
        """Reports the checkpoint from every rank; each rank uploads a disjoint share of its
        files (round robin over the sorted file list), and Ray merges the shares into one
        checkpoint folder, so the upload is spread over the workers and no file is sent twice."""
        import ray.train
        from ray.train import Checkpoint

        super().on_checkpoint(ckpt_dir, step, metrics)
        share = self.run_folder / ".upload" / f"step_{step:06d}_rank{self.rank:05d}"
        if share.exists():
            shutil.rmtree(share)
        files = sorted(p for p in Path(ckpt_dir).rglob("*") if p.is_file())
        for index, path in enumerate(files):
            if index % self.world_size != self.rank:
                continue
            target = share / path.relative_to(ckpt_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)  # same filesystem: no copy
            except OSError:
                shutil.copy2(path, target)
        share.mkdir(parents=True, exist_ok=True)  # a rank with no share still reports (barrier)
        metrics_out = {"step": step, **{k: float(v) for k, v in metrics.items()}, **self.report_extra}
        try:
            ray.train.report(metrics_out, checkpoint=Checkpoint.from_directory(str(share)),
                             checkpoint_dir_name=f"checkpoint_step_{step:06d}")
        finally:
            shutil.rmtree(share, ignore_errors=True)


def checkpoint_step(ckpt: Path) -> int:
    """Optimiser step a complete checkpoint was written at (its trainer.json)."""
    from uhg.errors import CheckpointError
    from uhg.train.checkpoint import read_trainer_state

    state = read_trainer_state(ckpt)
    try:
        return int(state["step"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{ckpt}/trainer.json: unreadable trainer state (no step: {err})") from None


def _parse_fault(spec: str | None) -> tuple[int, int] | None:
    if not spec:
        return None
    try:
        rank, step = spec.split("@")
        return int(rank), int(step)
    except ValueError:
        raise ConfigError(f"{FAULT_ENV}={spec!r}: expected RANK@STEP, e.g. 1@3") from None
