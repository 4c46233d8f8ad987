"""Derive the JSON schemas that tests/test_cluster_recipes.py checks cluster/k8s/*.yaml against
from KubeRay's published CRDs (ray-operator/config/crd/bases/ray.io_{rayjobs,rayclusters}.yaml of
a KubeRay release), so the test runs offline:

    python tools/kuberay_schema.py v1.7.0 ray.io_rayjobs.yaml ray.io_rayclusters.yaml

writes tests/data/kuberay/{rayjob,raycluster}-ray-v1.json. The API server validates a custom
resource against the CRD's openAPIV3Schema and, with strict field validation (kubectl's default),
refuses unknown fields; plain JSON Schema allows them. So every object that lists its
properties and does not carry `x-kubernetes-preserve-unknown-fields` is closed here
(`additionalProperties: false`), and `x-kubernetes-int-or-string` becomes "integer or
string". Descriptions and the status subtree are dropped (nobody writes them), which keeps
the files small.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "kuberay"
SOURCE = "https://github.com/ray-project/kuberay/blob/{tag}/ray-operator/config/crd/bases/{name}"


def to_json_schema(node: Any) -> Any:
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items()
           if k != "description" and not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    if "properties" in out:  # property names are data, not schema keywords
        out["properties"] = {name: to_json_schema(sub) for name, sub in node["properties"].items()}
    return out


def derive(crd_file: Path, tag: str) -> tuple[str, dict]:
    crd = yaml.safe_load(crd_file.read_text())
    kind = crd["spec"]["names"]["kind"]
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = to_json_schema(version["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)
    # apiVersion/kind are fixed for this file; the API server checks them before the schema.
    schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/v1"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    schema["properties"]["metadata"] = {
        "type": "object", "required": ["name"],
        "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                       "labels": {"type": "object"}, "annotations": {"type": "object"}},
        "additionalProperties": False,
    }
    header = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$comment": (f"Derived by tools/kuberay_schema.py from KubeRay {tag} "
                     f"{SOURCE.format(tag=tag, name=crd_file.name)} (Apache-2.0), "
                     f"openAPIV3Schema of {kind} ray.io/v1"),
    }
    return kind.lower(), {**header, **schema}


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    tag, files = argv[0], argv[1:]
    OUT.mkdir(parents=True, exist_ok=True)
    for f in files:
        kind, schema = derive(Path(f), tag)
        target = OUT / f"{kind}-ray-v1.json"
        target.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
        print(f"{target}: {target.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
