"""Load a generator export and generate events, deterministically per event.

    gen = Generator.load("runs/pxd_gan_mini/export")
    hits = gen.generate({"luminosity": np.full(100, 2e34)}, seed=7)

Event i of a call with `first_event=f` draws all its randomness from
`event_seed(seed, f + i, "generate")`. Events are generated in micro-batches aligned to
multiples of `batch_size` in absolute event numbering, so splitting a run into parts gives
the same micro-batches whenever part boundaries are multiples of `batch_size` (the part
sizes used by `uhg generate`/overlay are). For families whose kernels round by batch shape
(the GAN) a partial micro-batch is padded to the full batch with each event in its grid slot,
so unaligned splits are bit-identical too. Across different batch sizes, BLAS may pick other
kernels: expect agreement to rounding (a few threshold-borderline hits), not bits.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from uhg.data.hits import HitBatch
from uhg.errors import CheckpointError, ConditionError
from uhg.seeding import event_seed

FORMAT = "uhg-generator/2"
# Format 1 held the floating-point tensors only: its models' integer buffers (e.g. the
# calorimeter's voxel-to-layer map) keep the values the model builds from its geometry.
FLOAT_ONLY_FORMAT = "uhg-generator/1"
WEIGHTS = "generator.safetensors"
SIDECAR = "generator.json"


class Generator:
    """A trained generator ready for inference (any family), with its geometry and conditions."""

    def __init__(self, family: Any, module: nn.Module, sidecar: Mapping[str, Any], path: Path):
        self.family, self.module, self.sidecar, self.path = family, module, dict(sidecar), path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu",
             model_overrides: Mapping[str, Any] | None = None) -> Generator:
        """Rebuild the generator from an export directory (`generator.json` + safetensors).
        `model_overrides`: model keys set over the export's (e.g. a GAN's `sample_precision`;
        keys that change the modules' shapes make the weights not fit).

        Only JSON and safetensors are read: nothing is unpickled. Raises CheckpointError for a
        missing, corrupt or incompatible export."""
        from pydantic import TypeAdapter, ValidationError
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from uhg.config.models import ModelConfig
        from uhg.geometry import get_geometry
        from uhg.models.common import ConditionNorm
        from uhg.models.family import build_family

        path = Path(path)
        if path.is_file() and path.name in (SIDECAR, WEIGHTS):
            path = path.parent
        sidecar_path, weights_path = path / SIDECAR, path / WEIGHTS
        try:
            sidecar = json.loads(sidecar_path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{sidecar_path}: not found; {path} is not a uhg generator export "
                                  f"(expected {SIDECAR} and {WEIGHTS})") from None
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{sidecar_path}: corrupt JSON ({err})") from None
        if sidecar.get("format") not in (FORMAT, FLOAT_ONLY_FORMAT):
            raise CheckpointError(f"{sidecar_path}: format {sidecar.get('format')!r}, expected {FORMAT!r}")
        try:
            model_cfg = TypeAdapter(ModelConfig).validate_python(sidecar["model"] | dict(model_overrides or {}))
            norm = ConditionNorm.from_dict(sidecar["condition_norm"])
            geometry = get_geometry(sidecar["geometry"])
        except (KeyError, ValidationError, ValueError) as err:
            raise CheckpointError(f"{sidecar_path}: cannot rebuild the model ({err})") from None
        family = build_family(geometry, model_cfg, norm)
        module = family.build_modules()[family.generator_name]
        try:
            state = load_file(str(weights_path))
        except FileNotFoundError:
            raise CheckpointError(f"{weights_path}: not found") from None
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{weights_path}: corrupt weights ({err})") from None
        try:
            module.load_state_dict(state, strict=False)
        except RuntimeError as err:
            raise CheckpointError(f"{weights_path}: weights do not fit the model of {sidecar_path} ({err})") from None
        expected = module.state_dict()
        if sidecar["format"] == FLOAT_ONLY_FORMAT:
            expected = {k: v for k, v in expected.items() if v.is_floating_point()}
        missing = set(expected) - set(state)
        if missing:
            raise CheckpointError(f"{weights_path}: lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        module.to(device).eval()
        if getattr(model_cfg, "sample_precision", "fp32") == "bf16" and torch.device(device).type == "cpu" \
                and not getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
            # oneDNN's bf16 convolutions pay off with AMX only (measured on the full PXD decoder's
            # layers: 1.6-1.8x slower than fp32 with AVX512-BF16 alone, 4-5x with AVX-512, 9-19x with AVX2)
            warnings.warn(f"{sidecar_path}: sample_precision bf16 on a CPU without AMX is slower than fp32; "
                          "set the model key sample_precision: fp32 for this machine", stacklevel=2)
        return cls(family, module, sidecar, path)

    @property
    def geometry(self):
        return self.family.geometry

    @property
    def condition_names(self) -> list[str]:
        return list(self.family.condition_norm.names)

    @property
    def kind(self) -> str:
        return self.family.geometry.kind

    def generate(self, conditions: Mapping[str, np.ndarray], seed: int, first_event: int = 0,
                 batch_size: int = 16) -> HitBatch:
        """Events first_event .. first_event+n-1 of the run with `seed`, for per-event
        `conditions` ({name: (n,) values in physical units}; extra names are passed through
        to the output). Returns a HitBatch of the export's detector kind."""
        missing = [n for n in self.condition_names if n not in conditions]
        if missing:
            raise ConditionError(f"the generator needs condition(s) {', '.join(missing)}; got "
                                 f"{', '.join(conditions) or 'none'}")
        conds = {k: np.atleast_1d(np.asarray(v, dtype=np.float64)) for k, v in conditions.items()}
        lengths = {len(v) for v in conds.values()}
        if len(lengths) != 1:
            raise ConditionError(f"conditions have different lengths: { {k: len(v) for k, v in conds.items()} }")
        n = lengths.pop()
        if batch_size < 1:
            raise ConditionError(f"batch_size must be >= 1, got {batch_size}")
        if n == 0:
            return HitBatch.empty(self.kind, conds)
        pad = bool(getattr(self.family, "pads_partial_batches", False))
        out = []
        i = 0
        while i < n:
            slot = (first_event + i) % batch_size
            stop = min(n, i + batch_size - slot)  # micro-batches aligned to the global grid
            seeds = [event_seed(seed, first_event + j, "generate") for j in range(i, stop)]
            rows = np.arange(i, stop)
            if pad and len(rows) < batch_size:
                # Same batch shape and the same slot for each event as in an unsplit run; the
                # filler slots repeat the first event and are dropped below.
                rows = np.concatenate([np.full(slot, i), rows, np.full(batch_size - slot - len(rows), i)])
                seeds = [seeds[0]] * slot + seeds + [seeds[0]] * (batch_size - slot - (stop - i))
            part = {k: torch.from_numpy(v[rows]) for k, v in conds.items()}
            batch = self.family.sample(self.module, part, seeds)
            out.append(batch.slice(slot, slot + stop - i) if len(rows) > stop - i else batch)
            i = stop
        return HitBatch.concat(out)
