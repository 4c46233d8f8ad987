"""Run a zero-shot protocol (`uhg eval extrapolate --config CFG`) and record beside it the
event-wide quantities that a cluster-token transformer's `event_summary` draws, so that its trend
can be checked beyond the training range on the protocol's own samples:

    python tools/extrapolate_event_summary.py CFG OUT.json

The protocol runs unchanged (the same samples, seeds, tables and reports as the plain command);
this only reads the batches it makes. Per test point and sample (reference, reference 2,
generated, overlay baseline) OUT.json holds, over the events: the mean and spread of the event's
log mean shape size and mean charge class over all its cluster tokens (the model's tokenisation,
`HitTransformer.mean_features`), its tokens per sensor, and the summary's fitted trend evaluated
at the sample's conditions and counts (for the references: what the trend says for the true
counts; for the generated events: at the count law's draws); and the summaries the generator
actually drew. OUT_pointK.npz keeps the per-event values (features, normalised conditions,
tokens per sensor) for `tools/event_summary_trend.py`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

import uhg.eval.extrapolate as ex
from uhg.models.generator import Generator
from uhg.sparse.torch_hits import TorchHits


def event_features(module, norm, batch) -> dict[str, np.ndarray]:
    """Per event of `batch`: f (B, 2) log mean shape size and mean charge class of all its tokens,
    cond (B, C) normalised conditions, counts (B, U) tokens per sensor."""
    with torch.no_grad():
        tokens = module.tokenize(TorchHits.from_batch(batch))
        sums = module.token_sums(tokens.values, tokens.hit_mask()).view(len(batch), -1, 3).sum(1).double()
        f = module.mean_features(*sums.unbind(-1))
        cond = norm({k: torch.as_tensor(np.asarray(v, np.float64)) for k, v in batch.conditions.items()
                     if k in norm.names}).double()
    return {"f": f.numpy(), "cond": cond.numpy(), "counts": tokens.lengths.view(len(batch), -1).numpy()}


def main() -> None:
    cfg_path, out_json = sys.argv[1], Path(sys.argv[2])
    stash, drawn, records = [], [], []
    features_of, count_law_band, load = ex.features_of, ex.count_law_band, Generator.load.__func__

    def keep_features(batch, geometry):
        stash.append(batch)
        return features_of(batch, geometry)

    def load_recording(cls, *a, **k):  # record the summaries the generator draws
        g = load(cls, *a, **k)
        if getattr(g.module.config, "event_summary", False):
            draw = g.module.draw_event_summary

            def recorded(cond, counts, u):
                r = draw(cond, counts, u)
                drawn.append(r.detach().double())
                return r
            g.module.draw_event_summary = recorded
        return g

    def band_and_summary(generator, reference):  # called once per point, after all its samples
        result = count_law_band(generator, reference)
        module, norm = generator.module, generator.family.condition_norm
        roles = ["reference", "reference 2", "generated", "baseline"][:len(stash)]
        rec, per_event = {"luminosity": float(np.mean(reference.conditions["luminosity"]))}, {}
        for role, batch in zip(roles, stash, strict=True):
            e = event_features(module, norm, batch)
            trend = module.summary_design(torch.as_tensor(e["cond"]), torch.as_tensor(e["counts"])) @ module.summary_trend.double()
            rec[role] = {"events": len(batch), "tokens_per_unit": float(e["counts"].mean()),
                         "log_size_mean": float(e["f"][:, 0].mean()), "log_size_sd": float(e["f"][:, 0].std(ddof=1)),
                         "charge_class_mean": float(e["f"][:, 1].mean()), "charge_class_sd": float(e["f"][:, 1].std(ddof=1)),
                         "trend_log_size": float(trend[:, 0].mean()), "trend_charge_class": float(trend[:, 1].mean())}
            per_event |= {f"{role}_{k}": v for k, v in e.items()}
        if drawn:  # generation pads a last partial micro-batch with copies of its first event
            d = torch.cat(drawn)
            rec["drawn"] = {"rows": len(d), "log_size_mean": float(d[:, 0].mean()), "charge_class_mean": float(d[:, 1].mean())}
        records.append(rec)
        np.savez_compressed(out_json.with_name(f"{out_json.stem}_point{len(records) - 1}.npz"), **per_event)
        out_json.write_text(json.dumps(records, indent=1))
        print("event summary:", json.dumps(rec), flush=True)
        stash.clear()
        drawn.clear()
        return result

    ex.features_of, ex.count_law_band, Generator.load = keep_features, band_and_summary, classmethod(load_recording)
    torch.set_num_threads(1)
    cfg = ex.load_protocol(cfg_path)
    if isinstance(cfg.machine, list):
        ex.run_scenarios(cfg)
        print((Path(cfg.out) / "scenarios.md").read_text())
    else:
        print(ex.run_protocol(cfg).summary())


if __name__ == "__main__":
    main()
