"""Sparse event data: hit batches, Zarr stores, importers and torch loaders."""

from uhg.data.hits import CaloEvent, HitBatch, PixelEvent
from uhg.data.layout import missing_parts
from uhg.data.parallel import fill_store
from uhg.data.reader import Store, open_store
from uhg.data.writer import create_store, write_part

__all__ = ["CaloEvent", "HitBatch", "PixelEvent", "Store", "create_store", "fill_store", "missing_parts",
           "open_store", "write_part"]
