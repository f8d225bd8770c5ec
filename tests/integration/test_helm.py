"""The Helm chart: lints clean, installs into the local control plane, and the operator pod is placed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from ampacity.dev.cluster.binaries import ensure_binaries
from ampacity.dev.cluster.kubectl import Kubectl
from ampacity.dev.cluster.localcluster import LocalCluster
from ampacity.dev.cluster.polling import wait_for

CHART = Path(__file__).resolve().parents[2] / "helm" / "ampacity"


def helm(cluster: LocalCluster, *args: str) -> str:
    result = subprocess.run(
        [ensure_binaries(verbose=False)["helm"], "--kubeconfig", str(cluster.kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_chart_lints_clean(cluster: LocalCluster) -> None:
    output = helm(cluster, "lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in output


def test_chart_rejects_bad_values(cluster: LocalCluster) -> None:
    result = subprocess.run(
        [ensure_binaries(verbose=False)["helm"], "template", str(CHART), "--set", "operator.replicas=3"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "replicas" in result.stderr


def test_rendered_pods_meet_the_restricted_standard(cluster: LocalCluster) -> None:
    """Every pod but the NVML node agent (below); the simulated agent is restricted too."""
    rendered = helm(
        cluster,
        "template",
        "ampacity",
        str(CHART),
        "--set",
        "nodeAgent.enabled=true",
        "--set",
        "nodeAgent.simulate=true",
    )
    workloads = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] in ("Deployment", "DaemonSet")]
    assert {w["kind"] for w in workloads} == {"Deployment", "DaemonSet"}
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
        labels = workload["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "ampacity"
        assert labels["app.kubernetes.io/instance"] == "ampacity"


def test_the_nvml_agent_gets_what_nvidias_daemonsets_get_and_nothing_more(cluster: LocalCluster) -> None:
    """Setting GPU power limits and clock locks needs root with CAP_SYS_ADMIN and the nvidia
    runtime's driver libraries; the pod-resources socket is mounted read-only."""
    rendered = helm(cluster, "template", "ampacity", str(CHART), "--set", "nodeAgent.enabled=true")
    agent = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "DaemonSet")
    pod = agent["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["securityContext"]["runAsUser"] == 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"], "add": ["SYS_ADMIN"]}
    assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
    assert "privileged" not in context
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all" and env["AMPACITY_AGENT_SIMULATE"] == "0"
    assert env["AMPACITY_AGENT_POD_RESOURCES_SOCKET"] == "/var/lib/kubelet/pod-resources/kubelet.sock"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert sorted(mounts) == ["operator-ca", "pod-resources"]
    assert mounts["pod-resources"] == {
        "name": "pod-resources",
        "mountPath": "/var/lib/kubelet/pod-resources",
        "readOnly": True,
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["pod-resources"]["hostPath"]["path"] == "/var/lib/kubelet/pod-resources"
    # The operator's endpoint is verified with its CA's certificate: a ConfigMap, never the CA's Secret.
    assert env["AMPACITY_AGENT_OPERATOR_URL"].startswith("https://")
    assert env["AMPACITY_AGENT_OPERATOR_CA_FILE"] == f"{mounts['operator-ca']['mountPath']}/ca.crt"
    ca_map = volumes["operator-ca"]["configMap"]["name"]
    (published,) = [
        d
        for d in yaml.safe_load_all(rendered)
        if d and d["kind"] == "ConfigMap" and d["metadata"]["name"] == ca_map
    ]
    assert list(published["data"]) == ["ca.crt"] and "PRIVATE KEY" not in published["data"]["ca.crt"]
    assert published["data"]["ca.crt"].startswith("-----BEGIN CERTIFICATE-----")


def test_chart_ships_the_generated_crds(cluster: LocalCluster) -> None:
    rendered = [d for d in yaml.safe_load_all(helm(cluster, "template", "ampacity", str(CHART))) if d]
    crds = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "CustomResourceDefinition"}
    assert sorted(crds) == sorted(
        f"{plural}.ampacity.dev"
        for plural in ("servingpools", "trainingjobs", "federatedrounds", "powerbudgets", "nodepowers")
    )
    checked_in = yaml.safe_load((CHART.parents[1] / "crds" / "ampacity.dev_servingpools.yaml").read_text())
    assert crds["servingpools.ampacity.dev"]["spec"] == checked_in["spec"]
    assert crds["servingpools.ampacity.dev"]["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    without = [
        d
        for d in yaml.safe_load_all(helm(cluster, "template", str(CHART), "--set", "crds.install=false"))
        if d
    ]
    assert not [d for d in without if d["kind"] == "CustomResourceDefinition"]


def test_install_places_the_operator_on_a_node(cluster: LocalCluster, kubectl: Kubectl, crds: None) -> None:
    namespace = "ampacity-system"
    kubectl("create", "namespace", namespace)
    kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    # The session already installed the CRDs with kubectl; Helm must not try to adopt them.
    helm(
        cluster,
        "install",
        "ampacity",
        str(CHART),
        "-n",
        namespace,
        "--set",
        "crds.install=false",
        "--wait",
        "--timeout",
        "120s",
    )
    try:
        pods = wait_for(
            lambda: [
                p
                for p in kubectl.json(
                    "get", "pods", "-n", namespace, "-l", "app.kubernetes.io/component=operator"
                )["items"]
                if p.get("status", {}).get("phase") == "Running"
            ],
            timeout=90,
            what="operator pod running",
        )
        assert pods[0]["spec"]["nodeName"].startswith("gpu-node-")
        assert kubectl("get", "crd", "servingpools.ampacity.dev", "-o", "name").strip()
        # The operator's service account may manage pools but not, say, read secrets.
        as_operator = f"--as=system:serviceaccount:{namespace}:ampacity-operator"
        assert kubectl("auth", "can-i", "patch", "servingpools.ampacity.dev", as_operator).strip() == "yes"
        assert kubectl.run("auth", "can-i", "get", "secrets", as_operator).stdout.strip() == "no"
    finally:
        helm(cluster, "uninstall", "ampacity", "-n", namespace, "--wait")
    # CRDs are kept on uninstall so no user's objects are lost.
    assert kubectl.ok("get", "crd", "servingpools.ampacity.dev")
