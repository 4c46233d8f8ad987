"""Read a run configuration from YAML plus `--set key=value` overrides.

Overrides use dotted keys into the YAML tree (`train.steps=20`, `model.embed_dim=64`,
`data.store=[a.zarr,b.zarr]`); values are parsed as YAML, so numbers, booleans, lists and null
work as they would in the file. Every problem is a ConfigError naming the file, the dotted key
and what was expected.

Paths written in the file resolve relative to the file's folder (see `uhg.config.shipped`:
shipped configs keep their data and output paths in the working directory); paths given with
`--set` are relative to the working directory, as on any command line. Files a config refers to
(`train.deepspeed`, `evaluate.extrapolation`, `data.simulate.machine`) may also be shipped names
(`zero1`, `squeeze`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from uhg.config.schema import RunConfig
from uhg.config.shipped import find_config, is_shipped, resolve_path, resolve_reference
from uhg.errors import ConfigError

DATA_PATHS = (("data", "store"), ("output_dir",), ("distributed", "storage_path"))
"""Keys holding data or output paths (resolved from the config's folder)."""
REFERENCES = {("train", "deepspeed"): "deepspeed", ("evaluate", "extrapolation"): "protocol",
              ("data", "simulate", "machine"): "machine"}
"""Keys naming another config file -> the kind of shipped file a bare name means."""


def load_config(path: str | Path, overrides: Iterable[str] = (), *, base: Path | None = None) -> RunConfig:
    """The validated `RunConfig` of the YAML file at `path` (a file, or the name of a shipped
    config) with `overrides` applied. Relative paths in the file resolve from `base`, by default
    the file's own folder (`ray job submit` passes the folder under UHG_ROOT)."""
    path = find_config(path)
    raw = read_yaml_mapping(path, "config file", "of sections (name, geometry, data, model, train, ...)")
    config_dir = (base if base is not None else path.parent).expanduser().resolve()
    data_dir = None if is_shipped(config_dir / path.name) else config_dir
    resolve_paths(raw, config_dir, data_dir, source=path)
    for item in overrides:
        key = apply_override(raw, item, source=path)
        resolve_paths(raw, Path.cwd(), None, source=path, only=key)
    return config_from_dict(raw, source=path)


def read_yaml_mapping(path: Path, what: str, expected: str) -> dict[str, Any]:
    """The mapping at the top of the YAML file at `path` (a config, protocol or machine scenario);
    a ConfigError naming the file when it cannot be read, is not YAML, or is not a mapping
    (`expected` says what the mapping holds)."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read {what} ({err.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping {expected}")
    return raw


def resolve_paths(raw: dict[str, Any], config_dir: Path, data_dir: Path | None, *, source: str | Path,
                  only: tuple[str, ...] | None = None) -> None:
    """Resolve in place the path keys of `raw` (all, or the one key `only`): references from
    `config_dir`, data and output paths from `data_dir` (None: left relative to the cwd)."""
    for key in (*DATA_PATHS, *REFERENCES):
        if only is not None and key != only:
            continue
        parent = raw
        for part in key[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or not isinstance(parent.get(key[-1]), str | list):
            continue
        value = parent[key[-1]]
        if key in REFERENCES:
            if isinstance(value, str):
                try:
                    parent[key[-1]] = str(resolve_reference(value, config_dir, REFERENCES[key]))
                except ConfigError as err:
                    raise ConfigError(f"{source}: {'.'.join(key)}: {err}") from None
            continue
        values = value if isinstance(value, list) else [value]
        # object-store URIs (s3://...) are not paths
        done = [str(resolve_path(v, data_dir)) if isinstance(v, str) and "://" not in v else v for v in values]
        parent[key[-1]] = done if isinstance(value, list) else done[0]


def config_from_dict(raw: Mapping[str, Any], source: str | Path = "<config>") -> RunConfig:
    """Validate a plain dict (e.g. a resolved config stored with a checkpoint or export)."""
    try:
        return RunConfig.model_validate(dict(raw))
    except ValidationError as err:
        raise ConfigError(f"{source}: " + describe_errors(err)) from None


def apply_override(raw: dict[str, Any], item: str, source: str | Path = "<config>") -> tuple[str, ...]:
    """Set `a.b.c=value` in the nested dict `raw` (value parsed as YAML), creating sections;
    returns the key as a tuple."""
    if "=" not in item:
        raise ConfigError(f"{source}: override {item!r} must look like key=value (e.g. train.steps=20)")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{source}: override {item!r} has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: override {key}: value {text!r} is not valid YAML ({err})") from None
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: override {key}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value
    return tuple(parts)


def describe_errors(err: ValidationError) -> str:
    """One line per problem: `dotted.key: what was wrong (got value)`."""
    lines = []
    for e in err.errors():
        # Discriminated unions put the tag in the location (model.gan.z_dim): drop it.
        loc = [str(p) for p in e["loc"] if p not in ("gan", "transformer", "function-after[_one_or_many(), list[Path]]")]
        key = ".".join(loc) or "<top level>"
        kind = e["type"]
        if kind in ("union_tag_invalid", "union_tag_not_found"):
            key += ".family"
        if kind == "extra_forbidden":
            msg = "unknown key (check spelling; see the commented configs in configs/)"
        elif kind == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"]
            if "input" in e and not isinstance(e["input"], dict):
                msg += f" (got {e['input']!r})"
        lines.append(f"{key}: {msg}")
    return "; ".join(lines) if len(lines) == 1 else "\n  " + "\n  ".join(lines)


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """JSON-able dict of the resolved config (paths as strings)."""
    return cfg.model_dump(mode="json")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {dotted.key: value} (lists kept as values), for tracking params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
