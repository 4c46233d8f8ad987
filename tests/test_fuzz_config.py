"""Property-based tests: malformed configs end in ConfigError, never another exception or a hang.

Three sources of bad input: random YAML text, random nesting/values replacing parts of a valid
config, and random `--set` overrides. Each example is validated with `load_config`, the path
`uhg train` takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uhg.config import load_config
from uhg.errors import ConfigError

VALID = {
    "name": "fuzz",
    "geometry": "pxd-tiny",
    "seed": 1,
    "data": {"store": "data/x.zarr", "validation_events": 4},
    "model": {"family": "gan", "z_dim": 8},
    "train": {"steps": 4, "batch_size": 2},
    "distributed": {"workers": 2},
}

FUZZ = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["..", "../x", "/etc", "1e400", "nan", "-1", "[", "{a: 1}", "\x00"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=8)
key_paths = st.sampled_from([
    ("name",), ("geometry",), ("seed",), ("data",), ("data", "store"), ("data", "validation_events"),
    ("model",), ("model", "family"), ("model", "z_dim"), ("train",), ("train", "steps"), ("train", "batch_size"),
    ("train", "lr"), ("train", "nonfinite"), ("distributed",), ("distributed", "workers"),
    ("distributed", "storage_path"), ("tracking",), ("output_dir",), ("unknown_key",),
])


def _load(tmp_path: Path, text: str, overrides: list[str] | None = None) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(path, overrides or [])
    except ConfigError as err:
        assert str(err), "a ConfigError must carry a message"


def _replace(raw: dict[str, Any], keys: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = yaml.safe_load(yaml.safe_dump(raw))
    node = out
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value
    return out


def test_the_valid_base_config_loads(tmp_path: Path) -> None:
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(VALID))
    assert load_config(tmp_path / "ok.yaml").name == "fuzz"


@FUZZ
@given(text=st.text(max_size=200))
def test_random_text_gives_config_error(tmp_path: Path, text: str) -> None:
    _load(tmp_path, text)


@FUZZ
@given(edits=st.lists(st.tuples(key_paths, values), min_size=1, max_size=3))
def test_damaged_valid_config_gives_config_error(tmp_path: Path, edits: list) -> None:
    raw: dict[str, Any] = VALID
    for keys, value in edits:
        raw = _replace(raw, keys, value)
    try:
        text = yaml.safe_dump(raw, allow_unicode=True)
    except yaml.YAMLError:
        return
    _load(tmp_path, text)


@FUZZ
@given(overrides=st.lists(st.text(max_size=30), min_size=1, max_size=3))
def test_random_overrides_give_config_error(tmp_path: Path, overrides: list[str]) -> None:
    _load(tmp_path, yaml.safe_dump(VALID), overrides)


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "x/../../y", ""])
def test_run_names_cannot_leave_the_runs_folder(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="name"):
        load_config(_write(tmp_path, _replace(VALID, ("name",), name)))


def _write(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path
