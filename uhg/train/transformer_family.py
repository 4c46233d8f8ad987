"""Training step and validation metrics of the autoregressive hit-transformer family.

One engine ("model"). A step encodes the batch's hits as padded token sequences (one per
event and sensor, or per shower; cost ~ hits, never channels), runs the teacher-forced loss
through the engine and steps it. Validation reports the held-out NLL and a few physics
figures of events sampled at the validation events' conditions. The module and `sample` are
the model half, `uhg.models.transformer_family.TransformerFamily`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from uhg.config.schema import TrainConfig
from uhg.data.hits import HitBatch
from uhg.models import transformer_family as model
from uhg.models.laws import fit_count_law, fit_law, fit_share_law
from uhg.models.modes import eval_mode
from uhg.models.transformer import fit_cell_profile, mean_attended, padded_tokens
from uhg.models.transformer_clusters import ShapeCensus
from uhg.seeding import event_seed
from uhg.sparse.torch_hits import TorchHits
from uhg.train.engine import grad_norm_metric
from uhg.train.family import Engine, check_finite, evenly_spread


def log_response(batch: TorchHits) -> torch.Tensor:
    """(B,) log(E_dep / E_inc) of calorimeter showers (floored at 1e-6 for empty ones)."""
    e_dep = torch.zeros(len(batch), dtype=torch.float64, device=batch.device)
    e_dep.index_add_(0, batch.event_index(), batch.columns["value"].double())
    e_inc = batch.conditions["incident_energy"].double().to(batch.device)
    return (e_dep / e_inc).clamp_min(1e-6).log().float()


class TransformerFamily(model.TransformerFamily):
    """The hit-transformer family with its training half (`uhg.train.family.ModelFamily`)."""

    def build_optimizer(self, name: str, module: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
        # The laws' log-amplitudes must not be pulled to 0 by weight decay. At law_lr 0 they keep
        # their maximum-likelihood fit: out of the optimiser and without gradients.
        laws = module.law_parameters() if hasattr(module, "law_parameters") else []
        law_ids = {id(p) for p in laws}
        if self.cfg.law_lr == 0:
            for p in laws:
                p.requires_grad_(False)
            laws = []
        # No weight decay on embeddings, norms and biases (the usual transformer recipe).
        decay = [p for n, p in module.named_parameters() if p.requires_grad and p.dim() >= 2 and "emb" not in n
                 and not n.endswith(("_in.weight", "_out.weight")) and id(p) not in law_ids]
        ids = {id(p) for p in decay} | law_ids
        rest = [p for p in module.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        if laws:
            groups.append({"params": laws, "weight_decay": 0.0, "lr": train.lr * self.cfg.law_lr})
        return torch.optim.AdamW(groups, lr=train.lr, betas=train.betas)

    def fit_sample(self, n_train: int) -> np.ndarray:
        """Training-event positions `initialise_from_data` wants (evenly spread, at most `fit_events`)."""
        if self.cfg.multiplicity != "count" and not self.cfg.response_model and self.cfg.token != "cluster":
            return np.zeros(0, dtype=np.int64)
        return evenly_spread(n_train, self.cfg.fit_events)

    def initialise_from_data(self, modules: Mapping[str, nn.Module], batches: Iterable[HitBatch]) -> dict[str, float]:
        """Start the count and response laws, and cell_profile's layer profiles, at their maximum-likelihood
        fit to training events (`batches`, the events of `fit_sample`; full-batch L-BFGS, deterministic, so every rank
        starts from the same weights): SGD at the transformer's learning rate would take
        thousands of steps to move a log-occupancy by a few units, and jitters around it
        afterwards. Training then refines them jointly."""
        model = modules["model"]
        if model.counts is None and model.response is None and not model.clusters:
            return {}
        census = ShapeCensus(self.layout) if model.clusters else None
        conds, counts, responses = [], [], []
        kept = [] if model.config.event_summary else None  # event_summary: tokenised once the vocabulary is known
        profile = getattr(model, "cell_profile", None)
        # per (layer, cell_basis unit): a cell, or a field tile with pixel_head=factorised (a full epical
        # layer's 1 M cells would be 200 MB of counts)
        basis_units = None if profile is None else model.cell_basis.shape[0]
        cells = None if profile is None else torch.zeros(self.layout.n_rows * basis_units, dtype=torch.float64)
        banked = [] if model.clusters and self.cfg.cluster_code_bank else None  # encoded once the shapes are known
        for batch in batches:
            if banked is not None:
                banked.append(batch)
            hits = TorchHits.from_batch(batch)
            conds.append(self.condition_norm(hits.conditions).double())
            if kept is not None:
                kept.append(hits)
            if census is not None:  # cluster tokens: the laws count tokens, known once the vocabulary is
                census.add(batch)
            elif model.layered:  # hits per (shower, layer)
                flat = hits.event_index() * self.layout.n_rows + hits.columns["layer"].long()
                counts.append(torch.bincount(flat, minlength=len(batch) * self.layout.n_rows).view(len(batch), -1))
                if cells is not None:  # cell_profile: fired cells per (layer, cell) over the showers
                    at = hits.columns["layer"].long() * basis_units + model.basis_unit(hits.columns["cell"].long())
                    cells += torch.bincount(at, minlength=len(cells)).double()
            else:
                units = hits.columns["sensor"] if self.layout.kind == "pixel" else torch.zeros_like(hits.event_index())
                flat = hits.event_index() * self.layout.n_units + units.long()
                counts.append(torch.bincount(flat, minlength=len(batch) * self.layout.n_units).view(len(batch), -1))
            if model.response is not None:
                responses.append(log_response(hits).double())
        if not conds:
            return {}
        out = {}
        if census is not None:
            vocab = census.vocabulary(self.cfg.cluster_shapes, self.cfg.cluster_max_pixels)
            model.set_shapes(vocab)
            out.update(census.coverage(vocab))
            counts = [census.token_counts(vocab)]
            if banked:
                out.update(model.fit_code_bank(model.tokenize(b) for b in banked))
        cond, n = torch.cat(conds), torch.cat(counts).double()
        if model.shares is not None:  # layer_split: the total's law on the totals, the split's on the layers
            out |= fit_share_law(model.shares, n, cond, means=self.cfg.share_means,
                                 curvature=self.cfg.share_curvature)
            n = n.sum(1, keepdim=True)
        if model.counts is not None:
            out |= fit_count_law(model.counts, n, cond)
        if kept is not None:
            out |= self._fit_event_summary(model, kept, cond)
        if cells is not None:
            coefficients, out["law_cell_profile_nll"] = fit_cell_profile(cells.view(self.layout.n_rows, -1),
                                                                         model.cell_basis)
            profile.copy_(coefficients)
        if model.response is not None:
            target = torch.cat(responses)
            out["law_response_nll"] = fit_law(model.response, lambda m: -m.log_prob(target, cond).mean())
        return out

    @staticmethod
    @torch.no_grad()
    def _fit_event_summary(model: nn.Module, events: list[TorchHits], cond: torch.Tensor) -> dict[str, float]:
        """event_summary: the summary's trend and residual bank from the `token_sums` of all tokens of
        each training event of `events` (batches, in the order of cond)."""
        sums, counts = [], []
        for hits in events:
            tokens = model.tokenize(hits)
            per_unit = model.token_sums(tokens.values, tokens.hit_mask())
            sums.append(per_unit.view(len(hits), -1, 3).sum(1))
            counts.append(tokens.lengths.view(len(hits), -1))
        return model.fit_event_summary(torch.cat(sums), cond, torch.cat(counts))

    @torch.no_grad()
    def finalise_from_data(self, module: nn.Module, batches: Iterable[HitBatch]) -> dict[str, float]:
        """After training, with `latent_prior: mixture`: the latent prior fitted to the encoder's
        latents of the training events of `fit_sample` (`HitTransformer.fit_latent_prior`)."""
        if self.cfg.latent_prior != "mixture" or not self.cfg.latent_dim:
            return {}
        with eval_mode(module):
            parts = list(batches)
            if not parts:
                return {}
            hits = TorchHits.from_batch(HitBatch.concat(parts)).to(next(module.parameters()).device)
            return module.fit_latent_prior(module.tokenize(hits), self.condition_norm(hits.conditions).to(hits.device))

    # -- training
    def train_step(self, engines: Mapping[str, Engine], batch: TorchHits, step: int) -> dict[str, float]:
        engine = engines["model"]
        tokens = engine.module.tokenize(batch)
        cond = self.condition_norm(batch.conditions).to(batch.device)
        extra = {"log_response": log_response(batch)} if self.cfg.response_model else {}
        out = engine(tokens.rows, tokens.cols, tokens.values, tokens.lengths, cond, **extra)
        check_finite("loss", out["loss"])
        engine.backward(out["loss"])
        engine.step()
        metrics = {k: float(v.detach()) for k, v in out.items()}
        n_hits = int(batch.columns["value"].numel())
        module = engine.module
        per_token = n_hits / max(int(tokens.lengths.sum()), 1) if getattr(module, "clusters", False) else 1.0
        flops = 0.0
        if hasattr(module, "flops_per_token"):
            attended = mean_attended(tokens.lengths, module.config.attention_window)
            flops = module.flops_per_token(attended, pixels_per_token=per_token) * tokens.n_tokens
        metrics.update(tokens=float(tokens.n_tokens), padded_tokens=float(padded_tokens(tokens.lengths)),
                       hits_per_event=float(n_hits) / max(len(batch), 1),
                       tokens_per_event=float(tokens.lengths.sum()) / max(len(batch), 1), model_flops=flops)
        metrics.update(grad_norm_metric(engine))
        return metrics

    # -- validation
    @torch.no_grad()
    def validation_metrics(self, modules: Mapping[str, nn.Module], batch: TorchHits) -> dict[str, float]:
        model = modules[self.generator_name]
        with eval_mode(model):
            tokens = model.tokenize(batch)
            cond = self.condition_norm(batch.conditions).to(batch.device)
            nll = model.loss(tokens, cond, sample_latent=False,
                             log_response=log_response(batch) if self.cfg.response_model else None)
        out = {"nll_per_event": float(nll["nll"]), "nll_row": float(nll["nll_row"]),
               "nll_col": float(nll["nll_col"]), "nll_value": float(nll["nll_value"]), "kl": float(nll["kl"])}
        out.update({k: float(nll[k]) for k in ("nll_count", "nll_response", "nll_shape", "nll_charge", "nll_pixels", "latent_aux")
                    if k in nll})
        seeds = [event_seed(0, i, "generate") for i in range(len(batch))]
        fake, real = self.sample(model, batch.conditions, seeds), batch.to_batch()
        hf, hr = float(fake.hits_per_event.mean()), float(real.hits_per_event.mean())
        out.update(hits_per_event_fake=hf, hits_per_event_real=hr, hits_per_event_rel_error=(hf - hr) / max(hr, 1e-9))
        if self.layout.kind == "pixel":
            n = self.geometry.n_channels
            out.update(occupancy_fake_pct=100 * hf / n, occupancy_real_pct=100 * hr / n)
            out["charge_mean_fake"] = float(fake.columns["value"].mean()) if fake.n_hits else 0.0
            out["charge_mean_real"] = float(real.columns["value"].mean()) if real.n_hits else 0.0
        if self.layout.kind != "pixel" and "incident_energy" in real.conditions:
            e0 = real.conditions["incident_energy"]
            for tag, hb in (("fake", fake), ("real", real)):
                sums = np.bincount(hb.event_index(), weights=hb.columns["value"].astype(np.float64), minlength=len(hb))
                out[f"response_{tag}"] = float((sums / e0).mean())
        from uhg.eval.quick import validation_metrics as quick_metrics  # separation powers etc.

        out.update(quick_metrics(real, fake, self.geometry))
        return out
