#!/usr/bin/env python3
"""Renders kustomizations and validates every resource in them, offline.

Built-in kinds are checked with kubernetes-validate's strict schemas (unknown fields are errors)
for each requested Kubernetes version; custom resources are checked against the openAPIV3Schema
of the CustomResourceDefinitions kept in deploy/crds/ (see the README there), with unknown fields
rejected as the API server's strict field validation does. A kind with no schema is an error, not
a warning. Used by scripts/validate-deploy and tests/deploy.

    validate_manifests.py [--kubectl KUBECTL] [--crds DIR] [-k 1.30.0 ...] KUSTOMIZATION_DIR...

Exit status: 0 when everything validates, 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import subprocess
import sys
from typing import Any, Dict, Iterable, List, Tuple

import jsonschema
import yaml

try:
    import kubernetes_validate.utils as kv
except ImportError:  # pragma: no cover - reported by main()
    kv = None

DEFAULT_VERSIONS = ["1.30.0", "1.37.0"]
HERE = pathlib.Path(__file__).resolve().parent


def render(kubectl: str, directory: pathlib.Path) -> List[Dict[str, Any]]:
    """Runs `kubectl kustomize` on a directory and returns its documents."""
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed:\n{result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def crd_to_json_schema(node: Any) -> Any:
    """Turns a structural openAPIV3Schema into a JSON Schema that rejects unknown fields."""
    if isinstance(node, list):
        return [crd_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: Dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: crd_to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = crd_to_json_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = crd_to_json_schema(value)
        elif key in ("description", "default", "example") or key.startswith("x-kubernetes-"):
            continue
        else:
            out[key] = copy.deepcopy(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
        out.pop("nullable", None)
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def load_crds(directory: pathlib.Path) -> Dict[Tuple[str, str], Dict[str, Any]]:
    """Maps (apiVersion, kind) to the JSON Schema of every served version in the CRD files."""
    schemas: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                if not version.get("served", False):
                    continue
                api_version = f"{spec['group']}/{version['name']}"
                schema = crd_to_json_schema(version["schema"]["openAPIV3Schema"])
                schemas[(api_version, spec["names"]["kind"])] = schema
    return schemas


def describe(doc: Dict[str, Any]) -> str:
    name = (doc.get("metadata") or {}).get("name", "<no name>")
    return f"{doc.get('kind', '<no kind>')}/{name}"


def error_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(part) for part in error.absolute_path) or "<root>"


def validate_doc(
    doc: Dict[str, Any], crds: Dict[Tuple[str, str], Dict[str, Any]], versions: Iterable[str]
) -> List[str]:
    """Returns the problems of one rendered resource (empty when it validates)."""
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        return ["not a Kubernetes object (apiVersion and kind are required)"]
    if not (doc.get("metadata") or {}).get("name"):
        return ["metadata.name is missing"]
    key = (doc["apiVersion"], doc["kind"])
    if key in crds:
        validator = jsonschema.Draft202012Validator(crds[key])
        return [
            f"{error_path(error)}: {error.message}"
            for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        ]
    problems = []
    for version in versions:
        try:
            kv.validate(doc, version, strict=True)
        except kv.SchemaNotFoundError:
            return [
                f"no schema for {doc['apiVersion']} {doc['kind']}: not a built-in kind of "
                f"Kubernetes {version} and no CRD for it in deploy/crds"
            ]
        except kv.ValidationError as error:
            problems.append(f"k8s {error.version}: {error_path(error)}: {error.message}")
    return problems


def validate_target(
    kubectl: str,
    directory: pathlib.Path,
    crds: Dict[Tuple[str, str], Dict[str, Any]],
    versions: List[str],
) -> int:
    """Renders and validates one kustomization; prints one line per resource. Returns failures."""
    print(f"== kubectl kustomize {directory} (Kubernetes {', '.join(versions)}, strict)")
    try:
        docs = render(kubectl, directory)
    except RuntimeError as error:
        print(f"  FAIL {error}")
        return 1
    if not docs:
        print("  FAIL rendered no resources")
        return 1
    failures = 0
    for doc in docs:
        problems = validate_doc(doc, crds, versions)
        source = "CRD schema" if (doc.get("apiVersion"), doc.get("kind")) in crds else "built-in"
        if problems:
            failures += 1
            print(f"  FAIL {describe(doc)} ({source})")
            for problem in problems:
                print(f"       {problem}")
        else:
            print(f"  ok   {describe(doc)} ({source})")
    print(f"  {len(docs) - failures}/{len(docs)} resources valid")
    return failures


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubectl", default="kubectl")
    parser.add_argument("--crds", type=pathlib.Path, default=HERE.parent / "crds")
    parser.add_argument("-k", "--kubernetes-version", action="append", dest="versions")
    parser.add_argument("targets", nargs="+", type=pathlib.Path)
    args = parser.parse_args(argv)
    if kv is None:
        print("kubernetes-validate is not installed (pip install -r tests/deploy/requirements.txt)")
        return 1
    crds = load_crds(args.crds)
    if not crds:
        print(f"no CustomResourceDefinitions found in {args.crds}")
        return 1
    print(f"CRD schemas: {', '.join(f'{k} ({a})' for a, k in sorted(crds))}")
    versions = args.versions or DEFAULT_VERSIONS
    failures = sum(validate_target(args.kubectl, t, crds, versions) for t in args.targets)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
