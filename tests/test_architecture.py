"""The import graph of uhg follows the layer map of docs/architecture.md.

Every module under uhg/ is parsed (not imported) and every `import` in it counts, at module
level or inside a function, as does a lazily imported "uhg.module:attribute" registry target.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "uhg"
MAP = ROOT / "docs" / "architecture.md"
LAZY_TARGET = re.compile(r"^(uhg(?:\.\w+)+):\w+$")
MODEL_FORBIDDEN = ("ray", "mlflow", "deepspeed")


def layer_map(text: str) -> tuple[dict[str, int], set[tuple[str, str]]]:
    """({unit: layer index, 0 = top}, {(a, b): a must not import b}) from the ```layers block."""
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, f"{MAP}: no ```layers block"
    layer: dict[str, int] = {}
    forbidden: set[tuple[str, str]] = set()
    for i, line in enumerate(block.group(1).split("\n")):
        if not line.strip():
            continue
        ops = set(re.findall(r"<>|>|\|", line))
        assert len(ops) <= 1, f"{MAP}: one kind of separator per line: {line!r}"
        units = [u.strip() for u in re.split(r"<>|>|\|", line)]
        for u in units:
            assert re.fullmatch(r"\w+", u) and u not in layer, f"{MAP}: bad or repeated name {u!r}"
            layer[u] = i
        for j, a in enumerate(units):
            for b in units[j + 1:]:
                if ops == {">"}:
                    forbidden.add((b, a))
                elif ops == {"|"}:
                    forbidden |= {(a, b), (b, a)}
    return layer, forbidden


def unit_of(module: str) -> str:
    """The map entry of a dotted module name: its top-level package or module below uhg."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "uhg"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, module: str, lazy: bool = True) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in the file of `module`, relative ones
    resolved; with `lazy`, also the "uhg.module:attribute" targets it imports by name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module.split(".")
    if path.name != "__init__.py":
        here = here[:-1]  # the package a relative import starts from
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            found.append((node.lineno, base))
        elif lazy and isinstance(node, ast.Constant) and isinstance(node.value, str):
            target = LAZY_TARGET.match(node.value)
            if target:
                found.append((node.lineno, target.group(1)))
    return found


def violations(files: dict[str, Path], layer: dict[str, int], forbidden: set[tuple[str, str]]) -> list[str]:
    """'module:line: a imports b' for every import of `files` ({module: path}) against the map."""
    wrong = []
    for module, path in sorted(files.items()):
        source = unit_of(module)
        for line, name in imports(path, module):
            if name != "uhg" and not name.startswith("uhg."):
                continue
            target = unit_of(name)
            if target != source and (layer[target] < layer[source] or (source, target) in forbidden):
                wrong.append(f"{module}:{line}: {source} imports {name}")
    return wrong


FILES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_the_map_names_every_package_and_module() -> None:
    layer, _ = layer_map(MAP.read_text())
    units = {unit_of(m) for m in FILES}
    assert units - set(layer) == set(), "packages missing from docs/architecture.md"
    assert set(layer) - units == set(), "names in docs/architecture.md that are not in uhg/"


def test_imports_point_down_the_layer_map() -> None:
    wrong = violations(FILES, *layer_map(MAP.read_text()))
    assert wrong == [], "imports against docs/architecture.md:\n" + "\n".join(wrong)


def import_cycles(files: dict[str, Path]) -> list[list[str]]:
    """Groups of modules of `files` that import each other (directly or round a loop). A
    registry's lazy "module:attribute" targets do not count: they are imported on first use,
    after both modules are loaded."""
    graph = {m: sorted({n for _, n in imports(p, m, lazy=False) if n in files} - {m}) for m, p in files.items()}
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:  # Tarjan's strongly connected components
        order[m] = low[m] = len(order)
        stack.append(m)
        for n in graph[m]:
            if n not in order:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in stack:
                low[m] = min(low[m], order[n])
        if low[m] == order[m]:
            group = []
            while not group or group[-1] != m:
                group.append(stack.pop())
            if len(group) > 1:
                cycles.append(sorted(group))

    for m in sorted(graph):
        if m not in order:
            visit(m)
    return cycles


def test_no_two_modules_import_each_other() -> None:
    assert import_cycles(FILES) == []


def test_a_cycle_is_found(tmp_path: Path) -> None:
    sources = {"uhg.data.store": "from uhg.data.reader import Store\n",
               "uhg.data.reader": "def f():\n    from uhg.data.store import PARTS\n",
               "uhg.data.hits": "", "uhg.data.writer": "from uhg.data.hits import HitBatch\n"}
    files = {}
    for module, text in sources.items():
        files[module] = tmp_path / f"{module}.py"
        files[module].write_text(text)
    assert import_cycles(files) == [["uhg.data.reader", "uhg.data.store"]]


def test_models_know_nothing_of_ray_mlflow_or_deepspeed() -> None:
    wrong = [f"{m}:{line}: {name}" for m, path in sorted(FILES.items()) if unit_of(m) == "models"
             for line, name in imports(path, m) if name.split(".")[0] in MODEL_FORBIDDEN]
    assert [m for m in FILES if unit_of(m) == "models"], "no uhg.models modules found"
    assert wrong == []


@pytest.mark.parametrize("source, expect", [
    ("def f():\n    from uhg.train.loop import train\n", ["uhg.train.loop"]),
    ("import uhg.eval.report as r\n", ["uhg.eval.report"]),
    ("from . import family\n", ["uhg.models"]),
    ("from .common import EMA\n", ["uhg.models.common"]),
    ("TARGETS = {'gan': 'uhg.train.gan_family:GanFamily'}\n", ["uhg.train.gan_family"]),
])
def test_the_walker_sees_function_level_relative_and_lazy_imports(tmp_path: Path, source: str, expect: list[str]) -> None:
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert [name for _, name in imports(path, "uhg.models.probe")] == expect


def test_upward_and_forbidden_imports_are_reported(tmp_path: Path) -> None:
    layer, forbidden = layer_map("```layers\ncli\ntrain > generate\nmodels | sim\nerrors\n```")
    assert layer == {"cli": 0, "train": 1, "generate": 1, "models": 2, "sim": 2, "errors": 3}
    assert forbidden == {("generate", "train"), ("models", "sim"), ("sim", "models")}
    sources = {
        "uhg.models.net": "import torch\nfrom uhg.errors import ConfigError\ndef f():\n    import uhg.cli.main\n",
        "uhg.generate.run": "from uhg.models.net import f\nfrom uhg.train.loop import train\n",
        "uhg.train.loop": "from uhg.generate.run import f\n",
        "uhg.sim.pxd": "from uhg.models import net\n",
    }
    files = {}
    for module, text in sources.items():
        files[module] = tmp_path / f"{module}.py"
        files[module].write_text(text)
    assert violations(files, layer, forbidden) == [
        "uhg.generate.run:2: generate imports uhg.train.loop",
        "uhg.models.net:4: models imports uhg.cli.main",
        "uhg.sim.pxd:1: sim imports uhg.models",
    ]
