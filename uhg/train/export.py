"""Consolidated generator export: `generator.safetensors` + `generator.json`.

The JSON sidecar holds everything needed to rebuild the generator without unpickling
anything: format version, family, the model config, the geometry (name and spec), the
condition normalisation, the uhg version and the training provenance. `uhg.models.generator.
Generator.load(dir)` reads it back.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from uhg.config.schema import RunConfig
from uhg.errors import TrainingError
from uhg.models.family import ModelFamily
from uhg.models.generator import FORMAT, SIDECAR, WEIGHTS


def _training_data(cfg: RunConfig) -> dict[str, Any]:
    """Stores and simulator seeds of the training data (stores without a seed were not simulated),
    so a zero-shot protocol can refuse a reference that reuses them."""
    from uhg.data.layout import read_attrs
    from uhg.errors import StoreError

    seeds: list[int] | None = []
    machines = []
    for path in cfg.data.store:
        try:
            attrs = read_attrs(path)
        except StoreError:
            seeds = None  # unknown: a protocol must then be told the training seeds
            break
        seed = attrs.get("provenance", {}).get("seed")
        if seed is not None and int(seed) not in seeds:
            seeds.append(int(seed))
        machine = attrs.get("attributes", {}).get("machine")
        if machine is not None and machine not in machines:
            machines.append(machine)
    out: dict[str, Any] = {"stores": [str(p) for p in cfg.data.store], "seeds": seeds}
    if len(machines) == 1:  # the PXD machine scenario every store was simulated with
        out["machine"] = machines[0]
    return out


def export_generator(out_dir: Path, family: ModelFamily, cfg: RunConfig, state_dict: Mapping[str, torch.Tensor],
                     step: int, metrics: Mapping[str, float] | None = None) -> Path:
    """Write the generator weights (EMA if the family keeps one) to `out_dir`, atomically."""
    from safetensors.torch import save_file

    import uhg
    from uhg.geometry import get_geometry

    # floating-point state as float32; integer buffers keep their dtype (a float copy would round
    # indices above 2^24 and load back into a float tensor)
    tensors = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
               for k, v in state_dict.items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TrainingError(f"step {step}: generator weights {bad[:3]} are non-finite; export not written")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
    sidecar: dict[str, Any] = {
        "format": FORMAT,
        "family": family.name,
        "generator_module": family.generator_name,
        "model": cfg.model.model_dump(mode="json"),
        "geometry": cfg.geometry,
        "geometry_spec": json.loads(json.dumps(get_geometry(cfg.geometry).to_dict(), default=str)),
        "condition_norm": family.condition_norm.to_dict(),
        "uhg_version": getattr(uhg, "__version__", "unknown"),
        "run": cfg.name,
        "step": int(step),
        "ema_decay": float(family.ema_decay),
        "seed": cfg.seed,
        "training_data": _training_data(cfg),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
    }
    (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir
