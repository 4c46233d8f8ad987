"""Evaluation of generated events against reference events (docs/evaluation.md).

- `features_pxd.pxd_features`, `features_calo.calo_features`: features of a HitBatch on sparse hits
- `distances`: separation power, Wasserstein-1, KS (weighted), common binning
- `compare.compare`: every metric as generated-vs-reference value and reference-vs-reference floor
- `classifier`: calibrated classifier two-sample test (ROC AUC)
- `evaluate.evaluate_stores`: `uhg eval` (stores -> metrics.json/md, figures, report.html, MLflow)
- `extrapolate.run_protocol`: `uhg eval extrapolate`, the zero-shot protocol with naive `baselines`
- `quick.validation_metrics`: a cheap subset for validation during training
"""
