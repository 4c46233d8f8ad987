"""Sparse Zarr v3 event stores: the layout, codecs and part bookkeeping that writing
(`uhg.data.writer`) and reading (`uhg.data.reader`) share.

Layout of a store directory (schema "uhg-store/1"):

    STORE/zarr.json            root group; attributes: schema, kind, geometry, geometry_spec,
                               units, conditions {name: {min, max, unit}}, extra_columns,
                               n_events, part_size, n_parts, encoding, provenance,
                               attributes (caller's metadata)
    STORE/parts/zarr.json      group holding the committed parts
    STORE/parts/p000003/       part 3 = events [3*part_size, min(4*part_size, n_events)):
        channel                (n_hits,) uint32 flat channel index (see uhg.sparse.dense),
                               sorted within each event; Delta filter + Blosc zstd byte-shuffle
        value                  (n_hits,) uint8 ADC (pixel) or float32 MeV (calo)
        <extra>                (n_hits,) optional extra hit columns declared in `extra_columns`
                               (e.g. `origin` uint8 of overlay hits)
        event_offsets          (n_events+1,) int64, event j owns hits [off[j], off[j+1])
        conditions/<name>      (n_events,) float64 per-event condition in its declared unit
    STORE/.partial/            parts being written (not part of the Zarr hierarchy)

A part is written complete into `.partial/` and then renamed into `parts/` with one atomic
`os.rename`, so readers never see half a part, a killed writer leaves only a stale temporary
directory, a rerun writes only `missing_parts`, and processes writing disjoint parts never touch
the same file. Every chunk is written (also all-zero ones) and carries a CRC32, so a missing or
damaged chunk is reported instead of read as zeros.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from uhg.data.hits import EXTRA_COLUMNS
from uhg.errors import StoreError

SCHEMA = "uhg-store/1"
PARTS = "parts"
PARTIAL = ".partial"
CHUNK_ELEMENTS = 1 << 21  # 2 Mi hits per chunk: 8 MB of uint32 channels, well above zarr's 1 MB advice
UNITS = {
    "pixel": {"value": "ADC counts (ADU, 8 bit)", "sensor": "sensor index (geometry order)",
              "row": "pixel index in r-phi", "col": "pixel index along z"},
    "calo": {"value": "MeV", "layer": "layer index", "cell": "cell index within the layer (alpha, radial)"},
}

# zarr warns for every numcodecs codec (Delta, CRC32) and for the `.partial` directory.
warnings.filterwarnings("ignore", message=".*Numcodecs codecs are not in the Zarr version 3 specification.*")
warnings.filterwarnings("ignore", message=r".*Object at \.partial is not recognized.*")


def zarr_module():
    """zarr, imported on first use (importing uhg.data stays cheap)."""
    import zarr

    return zarr


def codecs_for(kind: str) -> dict[str, dict[str, Any]]:
    """Codec settings per array, chosen by measurement (docs/data.md, docs/benchmarks.md)."""
    from zarr.codecs import BloscCodec, ZstdCodec
    from zarr.codecs.numcodecs import CRC32, Delta

    def blosc(shuffle: str) -> BloscCodec:
        return BloscCodec(cname="zstd", clevel=5, shuffle=shuffle)

    value_shuffle = "noshuffle" if kind == "pixel" else "shuffle"  # byte-shuffle is a no-op for uint8
    return {
        "channel": {"filters": [Delta(dtype="uint32")], "compressors": [blosc("shuffle"), CRC32()]},
        "value": {"filters": None, "compressors": [blosc(value_shuffle), CRC32()]},
        "extra": {"filters": None, "compressors": [blosc("noshuffle"), CRC32()]},
        "event_offsets": {"filters": [Delta(dtype="int64")], "compressors": [ZstdCodec(level=3), CRC32()]},
        "condition": {"filters": None, "compressors": [ZstdCodec(level=3), CRC32()]},
    }


ENCODING = {
    "channel": "uint32 flat channel index; numcodecs Delta(uint32) + Blosc zstd 5 shuffle + CRC32",
    "value": "Blosc zstd 5 (noshuffle for uint8, shuffle for float32) + CRC32",
    "extra": "Blosc zstd 5 noshuffle + CRC32",
    "event_offsets": "int64; numcodecs Delta(int64) + zstd 3 + CRC32",
    "conditions": "float64; zstd 3 + CRC32",
}


def jsonable(obj: Any) -> Any:
    """Round-trip through JSON so plans compare equal to what the store holds."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """Root attributes of a uhg store; StoreError if `path` is not one (or of another schema)."""
    path = Path(path)
    meta = path / "zarr.json"
    if not path.exists():
        raise StoreError(f"store {path} does not exist")
    if not meta.is_file():
        raise StoreError(f"{path} is not a Zarr store (no zarr.json)")
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError) as err:
        raise StoreError(f"store {path}: cannot parse {meta}: {err}") from err
    if not isinstance(doc, dict):
        raise StoreError(f"store {path}: corrupt metadata in {meta}: not a JSON object")
    attrs = doc.get("attributes", {})
    schema = attrs.get("schema") if isinstance(attrs, dict) else None
    if schema is None:
        raise StoreError(f"{path} is a Zarr {doc.get('node_type', 'node')} but not a uhg store (no 'schema' attribute)")
    if schema != SCHEMA:
        raise StoreError(f"store {path} has schema {schema!r}; this uhg reads {SCHEMA!r}")
    problem = _plan_problem(attrs)
    if problem:
        raise StoreError(f"store {path}: corrupt metadata in {meta}: {problem}")
    return attrs


def _plan_problem(attrs: Any) -> str | None:
    """What is structurally wrong with root attributes read back from disk (damaged or hand-
    edited zarr.json), or None: readers index into them without further checks."""
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(attrs, dict):
        return "'attributes' is not a mapping"
    if not isinstance(attrs.get("kind"), str) or attrs["kind"] not in UNITS:
        return f"'kind' is {attrs.get('kind')!r}, expected one of {sorted(UNITS)}"
    for key in ("n_events", "part_size", "n_parts"):
        if not is_int(attrs.get(key)) or attrs[key] < (1 if key == "part_size" else 0):
            return f"{key!r} is {attrs.get(key)!r}, expected a non-negative integer"
    if attrs["n_parts"] != math.ceil(attrs["n_events"] / attrs["part_size"]):
        return (f"'n_parts' {attrs['n_parts']} does not match n_events {attrs['n_events']} / "
                f"part_size {attrs['part_size']}")
    if not isinstance(attrs.get("geometry"), str) or not isinstance(attrs.get("geometry_spec"), dict):
        return "'geometry' / 'geometry_spec' missing or of the wrong type"
    conditions = attrs.get("conditions")
    if not isinstance(conditions, dict) or not all(
            isinstance(c, dict) and isinstance(c.get("min"), int | float) and isinstance(c.get("max"), int | float)
            and isinstance(c.get("unit"), str) for c in conditions.values()):
        return "'conditions' must map each name to {min, max, unit}"
    extra = attrs.get("extra_columns")
    if not isinstance(extra, dict) or not set(extra) <= set(EXTRA_COLUMNS):
        return f"'extra_columns' is {extra!r}, expected a mapping over {sorted(EXTRA_COLUMNS)}"
    return None


def part_range(attrs: Mapping[str, Any], part_index: int) -> tuple[int, int]:
    """(start, stop) event range of a part."""
    start = part_index * attrs["part_size"]
    return start, min(start + attrs["part_size"], attrs["n_events"])


def part_name(part_index: int) -> str:
    return f"p{part_index:06d}"


def missing_parts(path: str | os.PathLike) -> list[int]:
    """Indices of the parts not yet committed, in order."""
    path = Path(path)
    attrs = read_attrs(path)
    done = set(os.listdir(path / PARTS))
    return [i for i in range(attrs["n_parts"]) if part_name(i) not in done]
