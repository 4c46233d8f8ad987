"""The configs shipped with uhg, and how a path written in a config is resolved.

The repository's top-level configs/ folder travels inside the package as `uhg/configs` (a link
in the source tree, real files in a built wheel), so the same names work from a checkout, an
editable install and an installed wheel:

- run configs and zero-shot protocols by name: `pxd_gan_mini`, `extrapolate_pxd_luminosity`
  (a value naming an existing file is always that file);
- DeepSpeed presets by name inside a config: `train.deepspeed: zero1` (configs/deepspeed/);
- machine scenarios by name: configs/machine/.

Paths written inside a config file resolve relative to that file's folder unless absolute, so a
config works from any working directory. A shipped config is a template: its data and output
paths (stores, output_dir, storage_path) resolve in the working directory instead, so that
`uhg train --config pxd_gan_mini` writes into the folder it runs in, never into the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from uhg.errors import ConfigError

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "configs"
"""uhg/configs: the repository's configs/ folder, inside the installed package."""

FOLDERS = {"run": "", "deepspeed": "deepspeed", "machine": "machine"}
"""Kinds of shipped file -> their sub-folder of SHIPPED_DIR."""


@dataclass(frozen=True)
class ShippedConfig:
    name: str
    kind: str
    """run (a `uhg train` config), protocol (`uhg eval extrapolate`), deepspeed or machine."""
    path: Path
    summary: str
    """The first comment line of the file."""


def _summary(path: Path, width: int = 100) -> str:
    """The first sentence of the file's leading comment block, at most `width` characters."""
    words = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        words += line.lstrip("#").split()
    text = " ".join(words)
    if ". " in text:
        text = text[: text.index(". ") + 1]
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def shipped_configs() -> list[ShippedConfig]:
    """Every shipped YAML, run configs and protocols first, then presets and scenarios."""
    out = []
    for folder_kind, folder in FOLDERS.items():
        for path in sorted((SHIPPED_DIR / folder).glob("*.yaml")):
            kind = folder_kind
            if kind == "run" and path.stem.startswith("extrapolate_"):
                kind = "protocol"
            out.append(ShippedConfig(path.stem, kind, path, _summary(path)))
    return out


def is_shipped(path: Path) -> bool:
    """True if `path` is one of the shipped files (whatever way it was named)."""
    try:
        return path.resolve().is_relative_to(SHIPPED_DIR.resolve())
    except OSError:
        return False


def is_name(value: str) -> bool:
    """A bare name (`zero1`, `pxd_gan_mini`), not a path: no folder part, no .yaml suffix."""
    return "/" not in value and "\\" not in value and not value.endswith((".yaml", ".yml"))


def shipped_path(name: str, kind: str = "run") -> Path:
    """The shipped file called `name` (with or without .yaml) of `kind`; ConfigError listing the
    names there are."""
    folder = SHIPPED_DIR / FOLDERS["run" if kind == "protocol" else kind]
    path = folder / (name if name.endswith(".yaml") else f"{name}.yaml")
    if path.is_file():
        return path
    known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or "none"
    raise ConfigError(f"{name!r} is neither a file nor a shipped {kind} config (shipped: {known}; "
                      "`uhg configs list` shows them all)")


def find_config(value: str | Path, kind: str = "run") -> Path:
    """A config given on the command line: an existing file, else a shipped name."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    if "/" not in str(value):
        return shipped_path(str(value), kind)
    what = "protocol" if kind == "protocol" else "config"
    raise ConfigError(f"{value}: cannot read {what} file (no such file; shipped configs are named without "
                      "a folder, e.g. pxd_gan_mini: `uhg configs list`)")


def resolve_reference(value: str | Path, base: Path, kind: str) -> Path:
    """A file a config refers to (DeepSpeed preset, protocol, machine scenario): a bare name is
    the shipped file of that kind, an absolute path stays, a relative path is taken from `base`
    (the folder of the config that names it)."""
    text = str(value)
    if is_name(text):
        return shipped_path(text, kind)
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


def resolve_path(value: str | Path, base: Path | None) -> Path:
    """A data or output path of a config: absolute stays; relative is taken from `base`, or left
    relative to the working directory when `base` is None (shipped configs, command-line values)."""
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() or base is None else base / path
