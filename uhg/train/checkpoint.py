"""Checkpoints: every engine in its own subdirectory, EMA weights, trainer state, RNG per rank.

Layout of `RUN/checkpoints/step_000100/`:

    generator/state/...        DeepSpeed checkpoint of the generator engine (module, optimiser,
    discriminator/state/...    ZeRO shards); one subdirectory per engine, since each engine
                               writes its own `latest` file
    ema.safetensors            EMA generator weights (fp32)
    rng/rank_00000.json        torch / numpy / python RNG states of each rank
    trainer.json               step, skipped steps, events seen, world size, metrics
    MANIFEST.json              written last: every file with its size and CRC-32 (a checkpoint
                               without it is incomplete and ignored)

All ranks write into `.step_000100.tmp/`; after a barrier rank 0 writes the manifest and
renames the directory, so a crash never leaves a directory that looks complete. Weights are
checked for NaN/Inf on every rank before anything is written; a full disk ends in a
CheckpointError and leaves the previous checkpoints as they were.

Loading verifies every file against the manifest (size and CRC-32: a flipped bit in a tensor
would otherwise load silently) and refuses pickles that reference anything beyond tensors,
plain containers and the few DeepSpeed state classes (`SAFE_GLOBALS`): DeepSpeed itself
unpickles with `weights_only=False`, so a checkpoint from outside could otherwise run code.

A checkpoint written by another number of ranks (an elastic run that lost or regained workers)
cannot be loaded shard by shard under ZeRO 1-3: rank 0 converts each engine's shards to
DeepSpeed's universal checkpoint format in `.step_000100.universal/` beside it, every rank
loads that, and the converted copy is removed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uhg.errors import CheckpointError, TrainingError

log = logging.getLogger(__name__)

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


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


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
    error: Exception | None = None
    try:
        tmp.mkdir(parents=True, exist_ok=True)  # node-local storage: each node makes its own
        for name, engine in engines.items():
            engine.save_checkpoint(str(tmp / name), tag=TAG, client_state={}, save_latest=False)
        (tmp / "rng").mkdir(exist_ok=True)
        (tmp / "rng" / f"rank_{rank:05d}.json").write_text(json.dumps(rng_state()))
        if rank == 0:
            if ema is not None:
                save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
            (tmp / "trainer.json").write_text(json.dumps(dict(trainer_state), indent=1))
    except Exception as err:  # every rank must learn of it, or the others wait at the barrier forever
        error = err
    _raise_if_any_failed(error, tmp, root, step)
    try:
        if rank == 0:
            _commit(tmp, final)
    except Exception as err:
        error = err
    _raise_if_any_failed(error, tmp, root, step)
    if tmp.exists() and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        _commit(tmp, final)  # node-local storage on another node
    _barrier()
    if rank == 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _raise_if_any_failed(error: Exception | None, tmp: Path, root: Path, step: int) -> None:
    """Collective: if any rank failed to write, remove the partial checkpoint (freeing the space
    it took) and raise on every rank; earlier checkpoints are untouched. A full disk or another
    OS error becomes a CheckpointError (torch.save reports a full disk as an opaque
    RuntimeError, hence the free-space check); any other exception is re-raised as it is."""
    if _all_ok(error is None):
        return
    free = _free_bytes(root)
    full = isinstance(error, OSError) or free < _NEARLY_FULL
    shutil.rmtree(tmp, ignore_errors=True)
    if error is not None and not full:
        raise error
    previous = latest_checkpoint(root)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    cause = f"{type(error).__name__}: {error}" if error is not None else "failed on another rank"
    if free < _NEARLY_FULL:
        cause += f"; No space left on device: {free} bytes free"
    raise CheckpointError(f"{tmp}: cannot write the checkpoint of step {step} ({cause}); the partial "
                          f"checkpoint was removed and {kept}. Free space in {root} (or point "
                          "output_dir / distributed.storage_path elsewhere) and resume") from error


_NEARLY_FULL = 1 << 20
"""Bytes free below which a failed write is blamed on a full disk."""


def _free_bytes(root: Path) -> int:
    try:
        return shutil.disk_usage(root).free
    except OSError:
        return 0


def _commit(tmp: Path, final: Path) -> None:
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    crc32 = {rel: _crc32(tmp / rel) for rel in files}
    (tmp / MANIFEST).write_text(json.dumps({"files": files, "crc32": crc32}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)


# ---------------------------------------------------------------------------- load
def verify_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Check that every file of the manifest exists with its recorded size and CRC-32 (when the
    manifest has them); returns the manifest. The error names the broken file and the earlier
    complete checkpoints one could resume from instead."""
    ckpt = Path(ckpt)
    manifest_path = ckpt / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        crc32 = manifest.get("crc32", {})
    except FileNotFoundError:
        raise CheckpointError(f"{manifest_path}: missing; {ckpt} is not a complete checkpoint") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{manifest_path}: corrupt manifest ({err}){_earlier(ckpt)}") from None
    for rel, size in files.items():
        p = ckpt / rel
        if not p.is_file():
            raise CheckpointError(f"{p}: file listed in the checkpoint manifest is missing{_earlier(ckpt)}")
        if p.stat().st_size != size:
            raise CheckpointError(f"{p}: truncated or modified ({p.stat().st_size} bytes, manifest says {size})"
                                  f"{_earlier(ckpt)}")
        if rel in crc32 and _crc32(p) != crc32[rel]:
            raise CheckpointError(f"{p}: corrupt (CRC-32 differs from the checkpoint manifest){_earlier(ckpt)}")
    return manifest


def _earlier(ckpt: Path) -> str:
    """'; earlier complete checkpoints: ...' hint for a broken checkpoint `ckpt`."""
    earlier = [p for p in list_checkpoints(ckpt.parent) if p.name < ckpt.name]
    if not earlier:
        return "; no earlier complete checkpoint of this run"
    return (f"; nothing was loaded. Earlier complete checkpoints: {', '.join(p.name for p in earlier)} "
            f"(continue from one with --resume {earlier[-1]})")


def _deepspeed_safe_globals() -> list[Any]:
    """Classes DeepSpeed pickles into its checkpoints besides tensors and containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def refuse_unsafe_pickles(ckpt: Path) -> None:
    """Unpickle every `.pt` file of `ckpt` with torch's weights-only unpickler (tensors memory-
    mapped, not read) before DeepSpeed loads them with `weights_only=False`. Raises
    CheckpointError naming the first file that would import or call anything else."""
    for path in sorted(Path(ckpt).rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as err:  # a global outside the allow-list
            detail = _unpickling_detail(err)
            raise CheckpointError(f"{path}: refused, nothing was loaded: the file is not a plain tensor "
                                  f"checkpoint and unpickling it could run code ({detail})") from None
        except Exception as err:  # damaged beyond what the manifest records
            raise CheckpointError(f"{path}: unreadable checkpoint file ({type(err).__name__}: {err})") from None


def _unpickling_detail(err: Exception) -> str:
    """The line of torch's weights-only error that names the offending global."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [type(err).__name__])[0][:300]


def _zero_stage(engine: Any) -> int:
    get = getattr(engine, "zero_optimization_stage", None)
    return int(get()) if get is not None else 0


def _convert_to_universal(ckpt: Path, names: list[str], rank: int) -> Path:
    """Rank 0 writes `names`' engines of `ckpt` in DeepSpeed's universal format (world-size
    independent) to a hidden folder beside it; every rank returns that folder once it exists."""
    out = ckpt.parent / f".{ckpt.name}.universal"
    error: Exception | None = None
    if rank == 0:
        try:
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            shutil.rmtree(out, ignore_errors=True)
            for name in names:
                args = argparse.Namespace(input_folder=str(ckpt / name / TAG), output_folder=str(out / name / TAG),
                                          num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                          strict=True, inject_missing_state=True)
                with contextlib.redirect_stdout(io.StringIO()):  # its progress lines say nothing to users
                    ds_to_universal(args)
        except Exception as err:  # conversion raises anything from asserts to OSError
            error = err
    if not _all_ok(error is None):
        if rank == 0:
            shutil.rmtree(out, ignore_errors=True)
        detail = f" ({type(error).__name__}: {error})" if error is not None else ""
        raise CheckpointError(f"{ckpt}: cannot convert its ZeRO shards for another world size{detail}; resume "
                              "with the number of workers that wrote it") from None
    _barrier()
    return out


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    """The trainer state (`trainer.json`: step, schedule, metrics, ...) a checkpoint was written with."""
    trainer_path = Path(ckpt) / "trainer.json"
    try:
        return json.loads(trainer_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{trainer_path}: unreadable trainer state ({err})") from None


def load_checkpoint(ckpt: Path, engines: Mapping[str, Any], ema: dict[str, torch.Tensor] | None, rank: int,
                    world_size: int) -> dict[str, Any]:
    """Restore engines, EMA and this rank's RNG from `ckpt`; returns the trainer state."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    verify_checkpoint(ckpt)
    refuse_unsafe_pickles(ckpt)
    state = read_trainer_state(ckpt)
    saved_world = int(state.get("world_size", world_size))
    resized = saved_world != world_size and any(_zero_stage(e) > 0 for e in engines.values())
    if resized:
        log.warning("checkpoint %s was written by %d rank(s), this run has %d: loading its ZeRO shards "
                    "through DeepSpeed's universal checkpoint format", ckpt, saved_world, world_size)
        universal = _convert_to_universal(ckpt, [n for n, e in engines.items() if _zero_stage(e) > 0], rank)
    for name, engine in engines.items():
        where = universal / name if resized and _zero_stage(engine) > 0 else ckpt / name
        config = getattr(engine, "_config", None)
        reshard = where != ckpt / name and config is not None
        if reshard:
            config.load_universal_checkpoint = True
        try:
            path, _ = engine.load_checkpoint(str(where), tag=TAG)
        except Exception as err:  # DeepSpeed raises many types for damaged files
            raise CheckpointError(f"{where}/{TAG}: cannot load the {name} engine ({type(err).__name__}: {err})") from None
        finally:
            if reshard:
                config.load_universal_checkpoint = False
        if path is None:
            raise CheckpointError(f"{where}/{TAG}: no {name} engine state found")
    if resized:
        _barrier()
        if rank == 0:
            shutil.rmtree(universal, ignore_errors=True)
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
