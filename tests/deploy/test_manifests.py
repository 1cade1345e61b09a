"""What deploy/ hands a platform team, checked offline.

Every kustomization (the base and each overlay) is rendered with `kubectl kustomize`, each
object is validated against the Kubernetes schemas (kubernetes-validate, no cluster), and
the rendered objects are held to the rules of a deployment: probes, limits and security
context on every container, grace periods longer than the server's, named ports,
NetworkPolicies that allow exactly the intended connections, Secrets that hold placeholders
only, one image for the services, JetStream durability, autoscalers and disruption budgets.
deploy/Dockerfile is parsed and checked against the same facts (user, ports, entry point),
and the environment variable names given to the services must be names the services read.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tools.nats_users import DEPLOY_HEADER, USERS, password_variable, render

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SERVICES = ROOT / "services"
KUBERNETES_VERSION = "1.32"
NAMESPACE = "groupchat"
PART_OF = {"app.kubernetes.io/part-of": "groupchat"}
NAME = "app.kubernetes.io/name"
PLACEHOLDER = "REPLACE_ME"

BASE = "base"
OVERLAYS = ["overlays/dev", "overlays/prod"]
TARGETS = [BASE, *OVERLAYS]

GRPC_PORT = 50051
METRICS_PORT = 9464
GATEWAY = "gateway"
# Every groupchat service (a package under services/ with a __main__), and those behind the
# gateway: each stores in its own MongoDB database and keeps a JetStream stream.
SERVICE_NAMES = ("gateway", "groups", "messaging", "plaza")
INTERNAL_SERVICES = ("groups", "messaging", "plaza")
# Values that must only ever come from a Secret.
SECRET_VARIABLES = {"MONGODB_URI", "NATS_PASSWORD"}
# The issuer's public key set: a Secret mounted as a file into every service pod.
KEYS_SECRET = "groupchat-jwt-keys"
KEYS_FILE_VARIABLE = "JWT_PUBLIC_KEYS_FILE"
# The connections the NetworkPolicies must allow inside the namespace, and nothing else:
# (from, to, port) by app.kubernetes.io/name.
ALLOWED_IN_NAMESPACE = {
    ("gateway", "groups", GRPC_PORT),
    ("gateway", "messaging", GRPC_PORT),
    ("gateway", "plaza", GRPC_PORT),
    ("gateway", "nats", 4222),
    ("groups", "nats", 4222),
    ("messaging", "nats", 4222),
    ("plaza", "nats", 4222),
    ("nats", "nats", 6222),
    ("groups", "mongodb", 27017),
    ("messaging", "mongodb", 27017),
    ("plaza", "mongodb", 27017),
    ("mongodb-init", "mongodb", 27017),
    ("mongodb", "mongodb", 27017),
}
MONITORING_NAMESPACE_LABEL = {"groupchat/metrics-scraper": "true"}
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}

Obj = dict[str, Any]


# --- rendering -----------------------------------------------------------------------


def kubectl() -> str:
    found = shutil.which("kubectl") or (
        "/usr/bin/kubectl" if Path("/usr/bin/kubectl").exists() else None
    )
    if found is None:
        pytest.fail(
            "kubectl is needed to render deploy/k8s with `kubectl kustomize` and was not found "
            "on PATH or at /usr/bin/kubectl: install it (https://kubernetes.io/docs/tasks/tools/)"
        )
    return found


@functools.cache
def _render(target: str) -> tuple[Obj, ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / target)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"`kubectl kustomize deploy/k8s/{target}` failed:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@dataclass(frozen=True)
class Workload:
    obj: Obj
    pod: Obj  # the pod template: metadata and spec

    @property
    def kind(self) -> str:
        return str(self.obj["kind"])

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])

    @property
    def spec(self) -> Obj:
        return self.pod["spec"]

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.pod.get("metadata", {}).get("labels") or {})

    @property
    def app(self) -> str:
        return self.labels.get(NAME, self.name)

    def containers(self, *, init: bool = True) -> list[Obj]:
        found = list(self.spec.get("containers") or [])
        if init:
            found += self.spec.get("initContainers") or []
        return found

    def named_ports(self) -> dict[str, int]:
        return {
            port["name"]: port["containerPort"]
            for container in self.containers()
            for port in container.get("ports") or []
            if "name" in port
        }

    def tcp_ports(self) -> set[int]:
        return {
            port["containerPort"]
            for container in self.containers()
            for port in container.get("ports") or []
            if port.get("protocol", "TCP") == "TCP"
        }


@dataclass(frozen=True)
class Manifests:
    target: str
    objects: tuple[Obj, ...]

    def of_kind(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> Obj | None:
        return next((o for o in self.of_kind(kind) if o["metadata"]["name"] == name), None)

    def workloads(self) -> list[Workload]:
        found = []
        for obj in self.objects:
            if obj["kind"] in POD_TEMPLATE_KINDS:
                found.append(Workload(obj, obj["spec"]["template"]))
            elif obj["kind"] == "CronJob":
                found.append(Workload(obj, obj["spec"]["jobTemplate"]["spec"]["template"]))
        return found

    def workload(self, app: str) -> Workload:
        for workload in self.workloads():
            if workload.app == app:
                return workload
        raise AssertionError(f"{self.target}: no workload labelled {NAME}={app}")

    def service_deployments(self) -> dict[str, Workload]:
        """The groupchat services, by package: Deployments whose command is services.<name>."""
        found = {}
        for workload in self.workloads():
            for container in workload.containers(init=False):
                module = service_module(container)
                if workload.kind == "Deployment" and module is not None:
                    found[module.removeprefix("services.")] = workload
        return found

    def secret_keys(self, name: str) -> set[str]:
        """Keys of a Secret: rendered here, or documented by the base's placeholder."""
        for manifests in (self, manifests_for(BASE)):
            secret = manifests.get("Secret", name)
            if secret is not None:
                return set(secret.get("data") or {}) | set(secret.get("stringData") or {})
        raise AssertionError(
            f"{self.target}: Secret {name!r} is referenced but has no placeholder in the base "
            "(deploy/k8s/base) documenting its keys"
        )

    def environment(self, container: Obj) -> dict[str, str | None]:
        """The variables a container gets, by name; None for a value held in a Secret."""
        env: dict[str, str | None] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                config_map = self.get("ConfigMap", source["configMapRef"]["name"])
                assert config_map is not None, f"{self.target}: missing {source['configMapRef']}"
                env.update({prefix + k: v for k, v in (config_map.get("data") or {}).items()})
            if "secretRef" in source:
                keys = self.secret_keys(source["secretRef"]["name"])
                env.update(dict.fromkeys((prefix + k for k in keys), None))
        for variable in container.get("env") or []:
            value_from = variable.get("valueFrom") or {}
            if "configMapKeyRef" in value_from:
                ref = value_from["configMapKeyRef"]
                config_map = self.get("ConfigMap", ref["name"])
                assert config_map is not None, f"{self.target}: missing ConfigMap {ref['name']}"
                env[variable["name"]] = config_map["data"][ref["key"]]
            elif "secretKeyRef" in value_from:
                ref = value_from["secretKeyRef"]
                assert ref["key"] in self.secret_keys(ref["name"])
                env[variable["name"]] = None
            else:
                env[variable["name"]] = variable.get("value")
        return env

    def namespace_labels(self) -> dict[str, str]:
        namespace = self.get("Namespace", NAMESPACE)
        labels = dict((namespace or {}).get("metadata", {}).get("labels") or {})
        return {**labels, "kubernetes.io/metadata.name": NAMESPACE}


@functools.cache
def manifests_for(target: str) -> Manifests:
    return Manifests(target, _render(target))


def service_module(container: Obj) -> str | None:
    """`services.x` when the container runs the image's `python -m services.x`."""
    args = container.get("args") or []
    if container.get("command") is None and args and str(args[0]).startswith("services."):
        return str(args[0])
    return None


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A label selector (matchLabels and matchExpressions) against a set of labels."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or []
        matched = {
            "In": key in labels and labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not matched:
            return False
    return True


def pytest_id(target: str) -> str:
    return target.replace("overlays/", "")


every_target = pytest.mark.parametrize("target", TARGETS, ids=pytest_id)
every_overlay = pytest.mark.parametrize("target", OVERLAYS, ids=pytest_id)


# --- the variables the services read -------------------------------------------------

_ENV_CALL = re.compile(
    r"""env\.(string|integer|number|optional_string|optional_integer)\(\s*"([A-Z][A-Z0-9_]*)"(\s*\))?"""
)


@dataclass(frozen=True)
class Reads:
    names: set[str] = field(default_factory=set)
    required: set[str] = field(default_factory=set)


@functools.cache
def variables_read(package: str) -> Reads:
    """Names read with services.kit.config.Env in a package (kit: what every service reads)."""
    reads = Reads()
    for path in sorted((SERVICES / package).rglob("*.py")):
        for match in _ENV_CALL.finditer(path.read_text()):
            reads.names.add(match.group(2))
            # env.string("NAME") with no default: the service does not start without it.
            if match.group(1) == "string" and match.group(3):
                reads.required.add(match.group(2))
    return reads


def variables_of_service(service: str) -> Reads:
    kit, own = variables_read("kit"), variables_read(service)
    return Reads(kit.names | own.names, kit.required | own.required)


def test_the_variable_scan_finds_what_the_services_read() -> None:
    # Guards the regular expression: if the way services read their environment changes,
    # this fails instead of every name check below passing vacuously.
    kit = variables_read("kit")
    assert {KEYS_FILE_VARIABLE, "GRPC_LISTEN", "NATS_URL", "METRICS_PORT"} <= kit.names
    assert kit.required == {KEYS_FILE_VARIABLE}
    gateway = variables_read("gateway").names
    assert {"GROUPS_ADDRESS", "MESSAGING_ADDRESS", "PLAZA_ADDRESS"} <= gateway
    for service in INTERNAL_SERVICES:
        assert {"NATS_STREAM_REPLICAS", "MONGODB_DATABASE"} <= variables_of_service(
            service
        ).names, service
    assert "STRANGER_DAILY_LIMIT" in variables_read("messaging").names
    assert "PLAZA_HOT_HALF_LIFE_HOURS" in variables_read("plaza").names


# --- schema, namespace, labels ---------------------------------------------------------


@every_target
def test_every_object_is_valid_against_the_kubernetes_schemas(target: str) -> None:
    manifests = manifests_for(target)
    assert manifests.objects, f"{target} renders nothing"
    errors = []
    for obj in manifests.objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            errors.append(f"{obj['kind']}/{obj['metadata']['name']} at {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(exc.message)
    assert not errors, "\n".join(errors)


@every_target
def test_every_object_is_in_the_namespace_and_labelled(target: str) -> None:
    manifests = manifests_for(target)
    for obj in manifests.objects:
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, what
        assert PART_OF.items() <= (obj["metadata"].get("labels") or {}).items(), what
    for workload in manifests.workloads():
        assert PART_OF.items() <= workload.labels.items(), workload.name
        assert NAME in workload.labels, workload.name


def test_the_namespace_enforces_the_restricted_pod_security_standard() -> None:
    namespace = manifests_for(BASE).get("Namespace", NAMESPACE)
    assert namespace is not None
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_every_service_with_an_entry_point_is_deployed() -> None:
    # A package under services/ with a __main__ is a service: it must be in the base.
    packages = {
        path.parent.name for path in SERVICES.glob("*/__main__.py") if path.parent.name != "kit"
    }
    deployed = manifests_for(BASE).service_deployments()
    assert set(deployed) == packages == set(SERVICE_NAMES)
    for package, workload in deployed.items():
        assert workload.name == package
        assert workload.app == package


# --- containers: resources, security, probes, shutdown --------------------------------


@every_target
def test_every_container_has_requests_limits_and_a_locked_down_security_context(
    target: str,
) -> None:
    manifests = manifests_for(target)
    assert manifests.workloads()
    for workload in manifests.workloads():
        pod = workload.spec
        pod_security = pod.get("securityContext") or {}
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        assert pod.get("automountServiceAccountToken") is False, workload.name
        assert pod.get("enableServiceLinks") is False, workload.name
        for container in workload.containers():
            what = f"{target}: {workload.name}/{container['name']}"
            resources = container.get("resources") or {}
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind) or {}), f"{what}: {kind}"
            security = container.get("securityContext") or {}
            non_root = security.get("runAsNonRoot", pod_security.get("runAsNonRoot"))
            assert non_root is True, f"{what}: runAsNonRoot"
            assert security.get("runAsUser", pod_security.get("runAsUser")) != 0, what
            assert security.get("allowPrivilegeEscalation") is False, f"{what}: escalation"
            assert security.get("readOnlyRootFilesystem") is True, f"{what}: read-only root"
            assert not security.get("privileged"), what
            assert "ALL" in (security.get("capabilities") or {}).get("drop", []), what
            assert not (security.get("capabilities") or {}).get("add"), what
            seccomp = security.get("seccompProfile") or pod_security.get("seccompProfile")
            assert (seccomp or {}).get("type") == "RuntimeDefault", f"{what}: seccomp"


@every_target
def test_service_containers_use_grpc_health_probes_on_the_grpc_port(target: str) -> None:
    manifests = manifests_for(target)
    services = manifests.service_deployments()
    assert GATEWAY in services
    for name, workload in services.items():
        (container,) = workload.containers(init=False)
        env = manifests.environment(container)
        listen = env.get("GRPC_LISTEN")
        assert listen is not None and listen.rsplit(":", 1) == ["0.0.0.0", str(GRPC_PORT)]
        assert workload.named_ports().get("grpc") == GRPC_PORT, name
        for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = container.get(probe_name) or {}
            assert "grpc" in probe, f"{name}: {probe_name} is not a gRPC probe"
            assert probe["grpc"]["port"] == GRPC_PORT, f"{name}: {probe_name} port"
        # Liveness (and startup) ask for "liveness", which never depends on NATS or
        # MongoDB; readiness asks for "" (the default), which follows MongoDB where stored.
        assert container["livenessProbe"]["grpc"].get("service") == "liveness"
        assert container["startupProbe"]["grpc"].get("service") == "liveness"
        assert container["readinessProbe"]["grpc"].get("service", "") == ""


@every_target
def test_other_long_running_containers_have_liveness_and_readiness_probes(target: str) -> None:
    for workload in manifests_for(target).workloads():
        if workload.kind in ("Job", "CronJob"):
            continue
        for container in workload.containers(init=False):
            for probe in ("livenessProbe", "readinessProbe"):
                assert probe in container, f"{workload.name}/{container['name']}: {probe}"


def _pre_stop_seconds(container: Obj) -> float:
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    assert command, f"{container['name']}: no preStop hook to let endpoints drop first"
    match = re.search(r"sleep\(\s*(\d+(?:\.\d+)?)\s*\)", " ".join(command))
    assert match, f"{container['name']}: preStop {command} does not sleep"
    return float(match.group(1))


@every_target
def test_termination_grace_outlasts_the_pre_stop_sleep_and_the_server_grace(target: str) -> None:
    manifests = manifests_for(target)
    for name, workload in manifests.service_deployments().items():
        (container,) = workload.containers(init=False)
        grace = manifests.environment(container).get("SHUTDOWN_GRACE_SECONDS")
        assert grace is not None, f"{name}: SHUTDOWN_GRACE_SECONDS is not set in a ConfigMap"
        budget = workload.spec.get("terminationGracePeriodSeconds", 30)
        needed = _pre_stop_seconds(container) + float(grace)
        assert budget > needed, f"{name}: {budget}s to stop, needs more than {needed}s"


@every_target
def test_service_pods_are_scraped_for_metrics(target: str) -> None:
    manifests = manifests_for(target)
    for name, workload in manifests.service_deployments().items():
        (container,) = workload.containers(init=False)
        port = manifests.environment(container).get("METRICS_PORT")
        assert port == str(METRICS_PORT), f"{name}: METRICS_PORT"
        assert workload.named_ports().get("metrics") == METRICS_PORT, name
        annotations = workload.pod["metadata"].get("annotations") or {}
        assert annotations.get("prometheus.io/scrape") == "true", name
        assert annotations.get("prometheus.io/port") == port, name
        assert annotations.get("prometheus.io/path") == "/metrics", name


# --- Services ---------------------------------------------------------------------------


@every_target
def test_every_service_names_its_ports_and_selects_pods(target: str) -> None:
    manifests = manifests_for(target)
    workloads = manifests.workloads()
    for service in manifests.of_kind("Service"):
        name = service["metadata"]["name"]
        ports = service["spec"]["ports"]
        assert all(port.get("name") for port in ports), f"{name}: a port without a name"
        selector = {"matchLabels": service["spec"]["selector"]}
        selected = [w for w in workloads if selects(selector, w.labels)]
        assert selected, f"Service {name} selects no pods"
        for port in ports:
            target_port = port.get("targetPort", port["port"])
            for workload in selected:
                known = workload.named_ports()
                resolved = known.get(target_port) if isinstance(target_port, str) else target_port
                assert resolved in known.values(), f"{name}: {target_port} not on {workload.name}"


@every_target
def test_every_groupchat_service_has_a_service_with_grpc_and_metrics_ports(target: str) -> None:
    manifests = manifests_for(target)
    for name, workload in manifests.service_deployments().items():
        service = manifests.get("Service", name)
        assert service is not None, f"no Service {name}"
        assert selects({"matchLabels": service["spec"]["selector"]}, workload.labels)
        if name != GATEWAY:  # reached by the gateway, which balances over every pod itself
            assert service["spec"].get("clusterIP") == "None", f"{name}: Service is not headless"
        ports = {port["name"]: port for port in service["spec"]["ports"]}
        assert ports["grpc"]["port"] == GRPC_PORT
        assert ports["grpc"]["targetPort"] in ("grpc", GRPC_PORT)
        assert ports["metrics"]["port"] == METRICS_PORT


@every_target
def test_addresses_in_the_configuration_name_rendered_services(target: str) -> None:
    manifests = manifests_for(target)
    for name, workload in manifests.service_deployments().items():
        (container,) = workload.containers(init=False)
        env = manifests.environment(container)
        addresses = {k: v for k, v in env.items() if k.endswith("_ADDRESS")}
        if name == GATEWAY:
            wanted = {f"{service.upper()}_ADDRESS" for service in INTERNAL_SERVICES}
            assert wanted <= set(addresses), f"gateway: {sorted(wanted - set(addresses))}"
        if target != BASE:  # NATS is a component the overlays add
            addresses["NATS_URL"] = (env.get("NATS_URL") or "").removeprefix("nats://")
        for variable, address in addresses.items():
            assert address is not None
            host, port = address.removeprefix("dns:///").rsplit(":", 1)
            service = manifests.get("Service", host)
            assert service is not None, f"{name}: {variable}={address}: no Service {host}"
            assert int(port) in {p["port"] for p in service["spec"]["ports"]}, variable


# --- configuration and secrets ---------------------------------------------------------


@every_target
def test_services_get_only_variables_they_read_and_every_one_they_require(target: str) -> None:
    manifests = manifests_for(target)
    for name, workload in manifests.service_deployments().items():
        reads = variables_of_service(name)
        for container in workload.containers():
            given = set(manifests.environment(container))
            unknown = given - reads.names
            assert not unknown, f"{name} is given {sorted(unknown)}, which it does not read"
            missing = reads.required - given
            assert not missing, f"{name} requires {sorted(missing)}"


@every_target
def test_config_maps_and_secrets_hold_only_names_the_services_read(target: str) -> None:
    manifests = manifests_for(target)
    known = set.union(*(variables_of_service(s).names for s in manifests.service_deployments()))
    consumed: set[tuple[str, str]] = set()
    for workload in manifests.service_deployments().values():
        for container in workload.containers():
            for source in container.get("envFrom") or []:
                for kind, ref in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if ref in source:
                        consumed.add((kind, source[ref]["name"]))
    for kind, name in sorted(consumed):
        if kind == "ConfigMap":
            obj = manifests.get(kind, name)
            assert obj is not None
            keys = set(obj.get("data") or {})
            assert not keys & SECRET_VARIABLES, f"ConfigMap {name} holds {keys & SECRET_VARIABLES}"
        else:
            keys = manifests.secret_keys(name)
        assert keys <= known, f"{kind} {name}: {sorted(keys - known)} are read by no service"


@every_target
def test_every_service_pod_mounts_the_public_key_set_and_nothing_that_signs(target: str) -> None:
    manifests = manifests_for(target)
    for name, workload in manifests.service_deployments().items():
        volumes = {
            v["name"]: v["secret"]["secretName"]
            for v in workload.spec.get("volumes") or []
            if "secret" in v
        }
        for container in workload.containers():
            path = manifests.environment(container).get(KEYS_FILE_VARIABLE)
            assert path, f"{name}: {KEYS_FILE_VARIABLE} is not set"
            directory, _, file_name = path.rpartition("/")
            mounts = [m for m in container.get("volumeMounts") or [] if m["mountPath"] == directory]
            assert len(mounts) == 1, f"{name}: nothing is mounted at {directory}"
            assert mounts[0].get("readOnly") is True, f"{name}: the key set is mounted writable"
            assert volumes.get(mounts[0]["name"]) == KEYS_SECRET, name
            assert file_name in manifests.secret_keys(KEYS_SECRET), f"{KEYS_SECRET}: {file_name}"
    # Services verify; only the platform's issuer signs: no private key, no shared secret.
    for secret in manifests_for(BASE).of_kind("Secret"):
        for key, _ in _decoded(secret):
            assert "JWT_SECRET" not in key and "signing" not in key.lower(), key
    assert "JWT_SECRET" not in set.union(*(variables_of_service(s).names for s in SERVICE_NAMES))


def _decoded(secret: Obj) -> Iterator[tuple[str, str]]:
    for key, value in (secret.get("stringData") or {}).items():
        yield key, str(value)
    for key, value in (secret.get("data") or {}).items():
        yield key, base64.b64decode(value).decode("utf-8", "replace")


@every_target
def test_secrets_hold_placeholders_only(target: str) -> None:
    manifests = manifests_for(target)
    for secret in manifests.of_kind("Secret"):
        for key, value in _decoded(secret):
            assert value.startswith(PLACEHOLDER), (
                f"Secret {secret['metadata']['name']} holds a value for {key} that is not a "
                f"{PLACEHOLDER} placeholder: real secrets never go in the repository"
            )
    for config_map in manifests.of_kind("ConfigMap"):
        leaked = set(config_map.get("data") or {}) & SECRET_VARIABLES
        assert not leaked, f"ConfigMap {config_map['metadata']['name']} holds {leaked}"
    for workload in manifests.workloads():
        for container in workload.containers():
            for variable in container.get("env") or []:
                assert variable["name"] not in SECRET_VARIABLES or "valueFrom" in variable


def test_the_base_documents_every_secret_with_a_placeholder() -> None:
    base = manifests_for(BASE)
    secrets = {s["metadata"]["name"] for s in base.of_kind("Secret")}
    referenced = _referenced_secrets(base)
    assert referenced and referenced <= secrets


@every_overlay
def test_overlays_never_overwrite_the_real_secrets_and_the_readme_says_how_to_create_them(
    target: str,
) -> None:
    manifests = manifests_for(target)
    # `kubectl apply -k` would replace a real Secret by its placeholder.
    assert not manifests.of_kind("Secret")
    readme = (DEPLOY / "README.md").read_text()
    for name in _referenced_secrets(manifests):
        assert f"create secret generic {name}" in readme, f"deploy/README.md: creating {name}"
        for key in manifests.secret_keys(name):
            assert key in readme, f"deploy/README.md: {name} {key}"


def _referenced_secrets(manifests: Manifests) -> set[str]:
    names = set()
    for workload in manifests.workloads():
        for container in workload.containers():
            for source in container.get("envFrom") or []:
                if "secretRef" in source:
                    names.add(source["secretRef"]["name"])
            for variable in container.get("env") or []:
                ref = (variable.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    names.add(ref["name"])
        for volume in workload.spec.get("volumes") or []:
            if "secret" in volume:
                names.add(volume["secret"]["secretName"])
    return names


# --- images -------------------------------------------------------------------------------


@every_target
def test_services_share_one_pinned_image(target: str) -> None:
    manifests = manifests_for(target)
    service_images = {
        container["image"]
        for workload in manifests.service_deployments().values()
        for container in workload.containers(init=False)
    }
    assert len(service_images) == 1, f"services use several images: {service_images}"
    for workload in manifests.workloads():
        for container in workload.containers():
            image = container["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert (tag and tag != "latest") or "@sha256:" in image, f"{image} is not pinned"
    if target == "overlays/dev":
        assert service_images == {"groupchat:dev"}  # what deploy/README.md builds


# --- NetworkPolicies ----------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """One end of a connection: a pod (in some namespace) or an address outside the cluster."""

    name: str
    namespace: str | None
    namespace_labels: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[str, int] = field(default_factory=dict)


INTERNET = Peer("internet", None)
ELSEWHERE = Peer(  # a pod of another namespace that even looks like the gateway
    "pod in another namespace",
    "elsewhere",
    {"kubernetes.io/metadata.name": "elsewhere"},
    {NAME: "gateway", "app.kubernetes.io/component": "grpc-service"},
)
MONITORING = Peer(
    "prometheus",
    "monitoring",
    {"kubernetes.io/metadata.name": "monitoring", **MONITORING_NAMESPACE_LABEL},
    {NAME: "prometheus"},
)
DNS = Peer("cluster DNS", "kube-system", {"kubernetes.io/metadata.name": "kube-system"}, {})


def _policy_types(policy: Obj) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])]


def _peer_matches(entry: Obj, peer: Peer) -> bool:
    if "ipBlock" in entry:  # addresses: modelled as outside the cluster
        return peer.namespace is None
    if peer.namespace is None:
        return False
    if "namespaceSelector" in entry:
        if not selects(entry["namespaceSelector"], peer.namespace_labels):
            return False
    elif peer.namespace != NAMESPACE:
        return False
    return "podSelector" not in entry or selects(entry["podSelector"], peer.labels)


def _port_matches(entries: list[Obj] | None, port: int, protocol: str, named: Mapping) -> bool:
    if not entries:
        return True
    for entry in entries:
        if entry.get("protocol", "TCP") != protocol:
            continue
        declared = entry.get("port")
        if declared is None:
            return True
        number = named.get(declared) if isinstance(declared, str) else int(declared)
        if number is not None and number <= port <= entry.get("endPort", number):
            return True
    return False


def _allows(
    policies: list[Obj],
    direction: str,
    subject: Peer,
    other: Peer,
    port: int,
    protocol: str,
    named: Mapping[str, int],
) -> bool:
    """Whether the policies of the namespace let `subject` take (ingress) or open (egress)."""
    if subject.namespace != NAMESPACE:  # only our namespace's policies are rendered
        return True
    policy_type, rules_key, peers_key = {
        "ingress": ("Ingress", "ingress", "from"),
        "egress": ("Egress", "egress", "to"),
    }[direction]
    isolating = [
        p
        for p in policies
        if policy_type in _policy_types(p) and selects(p["spec"]["podSelector"], subject.labels)
    ]
    if not isolating:
        return True
    for policy in isolating:
        for rule in policy["spec"].get(rules_key) or []:
            peers = rule.get(peers_key)
            if peers and not any(_peer_matches(entry, other) for entry in peers):
                continue
            if _port_matches(rule.get("ports"), port, protocol, named):
                return True
    return False


def can_connect(manifests: Manifests, source: Peer, dest: Peer, port: int, protocol: str = "TCP"):
    policies = manifests.of_kind("NetworkPolicy")
    return _allows(policies, "egress", source, dest, port, protocol, dest.ports) and _allows(
        policies, "ingress", dest, source, port, protocol, dest.ports
    )


def _peers(manifests: Manifests) -> dict[str, Peer]:
    namespace_labels = manifests.namespace_labels()
    return {
        w.app: Peer(w.app, NAMESPACE, namespace_labels, w.labels, w.named_ports())
        for w in manifests.workloads()
    }


def _ports(manifests: Manifests) -> dict[str, set[int]]:
    return {w.app: w.tcp_ports() for w in manifests.workloads()}


@every_target
def test_a_default_deny_policy_covers_the_namespace_and_every_pod_has_its_own(
    target: str,
) -> None:
    manifests = manifests_for(target)
    policies = manifests.of_kind("NetworkPolicy")
    default_deny = [
        p
        for p in policies
        if p["spec"]["podSelector"] == {}
        and set(_policy_types(p)) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert default_deny, "no NetworkPolicy denies all ingress and egress by default"
    for workload in manifests.workloads():
        own = [
            p
            for p in policies
            if p["spec"]["podSelector"] and selects(p["spec"]["podSelector"], workload.labels)
        ]
        assert own, f"{workload.name} is selected by no NetworkPolicy of its own"


@every_target
def test_network_policies_allow_exactly_the_intended_connections_in_the_namespace(
    target: str,
) -> None:
    manifests = manifests_for(target)
    peers = _peers(manifests)
    ports = _ports(manifests)
    stray = Peer("stray pod", NAMESPACE, manifests.namespace_labels(), {NAME: "debug"})
    policies = manifests.of_kind("NetworkPolicy")
    wrong = []
    for source in [*peers.values(), stray]:
        for dest, dest_ports in ports.items():
            for port in sorted(dest_ports):
                expected = (source.name, dest, port) in ALLOWED_IN_NAMESPACE
                public = dest == GATEWAY and port == GRPC_PORT
                named = peers[dest].ports
                # Each side on its own, so that no policy is wider than it must be.
                sides = {
                    "egress from": (
                        _allows(policies, "egress", source, peers[dest], port, "TCP", named),
                        expected,
                    ),
                    "ingress to": (
                        _allows(policies, "ingress", peers[dest], source, port, "TCP", named),
                        expected or public,
                    ),
                }
                for side, (allowed, wanted) in sides.items():
                    if allowed != wanted:
                        verb = "allows" if allowed else "denies"
                        wrong.append(f"{side} {verb} {source.name} -> {dest}:{port}")
                if can_connect(manifests, source, peers[dest], port) != expected:
                    verb = "cannot reach" if expected else "can reach"
                    wrong.append(f"{source.name} {verb} {dest}:{port}")
    assert not wrong, "\n".join(wrong)
    # The expectations are not vacuous: the intended connections exist in this render.
    present = {(a, b, p) for a, b, p in ALLOWED_IN_NAMESPACE if a in peers and b in peers}
    for service in INTERNAL_SERVICES:
        assert ("gateway", service, GRPC_PORT) in present
    if target != BASE:
        assert present == ALLOWED_IN_NAMESPACE


@every_target
def test_from_outside_the_namespace_only_the_gateway_and_the_metrics_are_reachable(
    target: str,
) -> None:
    manifests = manifests_for(target)
    peers = _peers(manifests)
    services = set(manifests.service_deployments())
    wrong = []
    for dest, dest_ports in _ports(manifests).items():
        for port in sorted(dest_ports):
            public = dest == GATEWAY and port == GRPC_PORT
            scraped = dest in services and port == METRICS_PORT
            for source, expected in (
                (INTERNET, public),
                (ELSEWHERE, public),
                (MONITORING, public or scraped),
            ):
                if can_connect(manifests, source, peers[dest], port) != expected:
                    verb = "cannot reach" if expected else "can reach"
                    wrong.append(f"{source.name} {verb} {dest}:{port}")
    assert not wrong, "\n".join(wrong)


@every_target
def test_every_pod_resolves_names_and_nothing_leaves_the_cluster(target: str) -> None:
    manifests = manifests_for(target)
    for peer in _peers(manifests).values():
        assert can_connect(manifests, peer, DNS, 53, "UDP"), f"{peer.name}: DNS over UDP"
        assert can_connect(manifests, peer, DNS, 53, "TCP"), f"{peer.name}: DNS over TCP"
        assert not can_connect(manifests, peer, INTERNET, 443), f"{peer.name} reaches out"
        assert not can_connect(manifests, peer, ELSEWHERE, GRPC_PORT), peer.name


# --- scaling and disruption ---------------------------------------------------------------


@every_target
def test_every_service_autoscales_and_owns_its_replica_count(target: str) -> None:
    manifests = manifests_for(target)
    hpas = {
        hpa["spec"]["scaleTargetRef"]["name"]: hpa
        for hpa in manifests.of_kind("HorizontalPodAutoscaler")
        if hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    }
    services = manifests.service_deployments()
    assert set(services) == set(SERVICE_NAMES)
    for name, workload in services.items():
        hpa = hpas.get(workload.name)
        assert hpa is not None, f"no HorizontalPodAutoscaler for {name}"
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        assert hpa["spec"].get("metrics"), f"{name}: the HPA scales on nothing"
        # Left to the HPA: a `replicas` here would reset the scale on every apply.
        assert "replicas" not in workload.obj["spec"], name
        if target == "overlays/dev":
            assert hpa["spec"]["minReplicas"] == 1
        if target == "overlays/prod":
            assert hpa["spec"]["minReplicas"] >= 3


@every_target
def test_every_deployment_and_statefulset_has_a_disruption_budget(target: str) -> None:
    manifests = manifests_for(target)
    budgets = manifests.of_kind("PodDisruptionBudget")
    for workload in manifests.workloads():
        if workload.kind not in ("Deployment", "StatefulSet"):
            continue
        matching = [b for b in budgets if selects(b["spec"]["selector"], workload.labels)]
        assert len(matching) == 1, f"{workload.name}: {len(matching)} PodDisruptionBudgets"
        (budget,) = matching
        # maxUnavailable keeps drains possible at one replica (dev); minAvailable would not.
        assert budget["spec"].get("maxUnavailable") == 1, workload.name


# --- NATS and MongoDB -----------------------------------------------------------------


def _nats_conf(manifests: Manifests, file: str = "nats.conf") -> str:
    (statefulset,) = [w for w in manifests.workloads() if w.app == "nats"]
    config_maps = [v["configMap"]["name"] for v in statefulset.spec["volumes"] if "configMap" in v]
    (name,) = config_maps
    config_map = manifests.get("ConfigMap", name)
    assert config_map is not None
    return str(config_map["data"][file])


def _block(config: str, name: str) -> str:
    match = re.search(rf"^\s*{name}\s*\{{(.*?)^\s*\}}", config, re.MULTILINE | re.DOTALL)
    assert match, f"nats.conf has no {name} block"
    return re.sub(r"#.*", "", match.group(1))


@every_overlay
def test_jetstream_fsyncs_every_write_on_a_persistent_volume(target: str) -> None:
    manifests = manifests_for(target)
    jetstream = _block(_nats_conf(manifests), "jetstream")
    assert re.search(r"^\s*sync_interval\s*:\s*always\s*$", jetstream, re.MULTILINE)
    store = re.search(r"^\s*store_dir\s*:\s*\"?([^\s\"]+)", jetstream, re.MULTILINE)
    assert store, "jetstream has no store_dir"
    nats = manifests.workload("nats")
    claims = {c["metadata"]["name"] for c in nats.obj["spec"].get("volumeClaimTemplates") or []}
    (container,) = nats.containers(init=False)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts.get(store.group(1)) in claims, "the JetStream store is not on a volume claim"


@every_overlay
def test_nats_is_a_routed_cluster_of_as_many_nodes_as_the_stream_has_replicas_at_most(
    target: str,
) -> None:
    manifests = manifests_for(target)
    nats = manifests.workload("nats")
    nodes = nats.obj["spec"]["replicas"]
    service = nats.obj["spec"]["serviceName"]
    headless = manifests.get("Service", service)
    assert headless is not None and headless["spec"].get("clusterIP") == "None"
    routes = re.findall(r"nats://([\w.-]+):(\d+)", _block(_nats_conf(manifests), "cluster"))
    assert sorted(routes) == [(f"nats-{i}.{service}", "6222") for i in range(nodes)]
    services = manifests.service_deployments()
    for name in INTERNAL_SERVICES:
        (container,) = services[name].containers(init=False)
        replicas = int(manifests.environment(container)["NATS_STREAM_REPLICAS"] or 0)
        assert 1 <= replicas <= nodes, name
        assert replicas == {"overlays/dev": 1, "overlays/prod": 3}[target], name
    (nats_container,) = nats.containers(init=False)
    for name in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = nats_container[name]["httpGet"]
        assert probe["path"].startswith("/healthz"), name
        assert nats.named_ports().get(probe["port"]) == 8222, f"{name}: not the monitoring port"


def test_the_prod_overlay_replicates_events_three_times() -> None:
    manifests = manifests_for("overlays/prod")
    services = manifests.service_deployments()
    for name in INTERNAL_SERVICES:
        (container,) = services[name].containers(init=False)
        assert manifests.environment(container)["NATS_STREAM_REPLICAS"] == "3", name


@every_target
def test_every_internal_service_has_its_own_database_and_credentials(target: str) -> None:
    manifests = manifests_for(target)
    services = manifests.service_deployments()
    for name in INTERNAL_SERVICES:
        (container,) = services[name].containers(init=False)
        env = manifests.environment(container)
        # No service reads another's collections (DESIGN.md, "Services").
        assert env.get("MONGODB_DATABASE") == name, name
        assert "MONGODB_URI" in env and env["MONGODB_URI"] is None, f"{name}: URI not secret"
        secrets = {s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s}
        assert f"{name}-mongodb" in secrets, name
        assert services[name].labels.get("groupchat/mongodb-client") == "true", name


@every_target
def test_every_service_is_its_own_nats_user_with_its_password_from_the_secret(
    target: str,
) -> None:
    manifests = manifests_for(target)
    for name, workload in manifests.service_deployments().items():
        (container,) = workload.containers(init=False)
        env = {v["name"]: v for v in container.get("env") or []}
        assert env["NATS_USER"].get("value") == name, name
        ref = env["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("nats-users", password_variable(name)), name


@every_overlay
def test_nats_lets_in_only_the_suites_users_with_their_permissions(target: str) -> None:
    manifests = manifests_for(target)
    assert re.search(r"^include users\.conf$", _nats_conf(manifests), re.MULTILINE)
    # As tools/nats_users.py renders it: `python -m tools.nats_users` after changing it.
    assert _nats_conf(manifests, "users.conf") == DEPLOY_HEADER + render()
    nats = manifests.workload("nats")
    (container,) = nats.containers(init=False)
    given = {k for k, v in manifests.environment(container).items() if v is None}
    assert {password_variable(user) for user in USERS} <= given


@every_target
def test_the_stranger_quota_is_the_products(target: str) -> None:
    manifests = manifests_for(target)
    (container,) = manifests.service_deployments()["messaging"].containers(init=False)
    env = manifests.environment(container)
    # DESIGN.md: at most 5 new strangers a day, the day ending at midnight in Shanghai.
    assert env.get("STRANGER_DAILY_LIMIT") == "5"
    assert env.get("APP_TIMEZONE") == "Asia/Shanghai"
    assert "QUOTA_TIMEZONE" not in env  # its former name: one setting, not two
    assert int(env.get("UNANSWERED_LIMIT") or 0) >= 1


@every_overlay
def test_mongodb_is_a_replica_set_the_init_job_initiates_once(target: str) -> None:
    manifests = manifests_for(target)
    mongodb = manifests.workload("mongodb")
    members = mongodb.obj["spec"]["replicas"]
    service = mongodb.obj["spec"]["serviceName"]
    headless = manifests.get("Service", service)
    assert headless is not None and headless["spec"].get("clusterIP") == "None"
    assert mongodb.obj["spec"].get("volumeClaimTemplates")
    (container,) = mongodb.containers(init=False)
    args = [*(container.get("command") or []), *(container.get("args") or [])]
    assert "--bind_ip_all" in args
    replica_set = args[args.index("--replSet") + 1]
    (job,) = [w for w in manifests.workloads() if w.kind == "Job" and w.app == "mongodb-init"]
    (init,) = job.containers(init=False)
    script = " ".join([*init.get("command", []), *init.get("args", [])])
    hosts = set(re.findall(r"host:\s*\"([\w.-]+:\d+)\"", script))
    assert hosts == {f"mongodb-{i}.{service}:27017" for i in range(members)}
    assert f'_id: "{replica_set}"' in script
    # Idempotent: initiates only a set that is not initiated yet.
    assert "rs.status()" in script and "NotYetInitialized" in script
    assert script.index("rs.status()") < script.index("rs.initiate(")
    # The URI form the Secret placeholder documents matches this set.
    uri = ",".join(sorted(hosts))
    for service in INTERNAL_SERVICES:
        documented = (K8S / "base" / service / "secret.yaml").read_text()
        assert f"mongodb://{uri}/?replicaSet={replica_set}" in documented, service


# --- deploy/Dockerfile ----------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str

    def exec_form(self) -> list[str]:
        parsed = json.loads(self.value)
        assert isinstance(parsed, list), f"{self.keyword} is not in exec (JSON) form"
        return [str(p) for p in parsed]


def dockerfile_stages() -> list[list[Instruction]]:
    """The Dockerfile's instructions, by stage (continuations joined, comments dropped)."""
    instructions: list[Instruction] = []
    pending = ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, value = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip()))
        pending = ""
    stages: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _all(stage: list[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in stage if i.keyword == keyword]


def _last(stage: list[Instruction], keyword: str) -> Instruction:
    found = _all(stage, keyword)
    assert found, f"the final stage has no {keyword}"
    return found[-1]


def _env(stage: list[Instruction]) -> dict[str, str]:
    env = {}
    for instruction in _all(stage, "ENV"):
        for item in shlex.split(instruction.value):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def test_the_image_is_built_in_stages_and_runs_as_a_fixed_non_root_user() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "deploy/Dockerfile is not a multi-stage build"
    final = stages[-1]
    user = _last(final, "USER").value.split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {user}: want a numeric non-root uid"
    # The pods run as the image's user.
    for target in TARGETS:
        for workload in manifests_for(target).service_deployments().values():
            assert workload.spec["securityContext"]["runAsUser"] == int(user)


def test_the_final_stage_has_no_build_tools() -> None:
    builder, final = dockerfile_stages()[0], dockerfile_stages()[-1]
    tools = re.compile(
        r"\b(gcc|g\+\+|clang|build-essential|make|[\w.+-]+-dev|pip install|grpcio-tools)\b"
    )
    for run in _all(final, "RUN"):
        assert not tools.search(run.value), f"the final stage builds or installs: {run.value}"
    for copy in _all(final, "COPY"):
        parts = copy.value.split()
        assert any(p.startswith("--from=") for p in parts), f"copies from the context: {copy}"
        assert parts[-2] in ("/opt/venv", "/app/gen", "/app/services"), copy.value
    # The builder installs nothing but the locks, every file checked against its hash: the
    # venv that is copied gets the runtime lock alone, and grpcio-tools, which generates the
    # code, lives in a venv of its own that is not copied.
    runs = " ".join(run.value for run in _all(builder, "RUN"))
    commands = [" ".join(c.split()) for run in _all(builder, "RUN") for c in run.value.split("&&")]
    assert sorted(c for c in commands if "pip install" in c) == [
        "/opt/protogen/bin/pip install --require-hashes -r requirements/pip.txt",
        "/opt/protogen/bin/pip install --require-hashes -r requirements/protogen.txt",
        "/opt/venv/bin/pip install --require-hashes -r requirements/pip.txt",
        "/opt/venv/bin/pip install --require-hashes -r requirements/runtime.txt",
    ]
    assert "/opt/protogen/bin/python -m tools.protogen" in runs


def test_the_image_command_runs_a_service_module_as_the_deployments_do() -> None:
    final = dockerfile_stages()[-1]
    entrypoint = _last(final, "ENTRYPOINT").exec_form()
    command = _last(final, "CMD").exec_form()
    assert entrypoint == ["python", "-m"]
    (module,) = command
    assert module.startswith("services.")
    assert (ROOT / module.replace(".", "/") / "__main__.py").is_file()
    for target in TARGETS:
        for workload in manifests_for(target).service_deployments().values():
            for container in workload.containers(init=False):
                runs = service_module(container)
                assert runs is not None and container["args"] == [runs]
                assert (ROOT / runs.replace(".", "/") / "__main__.py").is_file(), runs


def test_the_image_environment_and_ports_match_the_manifests() -> None:
    final = dockerfile_stages()[-1]
    env = _env(final)
    assert env.get("PYTHONPATH", "").split(":") == ["/app", "/app/gen"]
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert _last(final, "WORKDIR").value == "/app"
    exposed = {int(p.split("/")[0]) for i in _all(final, "EXPOSE") for p in i.value.split()}
    assert exposed == {GRPC_PORT, METRICS_PORT}


def test_the_build_context_leaves_out_local_state() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    allow_list = patterns[0] == "*"
    included = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]

    def sent(path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in included)

    for path in (".venv", "gen", ".run", ".git", "tests", "bench", "deploy"):
        left_out = (allow_list and not sent(path)) or path in patterns
        assert left_out, f".dockerignore sends {path} to the build"
    # Everything the Dockerfile copies from the context is sent.
    for stage in dockerfile_stages():
        for copy in _all(stage, "COPY"):
            parts = copy.value.split()
            if any(p.startswith("--from=") for p in parts):
                continue
            for source in parts[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such path"
                assert not allow_list or sent(source.rstrip("/")), f"ignored: {source}"


MUTUAL_TLS = "overlays/prod-mtls"
TLS_SECRET = "groupchat-tls"
TLS_FILES = {"GRPC_TLS_CERT": "tls.crt", "GRPC_TLS_KEY": "tls.key", "GRPC_TLS_CA": "ca.crt"}
HEALTHCHECK = ["python", "-m", "services.kit.healthcheck"]


def test_the_mutual_tls_overlay_mounts_the_certificates_and_probes_with_them() -> None:
    """The kubelet's gRPC probe cannot present a client certificate: with mutual TLS on, the
    probes run the image's own health check, which does."""
    test_every_object_is_valid_against_the_kubernetes_schemas(MUTUAL_TLS)
    manifests = manifests_for(MUTUAL_TLS)
    services = manifests.service_deployments()
    assert set(services) == set(manifests_for("overlays/prod").service_deployments())
    placeholder_keys = manifests_for(BASE).secret_keys(TLS_SECRET)
    assert manifests.get("Secret", TLS_SECRET) is None  # created in the cluster, never applied
    for name, workload in services.items():
        secrets = {
            v["name"]: v["secret"]["secretName"]
            for v in workload.spec.get("volumes") or []
            if "secret" in v
        }
        (container,) = workload.containers(init=False)
        (mount,) = [m for m in container["volumeMounts"] if secrets.get(m["name"]) == TLS_SECRET]
        assert mount.get("readOnly") is True, name
        env = manifests.environment(container)
        for variable, key in TLS_FILES.items():
            assert env[variable] == f"{mount['mountPath']}/{key}", (name, variable)
            assert key in placeholder_keys
        assert container["startupProbe"]["exec"]["command"] == [
            *HEALTHCHECK,
            "--service",
            "liveness",
        ]
        assert container["livenessProbe"]["exec"]["command"] == [
            *HEALTHCHECK,
            "--service",
            "liveness",
        ]
        assert container["readinessProbe"]["exec"]["command"] == HEALTHCHECK
        assert not any("grpc" in container[p] for p in ("startupProbe", "livenessProbe"))
