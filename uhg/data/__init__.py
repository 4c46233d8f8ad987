"""Sparse event data: hit batches, Zarr stores, importers and torch loaders."""

from uhg.data.hits import CaloEvent, HitBatch, PixelEvent

__all__ = ["CaloEvent", "HitBatch", "PixelEvent"]
