"""Training step and validation metrics of the sensor-conditioned GAN family.

Two engines, stepped alternately (DeepSpeed GAN pattern, see docs/training.md):
1. discriminator: generator forward without gradients, hinge loss on real vs fake images,
   `engines["discriminator"].backward/step`;
2. generator: fresh noise, discriminator parameters frozen (requires_grad=False) so its engine
   accumulates no gradients, adversarial loss plus the optional intra-event similarity and
   physics terms, `engines["generator"].backward/step`.

The modules and `sample` are the model half, `uhg.models.gan_family.GanFamily`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from uhg.config.schema import TrainConfig
from uhg.data.hits import HitBatch
from uhg.eval.features_pxd import pixel_clusters
from uhg.models import gan_family as model
from uhg.models.cluster_bank import fit_cluster_bank
from uhg.models.gan import (
    NEIGHBOURS,
    NO_SHAPE,
    SHAPE_HALF_COLS,
    SHAPE_ROWS,
    counted_seed_probability,
    draw_shapes,
    gate_noise,
    relaxed_images,
)
from uhg.models.gan_family import GanDraw
from uhg.models.gan_layout import CALO_DECADES, encode_hits
from uhg.models.laws import fit_count_law
from uhg.seeding import event_seed
from uhg.sparse.clusters import connected_pixels
from uhg.sparse.torch_hits import TorchHits
from uhg.train.engine import grad_norm_metric
from uhg.train.family import Engine, check_finite, evenly_spread

QUANTILE_SAMPLE = 1_000_000  # charges kept for the quantile table
OVERLAP_EVENTS = 256  # fit events generated to correct the seed rate for overlapping shapes ...
OVERLAP_PIXELS = 256 * 40 * 32 * 96  # ... at most this many pixels' worth (256 pxd-mini events; full resolution: 16 events)
OVERLAP_MIN_EVENTS = 16
OVERLAP_CHUNK_PIXELS = 4 * 40 * 250 * 768  # pixels per draw (256 full events in one draw: gates, uniforms and head over 24 GB by their sizes)
MERGE_CLASSES = 9  # cluster sizes 1 .. 8 and 9 or more: the size classes of `cluster_merge_correction`


class GanFamily(model.GanFamily):
    """The GAN family with its training half (`uhg.train.family.ModelFamily`)."""

    def build_optimizer(self, name: str, module: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
        lr = train.lr if name == "generator" else (train.lr_discriminator or train.lr)
        if getattr(module, "counts", None) is not None:
            # The cluster laws keep their maximum-likelihood fit: the count law, and the shape mix (trained,
            # 100 adversarial steps on pxd-mini grew the mean cluster size from the fitted 3.23 to 3.45
            # against the data's 3.13, docs/results.md). The game learns where seeds go and their charge.
            laws = [*module.counts.parameters(), *module.shape_logits.parameters(), module.shape_tilt]
            for p in laws:
                p.requires_grad_(False)
        if name == "generator" and self.cfg.charge_at_fit:
            hold_charge_at_fit(module)
        params = [p for p in module.parameters() if p.requires_grad]
        if train.weight_decay:
            return torch.optim.AdamW(params, lr=lr, betas=train.betas, weight_decay=train.weight_decay)
        return torch.optim.Adam(params, lr=lr, betas=train.betas)

    # -- data-driven start
    def fit_sample(self, n_train: int) -> np.ndarray:
        """Training-event positions `initialise_from_data` wants (evenly spread, at most `fit_events`)."""
        if not (self.cfg.fit_from_data and self.layout.kind == "pixel"):
            return np.zeros(0, dtype=np.int64)
        return evenly_spread(n_train, self.cfg.fit_events)

    def initialise_from_data(self, modules: Mapping[str, nn.Module], batches: Iterable[HitBatch]) -> dict[str, float]:
        """Start the generator at the training data's per-sensor occupancy and charge spectrum
        (`batches`: the events of `fit_sample`): the gate offset of sensor u is the Poisson
        maximum-likelihood fit of log occupancy = a_u + b_u . conditions (full-batch L-BFGS,
        deterministic, so every rank starts alike), and the charge quantile table holds the
        quantiles of the encoded charges. The adversarial game would need thousands of steps to
        move a log occupancy by units; it refines both afterwards."""
        g = modules[self.generator_name]
        conds, counts, codes, sizes, shapes, raw, observed = [], [], [], [], [], [], []
        for batch in batches:
            raw.append(batch.conditions)
            hits = TorchHits.from_batch(batch)
            conds.append(self.condition_norm(hits.conditions).double())
            flat = hits.event_index() * self.layout.n_units + hits.columns["sensor"].long()
            counts.append(torch.bincount(flat, minlength=len(batch) * self.layout.n_units).view(len(batch), -1))
            codes.append(torch.log1p(hits.columns["value"].double()) / math.log1p(self.layout.adc_max))
            if g.growth:
                labels, n_clusters = pixel_clusters(batch, self.geometry)
                sizes.extend(np.bincount(labels, minlength=n_clusters).tolist())
            if g.n_shapes:
                keys, sensors, events, *pixels = cluster_shape_keys(batch, self.geometry, g.charge_profile)
                shapes.append((keys, sensors, events + sum(len(c) for c in conds[:-1]), *pixels))
            if g.counts is not None and self.cfg.cluster_merge_correction:  # every cluster: (event, size)
                labels, n_clusters = pixel_clusters(batch, self.geometry)
                of = np.zeros(n_clusters, np.int64)
                of[labels] = batch.event_index() + sum(len(c) for c in conds[:-1])
                observed.append((of, np.bincount(labels, minlength=n_clusters)))
        if not conds:
            return {}
        cond, n = torch.cat(conds), torch.cat(counts).double()  # (E, C), (E, U)
        if cond.shape[1] == 0:
            cond = torch.zeros(len(n), 0, dtype=torch.float64)
        pixels = self.layout.height * self.layout.width
        x = torch.cat([torch.ones(len(n), 1, dtype=torch.float64), cond], dim=1)  # (E, 1 + C)
        start = torch.log(n.mean(0).clamp_min(0.5) / pixels)
        theta = torch.zeros(self.layout.n_units, x.shape[1], dtype=torch.float64)
        theta[:, 0] = start
        theta.requires_grad_(True)
        opt = torch.optim.LBFGS([theta], max_iter=200, line_search_fn="strong_wolfe")

        def nll() -> torch.Tensor:
            opt.zero_grad()
            log_rate = x @ theta.T + math.log(pixels)  # (E, U)
            loss = (torch.exp(log_rate) - n * log_rate).mean()
            loss.backward()
            return loss

        opt.step(nll)
        with torch.no_grad():
            log_occ = theta.detach()
            # Seeds fire at occupancy / (expected cluster size); each of the 8 neighbours of a seed
            # fires with (mean data cluster size - 1) / 8, overlaps of clusters ignored.
            spread = 0.0
            if g.growth:
                spread = min(max((float(np.mean(sizes)) - 1) / len(NEIGHBOURS), 0.01), 0.9) if sizes else 0.1
                g.spread.bias.fill_(math.log(spread / (1 - spread)))
                g.head.bias[: g.shuffle**2] = 0.0
            seed = torch.exp(log_occ[:, 0]) / (1 + len(NEIGHBOURS) * spread)
            if g.n_shapes:  # seeds fire at occupancy / (the sensor's mean shape size)
                mean_size, d_log_size, slot_of = _fit_shapes(g, shapes, cond)
                if g.charge_profile:
                    profile, profile_scores = _fit_charge_profile(g, shapes, slot_of, torch.cat(codes).numpy())
                g.head.bias[: g.shuffle**2] = 0.0
                seed = torch.exp(log_occ[:, 0]) / mean_size
            # The start is the fitted model itself: a random head adds a random map to every
            # gate and charge score (at pxd-mini init: score std 1.3 instead of 1, which widened the
            # charge spectrum, event charge std 22.9 ADU against 19.4), training then learns one.
            g.head.weight.zero_()
            offset = log_occ.clone()
            offset[:, 0] = torch.log(seed) - torch.log1p(-seed) - g.head.bias[0].double()
            if g.n_shapes:  # seeds: occupancy / mean shape size, that size linearised in the conditions
                offset[:, 1:] -= d_log_size
            g.unit_gate.copy_(offset.to(g.unit_gate.dtype))
            out = {"fit_occupancy_pct": float(100 * torch.exp(log_occ[:, 0]).mean()), "fit_spread": spread}
            if g.n_shapes:
                out["fit_shapes"] = int((g.shape_prior[0] > NO_SHAPE / 2).sum())
                out["fit_mean_cluster_size"] = float(mean_size.mean())
            if g.charge_profile:
                out["fit_profile_positions"] = profile
            if g.charge_share:  # the shapes' mean within-cluster charge correlation, weighted by use
                use = torch.softmax(g.shape_prior.double(), -1).mean(0)
                out["fit_charge_share"] = float((use * g.shape_charge_share.double()).sum())
            if g.charge_noise:
                code = torch.cat(codes)
                if len(code) > QUANTILE_SAMPLE:  # torch.quantile's input limit; an even thinning keeps the shape
                    code = code[even_thinning(len(code), QUANTILE_SAMPLE)]
                _fit_charge_table(g, code, profile_scores if g.charge_profile else None)
                out["fit_charge_median_adu"] = float(torch.expm1(torch.quantile(code, 0.5) * math.log1p(self.layout.adc_max)))
        if g.counts is not None:  # clusters per sensor and event, the census's clusters
            events = np.concatenate([c[2] for c in shapes])
            sensors = np.concatenate([c[1] for c in shapes])
            clusters = torch.zeros_like(n)
            clusters.index_put_((torch.as_tensor(events), torch.as_tensor(sensors)),
                                torch.ones(len(events), dtype=clusters.dtype), accumulate=True)
            out |= fit_count_law(g.counts, clusters, cond)
        if g.n_shapes:
            conditions = {k: np.concatenate([r[k] for r in raw]) for k in raw[0]}
            data_clusters = tuple(np.concatenate(c) for c in zip(*observed, strict=True)) if observed else None
            out["fit_overlap_correction"] = self._correct_overlaps(g, conditions, n, data_clusters)
        return out

    @torch.no_grad()
    def _correct_overlaps(self, g: nn.Module, conditions: dict[str, np.ndarray], n: torch.Tensor,
                          data_clusters: tuple[np.ndarray, np.ndarray] | None = None) -> float:
        """Placed shapes overlap and merge where they meet. The table's shapes are the data's
        clusters, merges included, so seeds at occupancy / mean shape size lose hits to a second
        round of merging (pxd-mini at 8e35: -5.6% hits on layer 1). Each sensor's seed rate is
        scaled by the data's hits / the generated hits at the conditions of up to OVERLAP_EVENTS
        fit events, twice (deterministic seeds: every rank starts alike), drawn a few events at a
        time (each event's draw is its own, so the chunks change nothing). Returns the mean factor
        applied. With `data_clusters` ((event, size) of every cluster of the fit events;
        `cluster_merge_correction`), each round also moves the shape log-odds of each size class by
        log(data / generated clusters of that size) and the law's level by log(data / generated
        clusters): placed next to each other, the data's shapes merge a second time (pxd-mini at
        8e35: mean cluster size 3.27 against 3.13, 8-pixel and larger clusters too many)."""
        idx = overlap_events(len(n), self.layout.n_units * self.layout.height * self.layout.width)
        real = n[idx].sum(0)
        chunk = max(1, OVERLAP_CHUNK_PIXELS // (self.layout.n_units * self.layout.height * self.layout.width))
        # With a count law the seed count is the law's: its per-sensor level moves instead of the gate's
        # (the logit of a sparse occupancy is its log to first order; the second round corrects the rest),
        # by the pixels of the shapes the seeds drew / the hits placed: the merging alone. (Data hits /
        # generated hits, as without a law, added the noise of the law's draws and of the fit events'
        # counts over 256 events to every sensor: per-sensor MRE 6.1%, floor 2.3%. The shapes' expected
        # pixels instead of the drawn ones added the noise of the shape draws: on a pxd-mini layer-2
        # sensor ~1300 seeds in 256 events, sizes 1 to 30 pixels, a few percent per sensor.)
        level = _count_level(g.counts) if g.counts is not None else g.unit_gate[:, 0]
        start = level.detach().clone()
        if getattr(g, "merge_density", None) is not None:  # fitted first: the rounds below then hold the rest
            g.merge_density.copy_(self._fit_merge_density(g, conditions, idx, chunk))
        shift = g.counts.shift_level if g.counts is not None else level.add_
        for _ in range(2):
            made = torch.zeros(self.layout.n_units, dtype=torch.float64)
            target = torch.zeros(self.layout.n_units, dtype=torch.float64) if g.counts is not None else real
            made_sizes, n_made = np.zeros(MERGE_CLASSES + 1, np.int64), 0
            for part in np.array_split(idx, range(chunk, len(idx), chunk)):
                cond = {k: torch.as_tensor(v[part]) for k, v in conditions.items()}
                drawn = self.draw(g, cond, [event_seed(1, int(i), "generate") for i in part])
                made += drawn.mask.sum(dim=(0, 2, 3)).double().cpu()
                if g.counts is not None:
                    target += drawn_shape_pixels(g, drawn).cpu()
                if data_clusters is not None:
                    sizes = self._cluster_sizes(drawn.mask)
                    made_sizes += np.bincount(np.minimum(sizes, MERGE_CLASSES), minlength=MERGE_CLASSES + 1)
                    n_made += len(sizes)
            shift(torch.log((target + 1) / (made + 1)).to(level))
            if data_clusters is not None:
                shift(self._correct_merges(g, made_sizes, n_made, data_clusters[1][np.isin(data_clusters[0], idx)]))
        return float(torch.exp(level - start).mean())

    def _fit_merge_density(self, g: nn.Module, conditions: dict[str, np.ndarray], idx: np.ndarray,
                           chunk: int) -> torch.Tensor:
        """`merge_density_correction`: (U,) k_u of merged fraction = k_u x seeds / pixels, the least-squares
        fit through zero over the fit events `idx` of the seeds placed per sensor and event against the
        clusters they make (4-connected hits, as `_cluster_sizes`). Within the training range the merges
        at pxd-mini design are 1-5 % of the seeds, at 3x its maximum 17 %: one level factor from the
        training conditions left the generated clusters 10 % low there (docs/results.md)."""
        pixels = self.layout.height * self.layout.width
        lost = torch.zeros(self.layout.n_units, dtype=torch.float64)
        spread = torch.zeros(self.layout.n_units, dtype=torch.float64)
        for part in np.array_split(idx, range(chunk, len(idx), chunk)):
            cond = {k: torch.as_tensor(v[part]) for k, v in conditions.items()}
            drawn = self.draw(g, cond, [event_seed(1, int(i), "generate") for i in part])
            seeds = drawn.seeds.sum(dim=(2, 3)).double().cpu()  # (B, U)
            at = drawn.mask.nonzero().cpu().numpy()
            image = at[:, 0] * self.layout.n_units + at[:, 1]
            labels, n = connected_pixels(image, at[:, 2], at[:, 3], self.layout.height, self.layout.width)
            of = np.zeros(n, np.int64)
            of[labels] = image
            made = torch.as_tensor(np.bincount(of, minlength=seeds.numel()), dtype=torch.float64).view_as(seeds)
            lost += (seeds - made).sum(0)
            spread += (seeds**2 / pixels).sum(0)
        return (lost / spread.clamp_min(1e-12)).clamp_min(0.0).to(g.merge_density)

    def _cluster_sizes(self, mask: torch.Tensor) -> np.ndarray:
        """Pixels of every cluster (4-connected hits of one sensor image) of a hit `mask` (B, U, H, W)."""
        at = mask.nonzero().cpu().numpy()
        labels, n = connected_pixels(at[:, 0] * self.layout.n_units + at[:, 1], at[:, 2], at[:, 3],
                                     self.layout.height, self.layout.width)
        return np.bincount(labels, minlength=n)

    def _correct_merges(self, g: nn.Module, made: np.ndarray, n_made: int, data_sizes: np.ndarray) -> float:
        """One round of `cluster_merge_correction` from the generated clusters per size class `made`
        (1 .. MERGE_CLASSES, the last holds the larger ones too; `n_made` clusters in all) and the
        sizes of the data's clusters at the same conditions: shifts the shape log-odds of each size
        class in place; returns the log factor for the law's level."""
        data = np.bincount(np.minimum(data_sizes, MERGE_CLASSES), minlength=MERGE_CLASSES + 1)
        shift = torch.as_tensor(np.log((data[1:] + 1.0) / (made[1:] + 1.0)), dtype=g.shape_prior.dtype)
        size = g.shape_pixels.clamp(1, MERGE_CLASSES) - 1
        used = g.shape_prior > NO_SHAPE / 2
        g.shape_prior.add_(torch.where(used, shift[size][None, :], torch.zeros_like(g.shape_prior)))
        return math.log((len(data_sizes) + 1.0) / (n_made + 1.0))

    # -- training
    def _noise(self, generator: Engine | nn.Module, b: int, device: torch.device):
        lay, cfg = self.layout, self.cfg
        g = getattr(generator, "module", generator)
        z = torch.randn(b, cfg.z_dim, device=device)
        un = torch.randn(b, lay.n_units, cfg.sensor_noise_dim, device=device)
        gn = gate_noise((b, lay.n_units, lay.height, lay.width), device=device)
        p = g.pixel_noise_channels
        pn = torch.randn(b, lay.n_units, p, lay.height, lay.width, device=device) if p else None
        return z, un, gn, pn

    def _fake(self, generator: Engine | nn.Module, cond: torch.Tensor, b: int, device: torch.device):
        z, un, gn, pn = self._noise(generator, b, device)
        g = getattr(generator, "module", generator)
        counts = None
        if g.counts is not None:
            with torch.no_grad():
                law_u = torch.rand(b, self.layout.n_units + 1, device=device)
                counts = g.draw_counts(cond, law_u[:, 1:], law_u[:, 0])
        gate, code, clusters = generator(z, un, cond, pn)
        images, mask, code = relaxed_images(gate, code, gn, self.cfg.gate_temperature, self.valid(device), clusters, g,
                                            counts, pn)
        return images, mask, gate, code, clusters, counts

    def train_step(self, engines: Mapping[str, Engine], batch: TorchHits, step: int) -> dict[str, float]:
        G, D = engines["generator"], engines["discriminator"]
        device = batch.device
        b = len(batch)
        real = encode_hits(self.layout, batch) * self.valid(device)
        cond = self.condition_norm(batch.conditions).to(device)
        w = self.cfg.event_score_weight

        # 1. discriminator
        with torch.no_grad():
            fake, fake_hits, *_ = self._fake(G, cond, b, device)
        real_u, real_e = D(real, cond)
        fake_u, fake_e = D(fake.detach(), cond, fake_hits.detach())
        if self.cfg.loss == "hinge":
            d_loss = (torch.relu(1 - real_u).mean() + torch.relu(1 + fake_u).mean()
                      + w * (torch.relu(1 - real_e).mean() + torch.relu(1 + fake_e).mean()))
        else:
            sp = nn.functional.softplus
            d_loss = sp(-real_u).mean() + sp(fake_u).mean() + w * (sp(-real_e).mean() + sp(fake_e).mean())
        check_finite("loss_discriminator", d_loss)
        D.backward(d_loss)
        D.step()
        out = {"loss_discriminator": float(d_loss.detach()), "d_real": float(real_u.detach().mean()),
               "d_fake": float(fake_u.detach().mean())}
        out.update(grad_norm_metric(D, "grad_norm_discriminator"))

        # 2. generator (discriminator frozen: no gradient lands in its engine). The bare
        # discriminator module is called, not its engine: an engine forward would register the
        # generator's loss as a backward of the discriminator engine (DeepSpeed refuses that at
        # ZeRO-0); ZeRO-3 still gathers the parameters through its module hooks.
        d_module = getattr(D, "module", D)
        d_params = [p for p in d_module.parameters() if p.requires_grad]
        for p in d_params:
            p.requires_grad_(False)
        try:
            fake, mask, gate, code, clusters, counts = self._fake(G, cond, b, device)
            with _autocast_like(D, device):
                fu, fe = d_module(fake, cond, mask)  # the straight-through mask: hit positions get a gradient
            adv = -(fu.mean() + w * fe.mean()) if self.cfg.loss == "hinge" else \
                nn.functional.softplus(-fu).mean() + w * nn.functional.softplus(-fe).mean()
            g_loss = adv
            if self.cfg.similarity_weight:
                sim = self.cfg.similarity_weight * _similarity_loss(fake, real)
                out["loss_similarity"] = float(sim.detach())
                g_loss = g_loss + sim
            if self.cfg.physics_weight:
                phys = self.cfg.physics_weight * self._physics_loss(gate, mask, code, real, clusters, getattr(G, "module", G),
                                                                   counts)
                out["loss_physics"] = float(phys.detach())
                g_loss = g_loss + phys
            check_finite("loss_generator", g_loss)
            G.backward(g_loss)
            G.step()
        finally:
            for p in d_params:
                p.requires_grad_(True)
        out.update(loss_generator=float(g_loss.detach()), loss_adversarial=float(adv.detach()),
                   occupancy_fake=float((fake.detach() > 0).float().mean()),
                   occupancy_real=float((real > 0).float().mean()))
        out.update(grad_norm_metric(G, "grad_norm_generator"))
        return out

    def _physics_loss(self, gate: torch.Tensor, mask: torch.Tensor, code: torch.Tensor, real: torch.Tensor,
                      clusters: torch.Tensor | None = None, generator: nn.Module | None = None,
                      counts: torch.Tensor | None = None) -> torch.Tensor:
        """Squared log ratio of fake to real quantities at the same conditions.

        Pixel: hits per sensor summed over the batch, expected over the gates (sum of
        sigmoid(gate), grown into clusters where the generator grows them), against the real
        batch's; its optimum is the mean occupancy. Calorimeter, per shower (the incident energy
        sets the scale of each):
        hits per shower, expected over the gates as a log-sum-exp of log sigmoid(gate) with no
        epsilon, so every gate keeps a gradient even when the fake shower is empty; analog
        readout adds the deposited / incident energy of the sampled shower (straight-through
        mask x cell energy): its expectation could be met by rare cells of huge energy."""
        valid = self.valid(gate.device)
        if self.layout.kind == "pixel":
            # Hits per sensor summed over the batch (fake events share the real events' conditions):
            # the sums of unpaired events compare means, so the optimum is the mean occupancy. A
            # squared log ratio per event would be minimal at the geometric mean (biased low) and
            # would also squeeze the event-to-event spread; the spread is left to the discriminator.
            # With a count law (`counts`, its seed draws) the seeds are the law's; the term still holds
            # the hits per seed (without it 100 adversarial steps grew the mean cluster size 3.1 -> 3.5).
            fires = counted_seed_probability(gate, counts) if counts is not None else torch.sigmoid(gate)
            if clusters is not None:  # seeds grow into clusters (expected over the draws)
                fires = generator.fire_probability(fires, clusters)
            hits_f = (fires * valid).sum(dim=(0, 2, 3))
            hits_r = (real > 0).float().sum(dim=(0, 2, 3))
            occupancy = ((torch.log1p(hits_f) - torch.log1p(hits_r)) ** 2).mean()
            if not self.cfg.charge_noise:
                return occupancy
            # The first two moments of the encoded charge of the batch's hits, in units of the real
            # spread: the adversarial steps alone let the charge scale drift (pxd-mini, 240 steps:
            # mean pixel charge 56 ADU against 22, docs/results.md).
            hit_r = (real > 0).float()
            n_f, n_r = mask.sum().clamp_min(1.0), hit_r.sum().clamp_min(1.0)
            mean_f, mean_r = (mask * code).sum() / n_f, real.sum() / n_r
            sd_f = ((mask * (code - mean_f) ** 2).sum() / n_f).clamp_min(1e-12).sqrt()
            sd_r = ((hit_r * (real - mean_r) ** 2).sum() / n_r).clamp_min(1e-12).sqrt()
            scale = sd_r.detach().clamp_min(1e-3)
            return occupancy + ((mean_f - mean_r) / scale) ** 2 + ((sd_f - sd_r) / scale) ** 2
        log_p = nn.functional.logsigmoid(gate).masked_fill(valid == 0, -math.inf)
        hits_r = (real > 0).float().sum(dim=(1, 2, 3)).clamp_min(1.0)  # an empty real shower counts as one hit
        loss = (torch.logsumexp(log_p.flatten(1), dim=1) - torch.log(hits_r)) ** 2
        if not self.layout.digital:
            def fraction(m: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # code -> E_cell / E_inc
                return (m * torch.pow(10.0, (c - 1) * CALO_DECADES)).sum(dim=(1, 2, 3))

            floor = 10.0 ** -CALO_DECADES  # one cell at the bottom of the encoding
            e_f, e_r = fraction(mask, code), fraction((real > 0).float(), real)
            loss = loss + (torch.log(e_f + floor) - torch.log(e_r + floor)) ** 2
        return loss.mean()

    # -- validation
    @torch.no_grad()
    def validation_metrics(self, modules: Mapping[str, nn.Module], batch: TorchHits) -> dict[str, float]:
        n = len(batch)
        seeds = [event_seed(0, i, "generate") for i in range(n)]
        fake = self.sample(modules[self.generator_name], batch.conditions, seeds)
        real = batch.to_batch()
        out: dict[str, float] = {}
        hf, hr = fake.hits_per_event.mean(), real.hits_per_event.mean()
        out["hits_per_event_fake"], out["hits_per_event_real"] = float(hf), float(hr)
        out["hits_per_event_rel_error"] = float((hf - hr) / max(hr, 1e-9))
        if self.layout.kind == "pixel":
            per_event = self.geometry.n_channels
            out["occupancy_fake_pct"] = float(100 * hf / per_event)
            out["occupancy_real_pct"] = float(100 * hr / per_event)
            u = self.layout.n_units
            occ_f = _per_unit_counts(fake, "sensor", u)
            occ_r = _per_unit_counts(real, "sensor", u)
            seen = occ_r > 0  # sensors without real hits in this sample have no relative error
            if seen.any():
                out["sensor_occupancy_mean_rel_error"] = float((abs(occ_f - occ_r)[seen] / occ_r[seen]).mean())
            out["charge_mean_fake"] = float(fake.columns["value"].mean()) if fake.n_hits else 0.0
            out["charge_mean_real"] = float(real.columns["value"].mean()) if real.n_hits else 0.0
        else:
            e0 = batch.conditions["incident_energy"].cpu().numpy()
            for tag, hb in (("fake", fake), ("real", real)):
                sums = _per_event_sums(hb)
                out[f"response_{tag}"] = float((sums / e0).mean())
        return out


def hold_charge_at_fit(g: nn.Module) -> None:
    """`charge_at_fit`: the gradients of the charge channels of the generator's head (its only
    trainable charge path: channels s^2 .. 2 s^2, after the gate's) are zeroed, so Adam leaves them
    exactly where the fitted start put them (zero: the charge is the quantile table's, the profile's
    and the shared cluster charge's). The pixel charge spread drifted during the adversarial steps
    (pxd-mini: 19.9 ADU at the start, 20.4-20.9 after 100 steps, data 19.75; docs/results.md). The
    channels share one conv with the gates, which train on: a hook, not requires_grad."""
    s2 = g.shuffle**2
    for p in (g.head.weight, g.head.bias):
        keep = torch.ones(p.shape[0], *[1] * (p.dim() - 1), dtype=p.dtype, device=p.device)
        keep[s2:] = 0.0
        p.register_hook(lambda grad, keep=keep: grad * keep.to(grad.dtype))


def drawn_shape_pixels(g: nn.Module, drawn: GanDraw) -> torch.Tensor:
    """(U,) float64: pixels of the shapes the seeds of `drawn` drew, summed per unit over its events
    (what the placed hits would be without overlaps)."""
    choice = draw_shapes(drawn.seeds, drawn.clusters.detach(), drawn.cluster_draws[:, 0])
    unit = drawn.seeds.nonzero()[:, 1]
    return torch.zeros(g.layout.n_units, dtype=torch.float64, device=unit.device).index_add_(
        0, unit, g.shape_pixels[choice].double())


def _count_level(law: nn.Module) -> torch.Tensor:
    """The per-unit level of a count law's eta (a view: adding to it shifts every unit's log-odds)."""
    return law.bias.data if law.form != "powers" else law.amplitude.data


SHAPE_SMOOTHING = 20.0  # a sensor's shape frequencies: its own clusters plus this many of the global mix


def cluster_shape_keys(batch: HitBatch, geometry, pixels: bool = False) -> tuple[np.ndarray, ...]:
    """Pixel pattern of every cluster of `batch` that fits the shape window: (keys (n, 3) uint64,
    one bit per window position, bit dr * (2 * SHAPE_HALF_COLS + 1) + dc + SHAPE_HALF_COLS
    from the anchor, the cluster's first pixel in row-major order; sensors (n,); events (n,)).
    With `pixels`, also for every pixel of those clusters: its cluster (index into keys), its bit
    and its encoded charge."""
    labels, n = pixel_clusters(batch, geometry)
    if n == 0:
        empty = (np.zeros((0, 3), np.uint64), np.zeros(0, np.int64), np.zeros(0, np.int64))
        return empty + (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)) if pixels else empty
    row, col = batch.columns["row"].astype(np.int64), batch.columns["col"].astype(np.int64)
    order = np.lexsort((col, row, labels))
    lab, row, col = labels[order], row[order], col[order]
    first = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    anchor = np.repeat(first, np.diff(np.r_[first, len(lab)]))
    dr, dc = row - row[anchor], col - col[anchor]
    width = 2 * SHAPE_HALF_COLS + 1
    inside = (dr < SHAPE_ROWS) & (np.abs(dc) <= SHAPE_HALF_COLS)
    fits = np.logical_and.reduceat(inside, first)
    bit = np.where(inside, dr * width + dc + SHAPE_HALF_COLS, 0)
    keys = np.zeros((len(lab), 3), np.uint64)
    keys[np.arange(len(lab)), bit // 64] = np.left_shift(np.uint64(1), (bit % 64).astype(np.uint64))
    keys = np.bitwise_or.reduceat(keys, first, axis=0)
    sensor = batch.columns["sensor"].astype(np.int64)[order][first]
    event = batch.event_index()[order][first]
    if not pixels:
        return keys[fits], sensor[fits], event[fits]
    cluster = np.repeat(np.arange(len(first)), np.diff(np.r_[first, len(lab)]))
    on = fits[cluster]
    index = np.cumsum(fits) - 1  # cluster -> its row among the fitting ones
    code = np.log1p(batch.columns["value"].astype(np.float64)[order]) / math.log1p(geometry.adc_max)
    return keys[fits], sensor[fits], event[fits], index[cluster[on]], bit[on], code[on]


def _fit_shapes(g: nn.Module, census: list[tuple[np.ndarray, ...]],
                cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Fill the generator's shape table with the most frequent training cluster shapes, each
    sensor's log-frequencies of them (smoothed toward the global mix) and the tilt of the shape
    log-odds along log size, linear in the (normalised) conditions `cond` (E, C) of the census
    events (maximum likelihood, L-BFGS; shapes of one size share the tilt, so the likelihood
    needs sums over sizes only). Returns the (U,) float64 mean shape size per sensor at zero
    tilt, d log(mean size) / d conditions (U, C) and the table slot of every census cluster (-1: not
    in the table)."""
    u_n, c_n = g.layout.n_units, cond.shape[1]
    keys = np.concatenate([c[0] for c in census])
    if not len(keys):
        return torch.ones(u_n, dtype=torch.float64), torch.zeros(u_n, c_n, dtype=torch.float64), np.zeros(0, np.int64)
    sensors, events = np.concatenate([c[1] for c in census]), np.concatenate([c[2] for c in census])
    table, inverse, counts = unique_rows(keys)
    top = np.argsort(-counts, kind="stable")[: g.n_shapes]
    slot = np.full(len(table), -1)
    slot[top] = np.arange(len(top))
    slot_of = k_of = slot[inverse.ravel()]
    kept = k_of >= 0
    sensors, events, k_of = sensors[kept], events[kept], k_of[kept]
    per_sensor = np.zeros((u_n, g.n_shapes))
    np.add.at(per_sensor, (sensors, k_of), 1.0)
    mix = per_sensor.sum(0) / per_sensor.sum()
    freq = (per_sensor + SHAPE_SMOOTHING * mix) / (per_sensor.sum(1, keepdims=True) + SHAPE_SMOOTHING)
    bits = np.unpackbits(table[top].view(np.uint8), axis=1, bitorder="little")[:, : SHAPE_ROWS * (2 * SHAPE_HALF_COLS + 1)]
    stencils = torch.zeros_like(g.shape_stencils)
    stencils[: len(top)] = torch.as_tensor(bits.reshape(len(top), SHAPE_ROWS, -1), dtype=stencils.dtype)
    prior = torch.full_like(g.shape_prior, NO_SHAPE)
    prior[:, : len(top)] = torch.as_tensor(np.log(np.maximum(freq[:, : len(top)], 1e-30)), dtype=prior.dtype)
    sizes = stencils.flatten(1).sum(1).double()
    p0 = torch.softmax(prior.double(), dim=-1)  # (U, K)
    log_size = torch.log(sizes.clamp_min(1.0))
    z = torch.zeros_like(log_size)
    used = sizes > 0
    w = torch.as_tensor(mix[: g.n_shapes], dtype=torch.float64)
    z[used] = (log_size[used] - (w * log_size).sum()) / ((w * (log_size - (w * log_size).sum()) ** 2).sum().sqrt() + 1e-12)
    # likelihood of the observed shapes under logits prior + t_e z_k, t_e = cond_e . a
    levels, size_of = torch.unique(sizes[used], return_inverse=True)
    weight = torch.zeros(u_n, len(levels), dtype=torch.float64).index_add_(1, size_of, p0[:, used])  # (U, S)
    z_level = torch.zeros(len(levels), dtype=torch.float64).index_add_(0, size_of, z[used] * 0 + 1)
    z_level = torch.zeros(len(levels), dtype=torch.float64).index_add_(0, size_of, z[used]) / z_level
    n_eu = torch.zeros(len(cond), u_n, dtype=torch.float64)
    n_eu.index_put_((torch.as_tensor(events), torch.as_tensor(sensors)), torch.ones(len(events), dtype=torch.float64), accumulate=True)
    z_sum = torch.zeros(len(cond), dtype=torch.float64).index_add_(0, torch.as_tensor(events), z[torch.as_tensor(k_of)])
    a = torch.zeros(c_n, dtype=torch.float64, requires_grad=True)
    if c_n:
        opt = torch.optim.LBFGS([a], max_iter=100, line_search_fn="strong_wolfe")
        log_w = torch.log(weight.clamp_min(1e-300))

        def nll() -> torch.Tensor:
            opt.zero_grad()
            t = cond @ a  # (E,)
            lse = torch.logsumexp(log_w[None] + t[:, None, None] * z_level[None, None], dim=-1)  # (E, U)
            loss = -((t * z_sum).sum() - (n_eu * lse).sum()) / len(events)
            loss.backward()
            return loss

        opt.step(nll)
    g.shape_stencils.copy_(stencils)
    g.shape_prior.copy_(prior)
    g.shape_log_size.copy_(z.to(g.shape_log_size.dtype))
    g.shape_tilt.copy_(a.detach().to(g.shape_tilt.dtype))
    mean_size = p0 @ sizes
    # d log m / dt at t = 0: Cov(z, size) / m under each sensor's shape mix
    d_log_size = ((p0 @ (z * sizes)) - (p0 @ z) * mean_size) / mean_size
    return mean_size, d_log_size[:, None] * a.detach()[None, :], slot_of


def overlap_events(n: int, pixels_per_event: int) -> np.ndarray:
    """Positions among the `n` fit events that `_correct_overlaps` draws: evenly spread, at most
    OVERLAP_EVENTS and OVERLAP_PIXELS' worth of pixels, at least OVERLAP_MIN_EVENTS (pxd-mini: 256;
    full resolution: 16, each with ~11 k clusters where a pxd-mini event has ~180, so the
    merging is measured as well; 256 full events cost 150 CPU s per round)."""
    want = min(OVERLAP_EVENTS, max(OVERLAP_MIN_EVENTS, OVERLAP_PIXELS // pixels_per_event))
    return np.unique(np.linspace(0, n - 1, min(n, want)).round().astype(np.int64))


def even_thinning(n: int, keep: int) -> torch.Tensor:
    """`keep` indices evenly spread over range(n), first and last included. In float64: a float32
    linspace rounds n - 1 up to n above 2^24 (the 31 M charges of 950 full-resolution events)."""
    return torch.linspace(0, n - 1, keep, dtype=torch.float64).round().long()


def unique_rows(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`np.unique(keys, axis=0, return_inverse=True, return_counts=True)` of an (n, k) integer array,
    the same rows in the same (lexicographic) order, by a lexsort of the columns: np.unique along an
    axis sorts the rows as opaque records, 18x slower on the 11 k clusters of each full-resolution
    event (5.6 M rows: 15.6 against 0.9 CPU s)."""
    if not len(keys):
        return keys[:0], np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.lexsort(keys.T[::-1])
    ordered = keys[order]
    new = np.r_[True, (ordered[1:] != ordered[:-1]).any(axis=1)]
    first = np.flatnonzero(new)
    inverse = np.empty(len(keys), np.int64)
    inverse[order] = np.cumsum(new) - 1
    return ordered[first], inverse, np.diff(np.r_[first, len(keys)])


def mid_ranks(values: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """Mid-rank of each of `values` among `sample`, as a fraction: (#sample < v + #sample <= v) / (2 n).
    Searched among the distinct sample values with their cumulative counts: the charges are 8-bit ADC
    counts, so a few hundred of them, where a search of every pixel in the sorted sample (32 M
    pixels of 950 full-resolution events) missed the cache on every step (minutes)."""
    distinct, counts = np.unique(sample, return_counts=True)
    below = np.r_[0, np.cumsum(counts)]
    lo = below[np.searchsorted(distinct, values, "left")]
    hi = below[np.searchsorted(distinct, values, "right")]
    return (lo + hi) / (2.0 * len(sample))


def _fit_charge_table(g: nn.Module, code: torch.Tensor, profile_scores: np.ndarray | None) -> None:
    """The generator's charge quantile table from the training pixels' encoded charges `code`: the
    knot at standard normal percentile p holds the data's quantile p. With a charge profile the knot
    of score s holds the data's quantile at the fraction of `profile_scores` below s instead: the
    profile's scores (a normal per shape position) mix to heavier tails than one normal, and read at
    normal percentiles they gave pxd-mini pixel charges a spread of 20.9 ADU against the data's 19.8.
    `code`: at most QUANTILE_SAMPLE charges (torch.quantile's input limit)."""
    probs = torch.linspace(0, 1, len(g.charge_quantiles), dtype=torch.float64)
    if profile_scores is not None and len(profile_scores):
        ranked = np.sort(profile_scores)
        probs = torch.as_tensor(np.searchsorted(ranked, torch.special.ndtri(probs).numpy()) / len(ranked))
    g.charge_quantiles.copy_(torch.quantile(code, probs.to(code.dtype)).to(g.charge_quantiles.dtype))


PROFILE_PRIOR = 10.0  # pixels' worth of the overall charge (normal scores 0, 1) in each profile entry


def _fit_charge_profile(g: nn.Module, census: list[tuple[np.ndarray, ...]], slot_of: np.ndarray,
                        codes: np.ndarray) -> tuple[int, np.ndarray]:
    """The generator's charge profile: per table shape and stencil position, the mean and spread of
    the normal scores of the training pixels' charges there (scores from the mid-rank of each charge
    among all training charges `codes`, so the quantile table maps them back), shrunk toward 0 and 1
    by PROFILE_PRIOR pixels. `slot_of`: table slot of every census cluster (-1: not in the table).
    Returns the number of (shape, position) entries with data and the profile's scores (mean +
    spread x a standard normal draw, fixed seed) at every training pixel of a table shape."""
    offsets = np.cumsum([0] + [len(c[0]) for c in census[:-1]])
    cluster = np.concatenate([c[3] + o for c, o in zip(census, offsets, strict=True)])
    bit = np.concatenate([c[4] for c in census])
    value = np.concatenate([c[5] for c in census])
    z = torch.special.ndtri(torch.as_tensor(mid_ranks(value, codes)).clamp(1e-6, 1 - 1e-6)).numpy()
    slot = slot_of[cluster]
    keep = slot >= 0
    window = g.shape_charge_mean[0].numel()
    flat = slot[keep] * window + bit[keep]
    size = g.n_shapes * window
    n = np.bincount(flat, minlength=size)
    mean = np.bincount(flat, z[keep], minlength=size) / (n + PROFILE_PRIOR)
    second = (np.bincount(flat, z[keep] ** 2, minlength=size) + PROFILE_PRIOR) / (n + PROFILE_PRIOR)
    sd = np.sqrt(np.maximum(second - mean**2, 0.01))
    g.shape_charge_mean.copy_(torch.as_tensor(mean.reshape(g.shape_charge_mean.shape)))
    g.shape_charge_sd.copy_(torch.as_tensor(sd.reshape(g.shape_charge_sd.shape)))
    if g.charge_share:
        residual = (z[keep] - mean[flat]) / sd[flat]
        _fit_charge_share(g, slot[keep], cluster[keep], residual)
    if g.charge_bank:
        sensor = np.concatenate([c[1] for c in census])  # of every census cluster
        _fit_charge_bank(g, slot[keep], cluster[keep], bit[keep], value[keep], sensor)
    scores = mean[flat] + sd[flat] * np.random.default_rng(0).standard_normal(len(flat))
    return int((n > 0).sum()), scores


def _fit_charge_bank(g: nn.Module, slot: np.ndarray, cluster: np.ndarray, bit: np.ndarray, code: np.ndarray,
                     sensor: np.ndarray) -> None:
    """The generator's cluster charge bank (`fit_cluster_bank` keyed by table shape): `slot`,
    `cluster`, `bit`, `code`: table slot, census cluster, window bit and encoded charge of every
    training pixel in a table shape; `sensor`: the unit of every census cluster. With
    `bank_per_unit` the kept clusters of each shape are ordered by unit, and each unit's first and
    count are stored."""
    n_units = g.unit_bank_count.shape[0] if g.bank_per_unit else None
    fit = fit_cluster_bank(slot, cluster, bit, code, sensor, g.n_shapes, g.shape_charge_bank.numel(), n_units)
    bank = torch.zeros_like(g.shape_charge_bank)
    bank[: len(fit.values)] = torch.as_tensor(fit.values, dtype=bank.dtype)
    g.shape_charge_bank.copy_(bank)
    g.shape_bank_count.copy_(torch.as_tensor(fit.count, dtype=g.shape_bank_count.dtype))
    g.shape_bank_start.copy_(torch.as_tensor(fit.start, dtype=g.shape_bank_start.dtype))
    if g.bank_per_unit:
        g.unit_bank_count.copy_(torch.as_tensor(fit.unit_count, dtype=g.unit_bank_count.dtype))
        g.unit_bank_first.copy_(torch.as_tensor(fit.unit_first, dtype=g.unit_bank_first.dtype))


SHARE_PRIOR = 50.0  # clusters' worth of the pooled correlation of their size in each shape's


def _fit_charge_share(g: nn.Module, slot: np.ndarray, cluster: np.ndarray, residual: np.ndarray) -> None:
    """The generator's shared cluster charge: per table shape of n pixels, the correlation rho of its
    pixels' residual scores (after the charge profile) from the variance of their mean over each
    training cluster, n Var(mean) = 1 + (n - 1) rho; shrunk toward the pooled value of its size by
    SHARE_PRIOR clusters and kept in [0, 1) (a negative correlation, a fixed total shared out, is
    drawn as independent pixels). `slot`, `cluster`, `residual`: table slot, census cluster and
    residual score of every training pixel in a table shape."""
    _, first, inverse = np.unique(cluster, return_index=True, return_inverse=True)
    size = np.bincount(inverse).astype(np.float64)
    mean_sq = (np.bincount(inverse, residual) / size) ** 2  # the profile's residuals have mean ~0
    shape = slot[first]
    k = g.n_shapes
    count = np.bincount(shape, minlength=k).astype(np.float64)
    n_pix = g.shape_pixels.double().numpy()
    var = np.bincount(shape, mean_sq, minlength=k) / np.maximum(count, 1)
    raw = (n_pix * var - 1) / np.maximum(n_pix - 1, 1)
    pooled = np.zeros(k)
    for n in np.unique(n_pix[n_pix > 1]):
        of = (n_pix == n) & (count > 0)
        if of.any():
            pooled[n_pix == n] = (n * (count[of] * var[of]).sum() / count[of].sum() - 1) / (n - 1)
    rho = (count * raw + SHARE_PRIOR * pooled) / (count + SHARE_PRIOR)
    rho = np.where(n_pix > 1, np.clip(rho, 0.0, 0.95), 0.0)
    g.shape_charge_share.copy_(torch.as_tensor(rho, dtype=g.shape_charge_share.dtype))


def _autocast_like(engine: Engine, device: torch.device):
    """The autocast context the engine's own forward uses (bf16 training), for calls that go
    to its bare module."""
    enabled = getattr(engine, "torch_autocast_enabled", None)
    if enabled is None or not enabled():
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=engine.torch_autocast_dtype())


def _similarity_loss(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """MSE between batch-mean sensor-to-sensor cosine-similarity matrices of coarse
    (4 x 4 pooled) fake and real images."""
    def sim(x: torch.Tensor) -> torch.Tensor:
        b, u = x.shape[:2]
        f = nn.functional.adaptive_avg_pool2d(x.reshape(b * u, 1, *x.shape[2:]), (4, 4)).view(b, u, -1)
        f = nn.functional.normalize(f - f.mean(-1, keepdim=True), dim=-1, eps=1e-6)
        return (f @ f.transpose(1, 2)).mean(0)

    return ((sim(fake) - sim(real).detach()) ** 2).mean()


def _per_unit_counts(hb: HitBatch, column: str, n_units: int):
    return np.bincount(hb.columns[column].astype(np.int64), minlength=n_units) / max(len(hb), 1)


def _per_event_sums(hb: HitBatch):
    return np.add.reduceat(np.append(hb.columns["value"].astype(np.float64), 0.0), hb.offsets[:-1]) * \
        (hb.hits_per_event > 0)
