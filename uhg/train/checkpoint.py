"""Checkpoints: every engine in its own subdirectory, EMA weights, trainer state, RNG per rank.

Layout of `RUN/checkpoints/step_000100/`:

    generator/state/...        DeepSpeed checkpoint of the generator engine (module, optimiser,
    discriminator/state/...    ZeRO shards); one subdirectory per engine, since each engine
                               writes its own `latest` file
    ema.safetensors            EMA generator weights (fp32)
    rng/rank_00000.json        torch / numpy / python RNG states of each rank
    trainer.json               step, skipped steps, events seen, world size, metrics
    MANIFEST.json              written last: every file with its size (a checkpoint without
                               it is incomplete and ignored)

All ranks write into `.step_000100.tmp/`; after a barrier rank 0 writes the manifest and
renames the directory, so a crash never leaves a directory that looks complete. Weights are
checked for NaN/Inf on every rank before anything is written.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uhg.errors import CheckpointError, TrainingError

MANIFEST = "MANIFEST.json"
TAG = "state"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _all_ok(flag: bool) -> bool:
    t = torch.tensor([0.0 if flag else 1.0])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
    return float(t.item()) == 0.0


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and is_checkpoint(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


# ---------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), np.uint8).copy()))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.from_numpy(np.frombuffer(base64.b64decode(s), np.uint8).copy())
                                      for s in state["cuda"]])


# ---------------------------------------------------------------------------- save
def _local_tensors(engine: Any) -> list[torch.Tensor]:
    """Parameters held by this rank (ZeRO-3: this rank's shard)."""
    module = getattr(engine, "module", engine)
    return [getattr(p, "ds_tensor", p).detach() for p in module.parameters()]


def _finite(tensors: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.numel())


def save_checkpoint(root: Path, step: int, engines: Mapping[str, Any], ema: Mapping[str, torch.Tensor] | None,
                    trainer_state: Mapping[str, Any], rank: int, keep: int) -> Path:
    """Write the checkpoint of `step` under `root` (collective: call on all ranks). Returns its path."""
    from safetensors.torch import save_file

    root = Path(root)
    bad = [name for name, e in engines.items() if not _finite(_local_tensors(e))]
    if ema is not None and not _finite(list(ema.values())):
        bad.append("ema")
    if not _all_ok(not bad):
        raise TrainingError(f"step {step}: non-finite weights in {', '.join(bad) or 'another rank'}; "
                            "checkpoint not written")
    final = root / checkpoint_name(step)
    tmp = root / f".{checkpoint_name(step)}.tmp"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    tmp.mkdir(parents=True, exist_ok=True)  # node-local storage: each node makes its own
    for name, engine in engines.items():
        engine.save_checkpoint(str(tmp / name), tag=TAG, client_state={}, save_latest=False)
    (tmp / "rng").mkdir(exist_ok=True)
    (tmp / "rng" / f"rank_{rank:05d}.json").write_text(json.dumps(rng_state()))
    if rank == 0:
        if ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
        (tmp / "trainer.json").write_text(json.dumps(dict(trainer_state), indent=1))
    _barrier()
    if rank == 0:
        _commit(tmp, final)
    _barrier()
    if tmp.exists() and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        _commit(tmp, final)  # node-local storage on another node
    _barrier()
    if rank == 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _commit(tmp: Path, final: Path) -> None:
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)


# ---------------------------------------------------------------------------- load
def verify_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Check that every file of the manifest exists with its recorded size; returns the manifest."""
    ckpt = Path(ckpt)
    manifest_path = ckpt / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{manifest_path}: missing; {ckpt} is not a complete checkpoint") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest_path}: corrupt manifest ({err})") from None
    for rel, size in files.items():
        p = ckpt / rel
        if not p.is_file():
            raise CheckpointError(f"{p}: file listed in the checkpoint manifest is missing")
        if p.stat().st_size != size:
            raise CheckpointError(f"{p}: truncated or modified ({p.stat().st_size} bytes, manifest says {size})")
    return manifest


def load_checkpoint(ckpt: Path, engines: Mapping[str, Any], ema: dict[str, torch.Tensor] | None, rank: int,
                    world_size: int) -> dict[str, Any]:
    """Restore engines, EMA and this rank's RNG from `ckpt`; returns the trainer state."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    verify_checkpoint(ckpt)
    trainer_path = ckpt / "trainer.json"
    try:
        state = json.loads(trainer_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{trainer_path}: unreadable trainer state ({err})") from None
    for name, engine in engines.items():
        where = ckpt / name
        try:
            path, _ = engine.load_checkpoint(str(where), tag=TAG)
        except Exception as err:  # DeepSpeed raises many types for damaged files
            raise CheckpointError(f"{where}/{TAG}: cannot load the {name} engine ({type(err).__name__}: {err})") from None
        if path is None:
            raise CheckpointError(f"{where}/{TAG}: no {name} engine state found")
    if ema is not None:
        ema_path = ckpt / "ema.safetensors"
        try:
            saved = load_file(str(ema_path))
        except (OSError, SafetensorError) as err:
            raise CheckpointError(f"{ema_path}: corrupt EMA weights ({err})") from None
        missing = set(ema) - set(saved)
        if missing:
            raise CheckpointError(f"{ema_path}: lacks {sorted(missing)[:3]} (checkpoint of another model?)")
        for k in ema:
            ema[k].copy_(saved[k])
    rng_path = ckpt / "rng" / f"rank_{rank:05d}.json"
    if state.get("world_size") == world_size and rng_path.is_file():
        try:
            set_rng_state(json.loads(rng_path.read_text()))
        except (json.JSONDecodeError, KeyError, ValueError) as err:
            raise CheckpointError(f"{rng_path}: corrupt RNG state ({err})") from None
    else:  # another world size: fresh per-rank streams derived from the step
        torch.manual_seed(int(state["seed"]) * 1_000_003 + int(state["step"]) * 1009 + rank)
    return state
