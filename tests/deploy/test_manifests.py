"""deploy/: every manifest parses and carries what KServe's CRDs require; the Containerfile is
read, not built (no container engine on the test box): FROM, a non-root USER, ENTRYPOINT."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(DEPLOY.rglob("*.yaml")) for d in _docs(p)]


def test_every_manifest_parses_with_kind_and_name() -> None:
    docs = _all()
    assert {d["kind"] for _, d in docs} >= {"ServingRuntime", "InferenceService"}
    for path, doc in docs:
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], path
        assert isinstance(doc.get("kind"), str), path
        name = doc.get("metadata", {}).get("name")
        assert isinstance(name, str) and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), (path, name)


def _one(kind: str) -> dict:
    (doc,) = [d for _, d in _all() if d["kind"] == kind]
    return doc


def test_serving_runtime() -> None:
    rt = _one("ServingRuntime")
    assert rt["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = rt["spec"]
    assert spec["protocolVersions"] == ["v2", "grpc-v2"]
    formats = {f["name"]: f for f in spec["supportedModelFormats"]}
    assert set(formats) >= {"onnx", "pytorch", "huggingface"}
    for f in formats.values():
        assert isinstance(f["version"], str) and f["autoSelect"] is True
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"  # the name KServe merges the predictor into
    assert isinstance(container["image"], str) and ":" in container["image"]
    assert isinstance(container["args"], list) and all(isinstance(a, str) for a in container["args"])
    assert "lastmile serve" in " ".join(container["args"])
    ports = {p["containerPort"]: p for p in container["ports"]}
    assert set(ports) == {8080, 8081} and all(p["protocol"] == "TCP" for p in ports.values())
    assert ports[8081]["name"] == "h2c"  # KServe's gRPC port name
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e for e in container["env"]}
    assert env["LASTMILE_STORE"]["value"] == "/mnt/models"
    assert env["LASTMILE_HTTP_PORT"]["value"] == "8080" and env["LASTMILE_GRPC_PORT"]["value"] == "8081"
    assert env["LASTMILE_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "lastmile-token"
    # every LASTMILE_* variable is one the daemon reads
    from lastmile.appliance.server.config import ENVIRONMENT

    known = {*ENVIRONMENT, "LASTMILE_SOCKET", "LASTMILE_LOAD", "LASTMILE_TOKEN", "LASTMILE_CONFIG"}
    assert {n for n in env if n.startswith("LASTMILE_")} <= known
    mounts = {m["name"] for m in container["volumeMounts"]}
    assert mounts <= {v["name"] for v in spec["volumes"]}


def test_inference_service_uses_the_runtime() -> None:
    isvc = _one("InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == _one("ServingRuntime")["metadata"]["name"]
    formats = {f["name"] for f in _one("ServingRuntime")["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert model["protocolVersion"] in _one("ServingRuntime")["spec"]["protocolVersions"]
    assert re.match(r"^(s3|gs|pvc|https?|hf|oci)://", model["storageUri"])
    secret = _one("Secret")
    assert len(secret["stringData"]["token"]) >= 16  # the daemon's minimum


def test_containerfile() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    instructions = [ln.split(None, 1)[0].upper() for ln in lines if not ln.startswith(("&&", "--")) and ln.split(None, 1)[0].isupper()]
    assert instructions.count("FROM") == 1
    assert "ARG BASE=python:3.11-slim" in lines
    user = [ln for ln in lines if ln.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in ("0", "root")
    (entry,) = [ln for ln in lines if ln.startswith("ENTRYPOINT ")]
    assert json.loads(entry.split(None, 1)[1]) == ["lastmile", "serve"]
    assert "download.pytorch.org/whl/cpu" in text  # the CPU torch
    assert "CUDA" in text  # the documented CUDA variant
    assert "EXPOSE 8080 8081" in lines
    # every COPY source exists in the repository
    root = DEPLOY.parent
    for ln in lines:
        if ln.startswith("COPY "):
            for src in ln.split()[1:-1]:
                assert (root / src).exists(), src
