"""The deployment files: every Kubernetes overlay (extras/kubernetes) renders with
`kubectl kustomize` and validates offline against the Kubernetes schemas
(kubernetes-validate); their probes, ports and grace period agree with the server's own
defaults (embedserve.config.Config) and with the image (extras/docker/Dockerfile); and
the Compose file builds that image. No cluster is needed: validate, don't deploy."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT
from embedserve.config import Config, env_name

yaml = pytest.importorskip("yaml")

KUBERNETES = ROOT / "extras" / "kubernetes"
OVERLAYS = sorted(p.name for p in (KUBERNETES / "overlays").iterdir() if p.is_dir())
COMPONENTS = sorted(p.name for p in (KUBERNETES / "components").iterdir() if p.is_dir())
DOCKERFILE = (ROOT / "extras" / "docker" / "Dockerfile").read_text("utf-8")
# The oldest Kubernetes these files are meant for, and the newest the validator knows.
OLDEST = "1.30.0"
# What the supervisor adds to --graceful-timeout before it kills draining workers.
SUPERVISOR_MARGIN = 1.0

requires_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl is not installed (.ci/run installs it: apt-get install kubectl)")


def render(directory: Path) -> list[dict[str, Any]]:
    rendered = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True,
                              text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def with_components(tmp_path: Path, overlay: str) -> Path:
    """An overlay with every optional component added, as a user would (kustomize takes
    relative paths only)."""
    here = tmp_path / "composed"
    here.mkdir()
    (here / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(KUBERNETES / "overlays" / overlay, here)],
        "components": [os.path.relpath(KUBERNETES / "components" / c, here)
                       for c in COMPONENTS]}))
    return here


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in docs if doc["kind"] == kind]
    return found


@requires_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_and_validates(overlay: str, tmp_path: Path) -> None:
    validator = pytest.importorskip("kubernetes_validate")
    docs = render(with_components(tmp_path, overlay))
    kinds = {doc["kind"] for doc in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "ConfigMap", "ServiceMonitor"} <= kinds
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked against the Service below
        for version in (OLDEST, validator.latest_version()):
            validator.validate(doc, version, strict=True)  # raises on any error
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {
        p["name"] for p in service["spec"]["ports"]}


@requires_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_agree_with_the_servers_defaults(overlay: str) -> None:
    docs = render(KUBERNETES / "overlays" / overlay)
    defaults = Config()
    config = one(docs, "ConfigMap")
    variables = config["data"]
    options = {env_name(f.name): f.name for f in dataclasses.fields(Config)}
    unknown = {k for k in variables if k.startswith("EMBEDSERVE_") and k not in options}
    assert not unknown, f"variables that are no option: {unknown}"
    # The server would start with them: parsed as it parses its environment (the key file
    # exists only in the pod; it must be where the Secret is mounted, checked below).
    served = Config.from_args(["--host", "127.0.0.1"], environ={
        k: v for k, v in variables.items() if k != "EMBEDSERVE_API_KEY_FILE"})
    graceful = served.graceful_timeout

    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (server,) = [c for c in pod["containers"] if c["name"] == "embedserve"]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports["http"] == defaults.port == served.port
    assert "EMBEDSERVE_PORT" not in variables and "EMBEDSERVE_HOST" not in variables  # the image's
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        check = server[probe]["httpGet"]
        assert check["path"] == "/health" and ports.get(check["port"], check["port"]) == \
            defaults.port, probe
    # The liveness probe gives up after the supervisor would have replaced a hung worker.
    liveness = server["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > served.worker_timeout
    # preStop pause, then SIGTERM: the drain must end before the kubelet's SIGKILL.
    pause = float(server["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pause > 0
    assert pod["terminationGracePeriodSeconds"] > pause + graceful + SUPERVISOR_MARGIN

    service = one(docs, "Service")
    (http,) = service["spec"]["ports"]
    assert http["port"] == defaults.port and http["targetPort"] in ("http", defaults.port)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (service["spec"]["selector"],
                     one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                     deployment["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == defaults.port
    assert annotations["prometheus.io/path"] == "/metrics"
    target = one(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])

    # The image's user, the Secret's file, the model cache filled by the init container.
    user = re.search(r"^USER (\d+)", DOCKERFILE, re.M)
    assert user and pod["securityContext"]["runAsUser"] == int(user.group(1))
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    key_file = Path(variables["EMBEDSERVE_API_KEY_FILE"])
    assert str(key_file.parent) == mounts["api-key"] and "secret" in volumes["api-key"]
    (pull,) = pod["initContainers"]
    assert "embedserve pull" in " ".join(pull["command"])
    assert pull["image"] == server["image"]
    pull_mounts = {m["name"]: m["mountPath"] for m in pull["volumeMounts"]}
    assert pull_mounts["model-cache"] == mounts["model-cache"]
    assert variables["HF_HOME"].startswith(mounts["model-cache"] + "/")
    gpus = server["resources"].get("limits", {}).get("nvidia.com/gpu")
    if overlay == "gpu":
        assert gpus == 1 and served.device == "cuda"
        assert "nvidia.com/gpu" not in pull["resources"].get("limits", {})
    else:
        assert gpus is None and served.device == "cpu"


def test_the_compose_file_builds_and_runs_the_image() -> None:
    compose = yaml.safe_load((ROOT / "extras/docker/compose.yaml").read_text("utf-8"))
    declared = set(re.findall(r"^ARG (\w+)", DOCKERFILE, re.M))
    defaults = Config()
    for name, service in compose["services"].items():
        build = service["build"]
        context = (ROOT / "extras/docker" / build["context"]).resolve()
        assert context == ROOT.resolve() and (context / build["dockerfile"]).is_file(), name
        assert set(build.get("args", {})) <= declared, name
        assert any(p.endswith(f":{defaults.port}") for p in service["ports"]), name
        grace = float(service["stop_grace_period"].rstrip("s"))
        assert grace > defaults.graceful_timeout + SUPERVISOR_MARGIN, name
        for secret in service["secrets"]:
            assert service["environment"]["EMBEDSERVE_API_KEY_FILE"] == \
                f"/run/secrets/{secret}" and secret in compose["secrets"]
        for variable in service["environment"]:
            assert variable.removeprefix("EMBEDSERVE_").lower() in {
                f.name for f in dataclasses.fields(Config)}, variable
