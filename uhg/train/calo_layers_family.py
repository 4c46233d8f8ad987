"""Training step, validation metrics and sampling of the layer-energy calorimeter family
(uhg.models.calo_layers): one engine ("model"), trained by maximum likelihood (the layer-energy
law) plus the ELBO of the voxel-share VAE."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from uhg.config.calo_layers import CaloLayersConfig
from uhg.config.schema import TrainConfig
from uhg.data.calochallenge import dense_to_hits
from uhg.data.hits import HitBatch
from uhg.errors import ConfigError
from uhg.models.calo_layers import CaloLayersModel
from uhg.models.common import ConditionNorm
from uhg.seeding import event_seed
from uhg.sparse.torch_hits import TorchHits
from uhg.train.family import Engine, check_finite

STATS_EVENTS = 4096
"""Training showers (spread over the training range) that set the layer-energy standardisation."""
ENERGY = "incident_energy"


class CaloLayersFamily:
    """`ModelFamily` of the layer-energy model for an analog calorimeter geometry."""

    name = "calo_layers"
    generator_name = "model"
    pads_partial_batches = False

    def __init__(self, geometry, cfg: CaloLayersConfig, condition_norm: ConditionNorm):
        if geometry.kind != "calo" or getattr(geometry, "readout", "analog") != "analog":
            raise ConfigError(f"model.family calo_layers models analog calorimeter showers; geometry "
                              f"{geometry.name!r} is {geometry.kind} / {getattr(geometry, 'readout', '-')}")
        if ENERGY not in cfg.conditions:
            raise ConfigError(f"model.conditions must contain {ENERGY!r} for calo_layers, got {cfg.conditions}")
        self.geometry, self.cfg, self.condition_norm = geometry, cfg, condition_norm
        self.ema_decay = cfg.ema_decay
        offsets = np.asarray(geometry.layer_offsets)
        active = list(geometry.active_layers)
        layer_of_voxel = np.searchsorted(offsets, np.arange(geometry.n_cells), side="right") - 1
        self.voxel_layer = torch.as_tensor(np.searchsorted(active, layer_of_voxel), dtype=torch.long)

    def build_modules(self) -> dict[str, nn.Module]:
        return {"model": CaloLayersModel(self.voxel_layer, len(self.cfg.conditions), self.cfg)}

    def build_optimizer(self, name: str, module: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
        return torch.optim.AdamW(module.parameters(), lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)

    def _dense(self, batch: TorchHits) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        voxels = batch.calo_dense(self.geometry.layer_offsets, self.geometry.n_cells)
        e_inc = batch.conditions[ENERGY].to(batch.device, torch.float32)
        return voxels, e_inc, self.condition_norm(batch.conditions).to(batch.device)

    # -- data-driven start: standardisation of the log layer energies
    def fit_sample(self, n_train: int) -> np.ndarray:
        return np.unique(np.linspace(0, n_train - 1, min(n_train, STATS_EVENTS)).round().astype(np.int64))

    def initialise_from_data(self, modules: Mapping[str, nn.Module], batches: Iterable[HitBatch]) -> dict[str, float]:
        model = modules["model"]
        ys = []
        for batch in batches:
            voxels, e_inc, _ = self._dense(TorchHits.from_batch(batch))
            ys.append(model.log_layer(model.layer_energies(voxels), e_inc))
        if not ys:
            return {}
        y = torch.cat(ys)
        model.y_mean.copy_(y.mean(0))
        model.y_std.copy_(y.std(0).clamp_min(1e-3) if len(y) > 1 else torch.ones_like(model.y_std))
        return {"layer_log_energy_std_mean": float(model.y_std.mean())}

    # -- training
    def train_step(self, engines: Mapping[str, Engine], batch: TorchHits, step: int) -> dict[str, float]:
        engine = engines["model"]
        out = engine(*self._dense(batch))
        check_finite("loss", out["loss"])
        engine.backward(out["loss"])
        engine.step()
        metrics = {k: float(v.detach()) for k, v in out.items()}
        get = getattr(engine, "get_global_grad_norm", None)
        norm = get() if get is not None else None
        if norm is not None and math.isfinite(float(norm)):
            metrics["grad_norm"] = float(norm)
        return metrics

    # -- validation and sampling
    @torch.no_grad()
    def validation_metrics(self, modules: Mapping[str, nn.Module], batch: TorchHits) -> dict[str, float]:
        model = modules[self.generator_name]
        was_training = model.training
        model.eval()
        try:
            out = {k: float(v) for k, v in model(*self._dense(batch)).items()}
        finally:
            model.train(was_training)
        seeds = [event_seed(0, i, "generate") for i in range(len(batch))]
        fake, real = self.sample(model, batch.conditions, seeds), batch.to_batch()
        e0 = real.conditions[ENERGY]
        for tag, hb in (("fake", fake), ("real", real)):
            sums = np.bincount(hb.event_index(), weights=hb.columns["value"].astype(np.float64), minlength=len(hb))
            out[f"response_{tag}"] = float((sums / e0).mean())
            out[f"hits_per_event_{tag}"] = float(hb.hits_per_event.mean())
        from uhg.eval.quick import validation_metrics as quick_metrics

        out.update(quick_metrics(real, fake, self.geometry))
        return out

    @torch.no_grad()
    def sample(self, module: nn.Module, conditions: Mapping[str, torch.Tensor], seeds: Sequence[int]) -> HitBatch:
        """Showers for per-event `conditions`; shower i draws all its noise from a torch.Generator
        seeded with seeds[i], so it does not depend on the batch it is generated in."""
        device = next(module.parameters()).device
        conds = {k: torch.as_tensor(v) for k, v in conditions.items()}
        shapes = module.noise_shapes()
        parts = []
        for lo in range(0, len(seeds), self.cfg.generate_batch):
            ids = list(seeds[lo:lo + self.cfg.generate_batch])
            noise: dict[str, list[torch.Tensor]] = {k: [] for k in shapes}
            for s in ids:
                gen = torch.Generator().manual_seed(int(s))
                for k, shape in shapes.items():
                    noise[k].append(torch.rand(shape, generator=gen) if k.endswith("_u")
                                    else torch.randn(shape, generator=gen))
            part = {k: v[lo:lo + len(ids)] for k, v in conds.items()}
            cond = self.condition_norm(part).to(device)
            e_inc = part[ENERGY].to(device, torch.float32)
            dense = module.sample(e_inc, cond, {k: torch.stack(v).to(device) for k, v in noise.items()})
            parts.append(dense_to_hits(dense.cpu().numpy(), part[ENERGY].double().cpu().numpy(), self.geometry))
        if not parts:
            return dense_to_hits(np.zeros((0, self.geometry.n_cells), np.float32), np.zeros(0), self.geometry)
        return HitBatch.concat(parts) if len(parts) > 1 else parts[0]
