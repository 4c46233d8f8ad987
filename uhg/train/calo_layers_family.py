"""Training half of the layer-energy calorimeter family: one engine ("model"), trained by maximum
likelihood of the layer-energy law plus the ELBO of the voxel-share VAE. The module and `sample`
are the model half, `uhg.models.calo_layers_family.CaloLayersFamily`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from uhg.config.schema import TrainConfig
from uhg.data.hits import HitBatch
from uhg.models import calo_layers_family as model_half
from uhg.models.modes import eval_mode
from uhg.seeding import event_seed
from uhg.sparse.torch_hits import TorchHits
from uhg.train.engine import grad_norm_metric
from uhg.train.family import Engine, check_finite, evenly_spread

ENERGY = model_half.ENERGY


class CaloLayersFamily(model_half.CaloLayersFamily):
    """Trainable `calo_layers` family."""

    def build_optimizer(self, name: str, module: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
        # the latent prior (`latent_prior: mixture`) is frozen during training, fitted after it
        return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)

    def _dense(self, batch: TorchHits) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        voxels = batch.calo_dense(self.geometry.layer_offsets, self.geometry.n_cells)
        e_inc = batch.conditions[ENERGY].to(batch.device, torch.float32)
        return voxels, e_inc, self.condition_norm(batch.conditions).to(batch.device)

    # -- data-driven start: standardisation of the log layer energies
    def fit_sample(self, n_train: int) -> np.ndarray:
        return evenly_spread(n_train, self.cfg.fit_events)

    def initialise_from_data(self, modules: Mapping[str, nn.Module], batches: Iterable[HitBatch]) -> dict[str, float]:
        model = modules["model"]
        e_layers, e_incs, share_hi = [], [], []
        for batch in batches:
            voxels, e_inc, _ = self._dense(TorchHits.from_batch(batch))
            e_layers.append(model.layer_energies(voxels))
            e_incs.append(e_inc)
            if self.cfg.share_cap:
                share_hi.append(model.log_share_max(voxels))
        if not e_layers:
            return {}
        model.set_standardisation(torch.cat(e_layers), torch.cat(e_incs))
        if share_hi:
            model.log_share_hi.copy_(torch.stack(share_hi).max(0).values)
        return {"layer_log_energy_std_mean": float(model.y_std.mean())}

    def dense_showers(self, module: nn.Module, batches: Iterable[HitBatch]):
        """(dense voxels (B, V), incident energies (B,), normalised conditions (B, C)) of all
        `batches` on the module's device; None without showers."""
        device = next(module.parameters()).device
        parts = [self._dense(TorchHits.from_batch(b).to(device)) for b in batches]
        if not parts:
            return None
        return tuple(torch.cat(x) for x in zip(*parts, strict=True))

    @torch.no_grad()
    def finalise_from_data(self, module: nn.Module, batches: Iterable[HitBatch]) -> dict[str, float]:
        """After training, from the same training showers as the standardisation: each voxel's
        log-share residual quantiles (and their within-layer correlation) with `share_noise:
        empirical` (`empirical_correlated`), the latent prior with `latent_prior: mixture`, the
        layer-energy law trained further alone with `law_fit_steps` and the voxel VAE with
        `vae_fit_steps` (before the residuals and the prior, which depend on it)."""
        if self.cfg.share_noise == "gaussian" and self.cfg.latent_prior == "standard" and not self.cfg.law_fit_steps \
                and not self.cfg.vae_fit_steps:
            return {}
        with eval_mode(module):
            showers = self.dense_showers(module, batches)
            if showers is None:
                return {}
            voxels, e_inc, cond = showers
            out = {}
            if self.cfg.law_fit_steps:
                out.update(module.fit_law(voxels, e_inc, cond))
            if self.cfg.vae_fit_steps:
                out.update(module.fit_vae(voxels, e_inc, cond))
            if self.cfg.share_noise != "gaussian":
                out.update(module.fit_residual_quantiles(voxels, e_inc, cond))
            if self.cfg.latent_prior == "mixture":
                out.update(module.fit_latent_prior(voxels, e_inc, cond))
            return out

    # -- training
    def train_step(self, engines: Mapping[str, Engine], batch: TorchHits, step: int) -> dict[str, float]:
        engine = engines["model"]
        out = engine(*self._dense(batch))
        check_finite("loss", out["loss"])
        engine.backward(out["loss"])
        engine.step()
        metrics = {k: float(v.detach()) for k, v in out.items()}
        metrics.update(grad_norm_metric(engine))
        return metrics

    # -- validation
    @torch.no_grad()
    def validation_metrics(self, modules: Mapping[str, nn.Module], batch: TorchHits) -> dict[str, float]:
        model = modules[self.generator_name]
        with eval_mode(model):
            out = {k: float(v) for k, v in model(*self._dense(batch)).items()}
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
