"""deploy/: the Kubernetes manifests against the Kubernetes JSON schemas (offline), what they
promise (probes, Secrets, scrape annotations, non-root), the ConfigMap's config loading as
`run` would load it, and the image build where a container builder works.

The validator is `kubernetes-validate` (PyPI), which bundles the schemas of each Kubernetes
release: nothing is fetched, so the test runs the same on a machine without a network.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
#: the Kubernetes release whose schemas the manifests must satisfy (preStop `sleep`: 1.30+)
K8S_VERSION = "1.30.0"


def manifests() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in manifests() if d["kind"] == kind]


def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    found = manifests()
    assert {d["kind"] for _, d in found} >= {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
    }
    for name, doc in found:
        # strict: an unknown field (a typo in a probe, say) fails too
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as err:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {err}")
    # and the validator does fail on a broken manifest, so the loop above proved something
    broken = dict(by_kind("Deployment")[0])
    broken["spec"] = {**broken["spec"], "replicas": "three"}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSION, strict=True)
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name
        for p in K8S.glob("*.yaml")
        if p.name not in ("kustomization.yaml",) and not p.name.endswith(".example.yaml")
    )


def test_the_deployment_wires_probes_secrets_scraping_and_reload() -> None:
    (dep,) = by_kind("Deployment")
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert pod["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(ports["admin"]),
        "prometheus.io/path": "/metrics",
    }
    env = {e["name"]: e for e in c["env"]}
    assert env["SHADOWLANE_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "shadowlane-admin"
    assert c["envFrom"] == [{"secretRef": {"name": "shadowlane-postgres"}}]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert "--watch" in c["args"] and c["args"][c["args"].index("-c") + 1] == "/etc/shadowlane"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["routes"]["configMap"]["name"] == "shadowlane-routes"
    assert mounts["routes"] == "/etc/shadowlane"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    (pdb,) = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"] == dep["spec"]["selector"]
    services = by_kind("Service")
    assert all(s["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"] for s in services)
    # the secret's keys are what the pod reads
    secrets = {s["metadata"]["name"]: s for s in by_kind("Secret")}
    assert "token" in secrets["shadowlane-admin"]["stringData"]
    assert {"PGHOST", "PGUSER", "PGPASSWORD", "PGDATABASE"} <= set(
        secrets["shadowlane-postgres"]["stringData"]
    )


def test_the_configmap_is_a_config_that_loads(tmp_path: Path) -> None:
    """Mounted as the pod mounts it (files behind a `..data` symlink) and checked with the
    Deployment's own arguments."""
    (cm,) = by_kind("ConfigMap")
    (dep,) = by_kind("Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    data = tmp_path / "..2026_12_02_00_00_00.000000001"
    data.mkdir()
    (tmp_path / "..data").symlink_to(data.name)
    for name, text in cm["data"].items():
        (data / name).write_text(text)
        (tmp_path / name).symlink_to(Path("..data") / name)
    mount = "/etc/shadowlane"
    check = [a.replace(mount, str(tmp_path)) for a in args if a not in ("run", "--watch")]
    done = subprocess.run(
        [sys.executable, "-m", "shadowlane", "check", *check, "--strict"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "listen      0.0.0.0:8080" in done.stdout
    assert "shadow -> myservice-shadow.default  10%" in done.stdout
    assert "postgresql://" in done.stdout


def _builder() -> tuple[list[str] | None, str]:
    """A container builder that works here, or why there is none."""
    reasons = []
    for tool in ("docker", "podman"):
        exe = shutil.which(tool)
        if exe is None:
            reasons.append(f"{tool}: not installed")
            continue
        probe = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return [exe], tool
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        reasons.append(f"{tool}: `{tool} info` failed: {last}")
    return None, "; ".join(reasons)


@pytest.mark.timeout(1800)
def test_the_image_builds_compiled_non_root_without_a_compiler() -> None:
    builder, why = _builder()
    if builder is None:
        pytest.skip(
            f"no container builder works on this machine ({why}); build by hand with "
            "`docker build -f deploy/Dockerfile -t shadowlane:dev .` from the repository root"
        )
    tag = "shadowlane:test-deploy"
    build = subprocess.run(
        [*builder, "build", "-f", str(ROOT / "deploy" / "Dockerfile"), "-t", tag, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=1700,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    try:

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*builder, "run", "--rm", "--network", "none", *args],
                capture_output=True,
                text=True,
                timeout=120,
            )

        version = run(tag, "--version")
        assert version.returncode == 0 and "compiled" in version.stdout, version
        who = run("--entrypoint", "id", tag, "-u")
        assert who.stdout.strip() == "10001"
        cc = run("--entrypoint", "sh", tag, "-c", "command -v gcc cc || echo none")
        assert cc.stdout.strip() == "none"
    finally:
        subprocess.run([*builder, "rmi", "-f", tag], capture_output=True, timeout=120)
