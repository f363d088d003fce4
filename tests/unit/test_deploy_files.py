"""The deployment files under deploy/ checked as files: valid against their schemas and
consistent with each other and with the rest of the repository (SPEC section 6, the
config schema, the monitoring bundle). Nothing here starts a process; the tools
(promtool, systemd-analyze, kubectl, pip) and the smoke tests are in
tests/integration/test_deploy.py, which reuses the parsers below.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import importlib
import json
import posixpath
import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.config import Config, load_config

# jsonschema ships no type stubs; kubernetes-validate depends on it.
jsonschema: Any = importlib.import_module("jsonschema")

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUSTOMIZE_DIR = DEPLOY / "kubernetes"
MONITORING_DIR = KUSTOMIZE_DIR / "monitoring"
RUNNER_DIR = KUSTOMIZE_DIR / "gitlab-runner"
COMPOSE_FILE = DEPLOY / "compose" / "compose.yaml"
UNIT_FILE = DEPLOY / "systemd" / "step-runner-exporter.service"
DOCKER_TAP = DEPLOY / "systemd" / "docker-tap"
DOCKER_UNIT = DOCKER_TAP / "step-runner-exporter-docker.service"
IN_PLACE = DOCKER_TAP / "in-place"
DOCS = REPO / "docs" / "deployment.md"

WEB_PORT = 9854
SIDECAR = "step-runner-exporter"
CONFIG_IN_IMAGE = "/etc/step-runner-exporter/config.yml"
# Where the docs install the VM config; the unit reads it from there.
CONFIG_ON_VM = "/etc/step-runner-exporter/config.yml"
# Where the docs install the docker tap's config (either layout's); its unit reads it.
DOCKER_CONFIG_ON_HOST = "/etc/step-runner-exporter/docker.yml"
# The oldest Kubernetes with native sidecars (initContainers with restartPolicy: Always)
# and the newest one kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.29", "latest")


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# --- Dockerfile --------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form ENTRYPOINT/CMD (fails for the shell form,
        which would run the sidecar under /bin/sh and swallow SIGTERM)."""
        value = json.loads(self.args)
        assert isinstance(value, list), f"{self.keyword} is not in exec form: {self.args}"
        return [str(item) for item in value]


def dockerfile_stages(path: Path = DEPLOY / "Dockerfile") -> list[list[Instruction]]:
    """Instructions per build stage, continuation lines joined, comments dropped."""
    stages: list[list[Instruction]] = []
    logical = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, args = logical.partition(" ")
        logical = ""
        instruction = Instruction(keyword.upper(), args.strip())
        if instruction.keyword == "FROM":
            stages.append([])
        elif not stages:
            continue  # global ARGs before the first FROM
        stages[-1].append(instruction)
    return stages


def final_stage() -> list[Instruction]:
    return dockerfile_stages()[-1]


def only(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def copy_sources(stage: list[Instruction]) -> list[tuple[str, str]]:
    """(source, destination) of every COPY from the build context."""
    pairs: list[tuple[str, str]] = []
    for instruction in stage:
        if instruction.keyword != "COPY" or instruction.args.startswith("--from"):
            continue
        *sources, destination = shlex.split(instruction.args)
        pairs.extend((source, destination) for source in sources)
    return pairs


def image_command() -> list[str]:
    """What `docker run IMAGE` executes: ENTRYPOINT followed by CMD."""
    stage = final_stage()
    return only(stage, "ENTRYPOINT").exec_form() + only(stage, "CMD").exec_form()


def image_config_source() -> Path:
    """The repository file the image ships as its default config."""
    stage = final_stage()
    (source,) = [src for src, dst in copy_sources(stage) if dst == CONFIG_IN_IMAGE]
    return REPO / source


def venv_dir_of_build() -> str:
    (run,) = [i for i in dockerfile_stages()[0] if "python -m venv" in i.args]
    match = re.search(r"python -m venv (\S+)", run.args)
    assert match
    return match.group(1)


def console_script() -> str:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    (name,) = pyproject["project"]["scripts"]
    return str(name)


def dockerignore_includes(path: str) -> bool:
    """Whether deploy/Dockerfile.dockerignore lets `path` into the build context (the
    last matching pattern wins; a `!` pattern re-includes)."""
    included = True
    patterns = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    for line in (p.strip() for p in patterns):
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        if fnmatch.fnmatchcase(path, pattern) or path.startswith(pattern + "/"):
            included = negate
    return included


def test_image_runs_the_console_script_as_a_non_root_user() -> None:
    stage = final_stage()
    user = only(stage, "USER").args
    uid = user.split(":", 1)[0]
    assert uid.isdigit() and int(uid) > 0, "USER must be a numeric non-root uid (runAsNonRoot)"
    entrypoint = only(stage, "ENTRYPOINT").exec_form()
    assert entrypoint == [f"{venv_dir_of_build()}/bin/{console_script()}"]
    assert only(stage, "CMD").exec_form() == ["serve", "--config.file", CONFIG_IN_IMAGE]
    assert f"COPY --from=build {venv_dir_of_build()} {venv_dir_of_build()}" in {
        f"{i.keyword} {i.args}" for i in stage
    }


def test_image_exposes_the_web_port_and_checks_health() -> None:
    stage = final_stage()
    assert only(stage, "EXPOSE").args == str(WEB_PORT)
    healthcheck = only(stage, "HEALTHCHECK").args
    assert f"http://127.0.0.1:{WEB_PORT}/-/healthy" in healthcheck
    assert "CMD [" in healthcheck, "exec form: the slim image's shell is not needed"
    image_config = load_config(image_config_source())
    assert image_config.web.listen_address[1] == WEB_PORT


def test_image_copies_only_existing_files_that_the_context_lets_in() -> None:
    for stage in dockerfile_stages():
        for source, _ in copy_sources(stage):
            assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
            assert dockerignore_includes(source), f"COPY {source}: excluded by the dockerignore"
    # The context must not carry the virtualenv, git metadata or local caches.
    for excluded in (".venv", ".git", "tests", "exporter/__pycache__"):
        assert not dockerignore_includes(excluded), excluded


SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|PRIVATE|CREDENTIAL", re.I)


def test_image_bakes_in_no_secrets() -> None:
    for stage in dockerfile_stages():
        for instruction in stage:
            if instruction.keyword in ("ENV", "ARG", "LABEL"):
                assert not SECRET_NAME.search(instruction.args), instruction
            if instruction.keyword in ("COPY", "ADD"):
                assert not re.search(r"\.env\b|\.pem\b|\.key\b|id_rsa|\.netrc", instruction.args)
            if instruction.keyword == "RUN":
                assert "--mount=type=secret" not in instruction.args
                assert not re.search(r"https?://[^/\s]+:[^@\s]+@", instruction.args)
    assert all(i.keyword != "ADD" for stage in dockerfile_stages() for i in stage), (
        "ADD can fetch URLs; COPY is explicit"
    )


# --- configuration files -----------------------------------------------------------


def socket_path(address: str) -> str:
    assert address.startswith("unix://"), address
    return address.removeprefix("unix://")


@pytest.mark.parametrize(
    "path", [DEPLOY / "config" / "config.yml", DEPLOY / "systemd" / "config.yml"], ids=str
)
def test_deploy_configs_are_valid(path: Path) -> None:
    config = load_config(path)
    assert config.listen is not None and config.upstream is not None
    # Both ends on unix sockets in a directory the deployment creates and shares.
    listen, upstream = socket_path(str(config.listen)), socket_path(str(config.upstream))
    assert posixpath.dirname(listen) != posixpath.dirname(upstream)
    assert config.web.listen_address == ("0.0.0.0", WEB_PORT)
    # Never world-accessible: the deployment's group is what grants access.
    assert config.socket.mode & 0o007 == 0


def container_config() -> Config:
    return load_config(DEPLOY / "config" / "config.yml")


def stop_budget(config: Config) -> float:
    """Seconds a stopping sidecar may need: drain, then wait for the final scrape."""
    return config.shutdown.grace_period + config.shutdown.final_scrape_wait


# --- Kubernetes: kustomization assembled by hand -------------------------------------

SUPPORTED_KUSTOMIZE_KEYS = {"apiVersion", "kind", "resources", "images"}


def image_name(image: str) -> str:
    """`registry/name:tag` or `name@digest` without the tag or digest."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return name[: len(name) - len(last)] + last.split(":")[0]


def pod_specs(obj: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    if obj["kind"] == "Pod":
        yield obj["spec"]
    elif obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        yield obj["spec"]["template"]["spec"]


def all_containers(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def kustomize_build(directory: Path = KUSTOMIZE_DIR) -> list[dict[str, Any]]:
    """What `kustomize build` makes of this kustomization: its resources, in order,
    with the `images` transformer applied. Any other kustomization key fails here
    rather than being silently ignored."""
    return copy.deepcopy(_kustomize_build(directory))


@functools.cache
def _kustomize_build(directory: Path) -> list[dict[str, Any]]:
    kustomization = load_yaml(directory / "kustomization.yaml")
    unsupported = set(kustomization) - SUPPORTED_KUSTOMIZE_KEYS
    assert not unsupported, f"extend kustomize_build for {unsupported}"
    objects = []
    for resource in kustomization["resources"]:
        objects.extend(load_yaml_documents(directory / resource))
    replacements = {
        image["name"]: f"{image.get('newName', image['name'])}:{image['newTag']}"
        for image in kustomization.get("images", [])
    }
    for obj in objects:
        for spec in pod_specs(obj):
            for container in all_containers(spec):
                name = image_name(container["image"])
                if name in replacements:
                    container["image"] = replacements[name]
    return objects


def built(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        obj
        for obj in kustomize_build()
        if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def kustomization_needs_monitoring() -> None:
    missing = [
        r
        for r in load_yaml(KUSTOMIZE_DIR / "kustomization.yaml")["resources"]
        if not (KUSTOMIZE_DIR / r).exists()
    ]
    if missing:
        pytest.skip(f"the monitoring bundle has not generated {missing} yet")


# kubernetes-validate knows only Kubernetes' own kinds. These are the parts of
# prometheus-operator's CRD schemas (monitoring.coreos.com/v1, v0.80) that the manifests
# here use, closed with additionalProperties: false, so a misspelt or misplaced field, a
# wrong type or a bad duration fails as it would at `kubectl apply`.
CRD_SCHEMAS: dict[str, dict[str, Any]] = yaml.safe_load(
    r"""
definitions:
  duration: {type: string}  # pattern: below
  stringMap: {type: object, additionalProperties: {type: string}}
  metadata:
    type: object
    required: [name]
    additionalProperties: false
    properties:
      name: {type: string}
      namespace: {type: string}
      labels: {$ref: '#/definitions/stringMap'}
      annotations: {$ref: '#/definitions/stringMap'}
  relabel:
    type: object
    additionalProperties: false
    properties:
      sourceLabels: {type: array, items: {type: string, pattern: '^[a-zA-Z_][a-zA-Z0-9_]*$'}}
      separator: {type: string}
      targetLabel: {type: string}
      regex: {type: string}
      modulus: {type: integer, minimum: 0}
      replacement: {type: string}
      action:
        enum: [replace, Replace, keep, Keep, drop, Drop, hashmod, HashMod, labelmap, LabelMap,
               labeldrop, LabelDrop, labelkeep, LabelKeep, lowercase, Lowercase, uppercase,
               Uppercase, keepequal, KeepEqual, dropequal, DropEqual]
  podMetricsEndpoint:
    type: object
    additionalProperties: false
    properties:
      port: {type: string}
      path: {type: string}
      scheme: {enum: [http, https]}
      interval: {$ref: '#/definitions/duration'}
      scrapeTimeout: {$ref: '#/definitions/duration'}
      honorLabels: {type: boolean}
      filterRunning: {type: boolean}
      relabelings: {type: array, items: {$ref: '#/definitions/relabel'}}
      metricRelabelings: {type: array, items: {$ref: '#/definitions/relabel'}}
  rule:
    type: object
    required: [expr]
    oneOf: [{required: [record]}, {required: [alert]}]
    additionalProperties: false
    properties:
      record: {type: string}
      alert: {type: string}
      expr: {type: [string, integer]}
      for: {$ref: '#/definitions/duration'}
      keep_firing_for: {$ref: '#/definitions/duration'}
      labels: {$ref: '#/definitions/stringMap'}
      annotations: {$ref: '#/definitions/stringMap'}
PodMonitor:
  type: object
  required: [apiVersion, kind, metadata, spec]
  additionalProperties: false
  properties:
    apiVersion: {const: monitoring.coreos.com/v1}
    kind: {const: PodMonitor}
    metadata: {$ref: '#/definitions/metadata'}
    spec:
      type: object
      required: [selector]
      additionalProperties: false
      properties:
        selector:
          type: object
          additionalProperties: false
          properties:
            matchLabels: {$ref: '#/definitions/stringMap'}
            matchExpressions: {type: array}
        namespaceSelector: {type: object}
        jobLabel: {type: string}
        podTargetLabels: {type: array, items: {type: string}}
        sampleLimit: {type: integer, minimum: 0}
        podMetricsEndpoints: {type: array, items: {$ref: '#/definitions/podMetricsEndpoint'}}
PrometheusRule:
  type: object
  required: [apiVersion, kind, metadata, spec]
  additionalProperties: false
  properties:
    apiVersion: {const: monitoring.coreos.com/v1}
    kind: {const: PrometheusRule}
    metadata: {$ref: '#/definitions/metadata'}
    spec:
      type: object
      additionalProperties: false
      properties:
        groups:
          type: array
          items:
            type: object
            required: [name]
            additionalProperties: false
            properties:
              name: {type: string, minLength: 1}
              interval: {$ref: '#/definitions/duration'}
              limit: {type: integer}
              partial_response_strategy: {type: string}
              rules: {type: array, items: {$ref: '#/definitions/rule'}}
"""
)


# The CRDs' duration pattern: 0 or units from years to milliseconds, e.g. 1h30m.
CRD_SCHEMAS["definitions"]["duration"]["pattern"] = (
    "^(0|" + "".join(f"(([0-9]+){unit})?" for unit in ("y", "w", "d", "h", "m", "s", "ms")) + ")$"
)


def validate_crd(obj: dict[str, Any]) -> None:
    schema = {"definitions": CRD_SCHEMAS["definitions"], **CRD_SCHEMAS[obj["kind"]]}
    jsonschema.Draft7Validator(schema).validate(obj)


def validate_kubernetes_object(obj: dict[str, Any]) -> None:
    import kubernetes_validate

    if obj["apiVersion"].startswith("monitoring.coreos.com/"):
        validate_crd(obj)
        return
    for version in KUBERNETES_VERSIONS:
        target = kubernetes_validate.latest_version() if version == "latest" else version
        kubernetes_validate.validate(obj, target, strict=True)


def test_every_kubernetes_object_is_valid() -> None:
    kustomization_needs_monitoring()
    objects = kustomize_build()
    kinds = {obj["kind"] for obj in objects}
    assert {"ConfigMap", "Deployment", "PodMonitor", "PrometheusRule"} <= kinds
    for obj in objects:
        validate_kubernetes_object(obj)


def test_kubernetes_validation_catches_a_broken_manifest() -> None:
    # The validation above must be able to fail: a mistyped field and a wrong type.
    import kubernetes_validate

    broken = copy.deepcopy(built("Deployment"))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "sixty"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_kubernetes_object(broken)
    broken = copy.deepcopy(built("Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_kubernetes_object(broken)
    monitor = copy.deepcopy(built("PodMonitor"))
    monitor["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate_kubernetes_object(monitor)
    monitor = copy.deepcopy(built("PodMonitor"))
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        validate_kubernetes_object(monitor)


def sidecar_of(spec: Mapping[str, Any]) -> dict[str, Any]:
    (sidecar,) = [c for c in all_containers(spec) if c["name"] == SIDECAR]
    return sidecar


def deployment_spec() -> dict[str, Any]:
    return built("Deployment")["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def test_sidecar_is_hardened_and_probed() -> None:
    sidecar = sidecar_of(deployment_spec())
    assert sidecar["restartPolicy"] == "Always", "a native sidecar starts first, stops last"
    security = sidecar["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["runAsNonRoot"] is True
    assert str(security["runAsUser"]) == only(final_stage(), "USER").args.split(":")[0]
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(sidecar["resources"][bound])
    (port,) = sidecar["ports"]
    assert port["containerPort"] == container_config().web.listen_address[1]
    probes = {kind: sidecar[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/-/healthy"
    assert probes["readinessProbe"]["path"] == "/-/ready"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/-/ready"
    for probe in probes.values():
        assert probe["port"] == port["name"]


def test_sidecar_runs_the_image_command_on_the_shipped_config() -> None:
    spec = deployment_spec()
    sidecar = sidecar_of(spec)
    assert "command" not in sidecar, "the image's ENTRYPOINT is the console script"
    assert sidecar["args"] == only(final_stage(), "CMD").exec_form()
    configmap = built("ConfigMap", "step-runner-exporter-config")
    assert configmap["data"]["config.yml"] == image_config_source().read_text(encoding="utf-8")
    config_file = sidecar["args"][sidecar["args"].index("--config.file") + 1]
    volume, relative = mounted_at(sidecar, config_file)
    (source,) = [v for v in spec["volumes"] if v["name"] == volume]
    assert source["configMap"]["name"] == configmap["metadata"]["name"]
    assert relative == "config.yml"
    assert spec["terminationGracePeriodSeconds"] > stop_budget(container_config())


def mounted_at(container: Mapping[str, Any], path: str) -> tuple[str, str]:
    """(volume name, path inside the volume) of a file path in a container."""
    for mount in container.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/")
        if path.startswith(root + "/"):
            inside = posixpath.join(mount.get("subPath", ""), path[len(root) + 1 :])
            return mount["name"], inside
    raise AssertionError(f"{container['name']}: nothing mounted at {path}")


def test_pod_sockets_meet_in_the_shared_volume() -> None:
    spec = deployment_spec()
    config = container_config()
    sidecar = sidecar_of(spec)
    (step_runner,) = [c for c in spec["containers"] if c["name"] == "step-runner"]
    tmpdir = {e["name"]: e["value"] for e in step_runner["env"]}["TMPDIR"]
    # step-runner serves on $TMPDIR/step-runner.sock: the sidecar's upstream.
    served = mounted_at(step_runner, f"{tmpdir}/step-runner.sock")
    assert served == mounted_at(sidecar, socket_path(str(config.upstream)))
    listen_volume, _ = mounted_at(sidecar, socket_path(str(config.listen)))
    assert listen_volume == served[0]
    (volume,) = [v for v in spec["volumes"] if v["name"] == listen_volume]
    assert "emptyDir" in volume
    # step-runner sees only its own directory, never the sidecar's listen socket.
    with pytest.raises(AssertionError):
        mounted_at(step_runner, socket_path(str(config.listen)))
    assert spec["securityContext"]["fsGroup"] == sidecar["securityContext"]["runAsGroup"]


def matches_selector(labels: Mapping[str, str], selector: Mapping[str, Any]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels is evaluated here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def podmonitor() -> dict[str, Any]:
    return built("PodMonitor")


def test_podmonitor_scrapes_the_sidecar_port_as_the_example_job() -> None:
    monitor = podmonitor()
    template = built("Deployment")["spec"]["template"]
    assert matches_selector(template["metadata"]["labels"], monitor["spec"]["selector"])
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == sidecar_of(template["spec"])["ports"][0]["name"]
    assert endpoint["path"] == container_config().web.metrics_path
    relabel = {r["targetLabel"]: r for r in endpoint["relabelings"]}
    assert relabel["job"]["replacement"] == prometheus_scrape_job()["job_name"]
    assert relabel["runner"]["sourceLabels"] == [
        "__meta_kubernetes_pod_label_app_kubernetes_io_instance"
    ]
    assert "app.kubernetes.io/instance" in template["metadata"]["labels"]
    assert monitor["spec"]["sampleLimit"] == prometheus_scrape_job()["sample_limit"]


# --- monitoring objects: identical to the monitoring bundle's single source ----------


def test_prometheusrule_is_the_rule_file() -> None:
    kustomization_needs_monitoring()
    rule_file = rules_file()
    if not rule_file.exists():
        pytest.skip(f"{rule_file.relative_to(REPO)} not generated yet")
    (rule,) = load_yaml_documents(MONITORING_DIR / "prometheusrule.yaml")
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == load_yaml(rule_file)["groups"]


def dashboard_files() -> dict[str, Path]:
    return {p.name: p for p in sorted((REPO / "dashboards").glob("*.json"))}


def test_dashboard_configmaps_are_the_dashboards() -> None:
    kustomization_needs_monitoring()
    dashboards = dashboard_files()
    if not dashboards:
        pytest.skip("dashboards/*.json not generated yet")
    shipped: dict[str, Any] = {}
    for configmap in load_yaml_documents(MONITORING_DIR / "dashboards-configmap.yaml"):
        assert configmap["kind"] == "ConfigMap"
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        for key, text in configmap["data"].items():
            shipped[key] = json.loads(text)
    assert set(shipped) == set(dashboards)
    for name, path in dashboards.items():
        assert shipped[name] == json.loads(path.read_text(encoding="utf-8")), name


# --- GitLab Runner's Kubernetes executor ---------------------------------------------


def runner_config() -> dict[str, Any]:
    return tomllib.loads((RUNNER_DIR / "config.toml").read_text(encoding="utf-8"))


def runner_patch() -> tuple[str, dict[str, Any]]:
    (runner,) = runner_config()["runners"]
    (patch,) = runner["kubernetes"]["pod_spec"]
    return patch["patch_type"], load_yaml(RUNNER_DIR / patch["patch_path"])


def strategic_merge(base: Any, patch: Any) -> Any:
    """Kubernetes' strategic merge for what a PodSpec patch uses: maps merge, lists of
    named objects (containers, volumes, mounts, env, ports) merge by name, any other
    list is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base[key], value) if key in base else value
        return merged
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(item, dict) and "name" in item for item in [*base, *patch])
    ):
        by_name = {item["name"]: item for item in base}
        for item in patch:
            by_name[item["name"]] = strategic_merge(by_name.get(item["name"], {}), item)
        return list(by_name.values())
    return patch


# A job pod as GitLab Runner's Kubernetes executor builds it (build and helper
# containers, the shared build directory), to apply the patch to.
HELPER_IMAGE = "registry.gitlab.com/gitlab-org/gitlab-runner/gitlab-runner-helper:x86_64-v17.5.0"
RUNNER_JOB_POD: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "runner-abc123-project-1-concurrent-0", "labels": {"pod": "runner"}},
    "spec": {
        "restartPolicy": "Never",
        "volumes": [{"name": "repo", "emptyDir": {}}],
        "initContainers": [
            {
                "name": "init-permissions",
                "image": HELPER_IMAGE,
                "command": ["sh", "-c", "touch /builds/.init"],
                "volumeMounts": [{"name": "repo", "mountPath": "/builds"}],
            }
        ],
        "containers": [
            {
                "name": "build",
                "image": "alpine:3.20",
                "command": ["sh", "-c", "sleep 3600"],
                "volumeMounts": [{"name": "repo", "mountPath": "/builds"}],
            },
            {
                "name": "helper",
                "image": HELPER_IMAGE,
                "volumeMounts": [{"name": "repo", "mountPath": "/builds"}],
            },
        ],
    },
}


def patched_job_pod() -> dict[str, Any]:
    patch_type, patch = runner_patch()
    assert patch_type == "strategic"
    pod = copy.deepcopy(RUNNER_JOB_POD)
    pod["spec"] = strategic_merge(pod["spec"], patch)
    return pod


def test_runner_config_enables_and_labels_the_pod_spec_patch() -> None:
    (runner,) = runner_config()["runners"]
    assert "FF_USE_ADVANCED_POD_SPEC_CONFIGURATION=true" in runner["environment"]
    kubernetes = runner["kubernetes"]
    (patch,) = kubernetes["pod_spec"]
    assert (RUNNER_DIR / patch["patch_path"]).is_file(), "patch_path is relative to config.toml"
    assert matches_selector(kubernetes["pod_labels"], podmonitor()["spec"]["selector"])
    assert kubernetes["pod_labels"]["app.kubernetes.io/instance"] == runner["name"]
    assert kubernetes["pod_termination_grace_period_seconds"] > stop_budget(container_config())


def test_patched_job_pod_is_valid_and_carries_the_same_sidecar() -> None:
    pod = patched_job_pod()
    validate_kubernetes_object(pod)
    spec = pod["spec"]
    assert [c["name"] for c in spec["containers"]] == ["build", "helper"], "nothing replaced"
    assert sidecar_of(spec) == sidecar_of(deployment_spec())
    config = container_config()
    (build,) = [c for c in spec["containers"] if c["name"] == "build"]
    assert {m["name"] for m in build["volumeMounts"]} == {"repo", "step-runner-sockets"}
    # The build container (the client) reaches the sidecar's socket.
    listen = socket_path(str(config.listen))
    assert mounted_at(build, listen) == mounted_at(sidecar_of(spec), listen)
    assert spec["securityContext"]["fsGroup"] == sidecar_of(spec)["securityContext"]["runAsGroup"]


def test_strategic_merge_adds_by_name_and_replaces_plain_lists() -> None:
    base = {"containers": [{"name": "a", "args": ["1"]}], "dnsPolicy": "Default"}
    patch = {"containers": [{"name": "a", "args": ["2"]}, {"name": "b"}]}
    merged = strategic_merge(base, patch)
    assert merged == {
        "containers": [{"name": "a", "args": ["2"]}, {"name": "b"}],
        "dnsPolicy": "Default",
    }


# --- Prometheus ----------------------------------------------------------------------


def prometheus_config() -> dict[str, Any]:
    return load_yaml(DEPLOY / "prometheus" / "prometheus.yml")  # type: ignore[no-any-return]


def prometheus_scrape_job() -> dict[str, Any]:
    jobs = prometheus_config()["scrape_configs"]
    (job,) = [j for j in jobs if j["job_name"] == SIDECAR]
    return job  # type: ignore[no-any-return]


def rules_file() -> Path:
    """The monitoring bundle's rule file, as Compose mounts it into Prometheus."""
    (source,) = [
        src for src, dst in bind_mounts("prometheus") if dst.startswith("/etc/prometheus/rules/")
    ]
    return source


def test_vm_targets_leave_the_runner_label_to_the_sidecar() -> None:
    # The VM config sets `runner` statically; a target label of the same name would
    # turn the sidecar's into exported_runner.
    assert "runner" in load_config(DEPLOY / "systemd" / "config.yml").labels
    for group in load_yaml(DEPLOY / "prometheus" / "targets" / "vms.yml"):
        assert "runner" not in group.get("labels", {})
        assert all(t.endswith(f":{WEB_PORT}") for t in group["targets"])


# --- Compose -------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)  # type: ignore[no-any-return]


def volume_specs(service: str) -> list[tuple[str, str]]:
    """(source, target) of a service's short-syntax volumes."""
    pairs = []
    for entry in compose()["services"][service].get("volumes", []):
        source, target, *_ = entry.split(":")
        pairs.append((source, target))
    return pairs


def bind_mounts(service: str) -> list[tuple[Path, str]]:
    return [
        ((COMPOSE_FILE.parent / source).resolve(), target)
        for source, target in volume_specs(service)
        if source.startswith((".", "/"))
    ]


def test_compose_has_the_whole_picture() -> None:
    services = compose()["services"]
    assert set(services) == {"step-runner", "sidecar", "traffic", "prometheus", "grafana"}
    sidecar = services["sidecar"]
    # The sidecar runs exactly as the image does; nothing overrides its command.
    assert "entrypoint" not in sidecar and "command" not in sidecar
    assert sidecar["build"] == {"context": "../..", "dockerfile": "deploy/Dockerfile"}
    assert (COMPOSE_FILE.parent / sidecar["build"]["context"] / "deploy/Dockerfile").is_file()
    assert f"{WEB_PORT}:{WEB_PORT}" in sidecar["ports"]
    for name in ("step-runner", "sidecar", "traffic"):
        assert services[name]["image"] == sidecar["image"]
        assert services[name]["read_only"] is True
        assert services[name]["cap_drop"] == ["ALL"]
    for service in services.values():
        for key in service.get("environment", {}):
            assert not SECRET_NAME.search(key), f"no secrets in compose.yaml: {key}"


def test_compose_references_only_existing_files_and_declared_volumes() -> None:
    spec = compose()
    declared = set(spec.get("volumes", {}))
    used = set()
    for name in spec["services"]:
        for source, _target in volume_specs(name):
            if source.startswith((".", "/")):
                path = (COMPOSE_FILE.parent / source).resolve()
                generated = REPO / "rules" in path.parents or REPO / "dashboards" in path.parents
                if generated and not path.exists():
                    pytest.skip(f"the monitoring bundle has not generated {path} yet")
                assert path.exists(), f"{name}: {source} does not exist"
                assert REPO in path.parents, f"{name}: {source} is outside the repository"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
    assert used == declared


def test_compose_sockets_meet_in_the_shared_volume() -> None:
    services = compose()["services"]
    config = load_config(image_config_source())
    upstream, listen = socket_path(str(config.upstream)), socket_path(str(config.listen))

    def argument(service: str, flag: str) -> str:
        command = services[service]["command"]
        return socket_path(command[command.index(flag) + 1])

    def in_volume(service: str, path: str) -> tuple[str, str]:
        for source, target in volume_specs(service):
            if path.startswith(target + "/"):
                return source, path[len(target) + 1 :]
        raise AssertionError(f"{service}: nothing mounted at {path}")

    assert in_volume("step-runner", argument("step-runner", "--listen")) == in_volume(
        "sidecar", upstream
    )
    assert in_volume("traffic", argument("traffic", "--target")) == in_volume("sidecar", listen)
    demo = [t for s, t in bind_mounts("traffic") if s.name == "demo_roles.py"]
    assert services["traffic"]["entrypoint"] == ["python", *demo]


def test_compose_prometheus_loads_the_example_config_rules_and_targets() -> None:
    mounts = {target: source for source, target in bind_mounts("prometheus")}
    prometheus = compose()["services"]["prometheus"]
    config_flag = [a for a in prometheus["command"] if a.startswith("--config.file=")]
    config_path = config_flag[0].split("=", 1)[1]
    assert mounts[config_path] == DEPLOY / "prometheus" / "prometheus.yml"
    config_dir = posixpath.dirname(config_path)
    patterns = [*prometheus_config()["rule_files"]]
    patterns += [f for sd in prometheus_scrape_job()["file_sd_configs"] for f in sd["files"]]
    for pattern in patterns:
        absolute = posixpath.join(config_dir, pattern)
        assert any(
            fnmatch.fnmatchcase(target, absolute)
            or any(
                fnmatch.fnmatchcase(posixpath.join(target, p.name), absolute)
                for p in (source.iterdir() if source.is_dir() else [])
            )
            for target, source in mounts.items()
        ), f"nothing mounted matches {absolute}"
    for group in load_yaml(DEPLOY / "compose" / "prometheus-targets" / "compose.yml"):
        assert group["targets"] == [f"sidecar:{WEB_PORT}"]


def grafana_provisioning(kind: str) -> list[dict[str, Any]]:
    """Every entry of the files Compose mounts into Grafana's provisioning/<kind>/."""
    return [
        entry
        for source, target in bind_mounts("grafana")
        if posixpath.dirname(target) == f"/etc/grafana/provisioning/{kind}"
        for entry in load_yaml(source).get("providers" if kind == "dashboards" else kind, [])
    ]


def test_compose_grafana_is_provisioned_with_prometheus_and_the_dashboards() -> None:
    datasources, providers = grafana_provisioning("datasources"), grafana_provisioning("dashboards")
    assert datasources and providers
    services = compose()["services"]
    urls = {d["url"] for d in datasources if d["type"] == "prometheus"}
    assert urls == {"http://prometheus:9090"}
    assert "9090:9090" in services["prometheus"]["ports"]
    mounts = {target: source for source, target in bind_mounts("grafana")}
    for provider in providers:
        assert mounts.get(provider["options"]["path"]) == REPO / "dashboards"
    assert dashboard_files(), "the provisioned directory holds the dashboards"


# --- systemd -------------------------------------------------------------------------


def unit_directives(path: Path = UNIT_FILE) -> dict[str, list[str]]:
    """`Section.Key` -> every value, in order (systemd keys may repeat)."""
    directives: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        directives.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return directives


def unit_value(key: str) -> str:
    (value,) = unit_directives()[key]
    return value


def exec_start() -> list[str]:
    return shlex.split(unit_value("Service.ExecStart"))


@pytest.mark.parametrize("unit", [UNIT_FILE, DOCKER_UNIT], ids=lambda p: p.name)
def test_unit_is_sandboxed(unit: Path) -> None:
    service = {k.removeprefix("Service."): v for k, v in unit_directives(unit).items()}
    assert service.get("DynamicUser") == ["yes"] or "User" in service
    required = {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectHome": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "CapabilityBoundingSet": "",
    }
    for key, value in required.items():
        assert service.get(key) == [value], f"{key}={value}"
    families = set(service["RestrictAddressFamilies"][0].split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6"}


def test_unit_runs_the_console_script_on_the_vm_config() -> None:
    argv = exec_start()
    assert argv[0] == f"{venv_dir_of_build()}/bin/{console_script()}"
    assert argv[1:] == ["serve", "--config.file", CONFIG_ON_VM]
    config = load_config(DEPLOY / "systemd" / "config.yml")
    # The only writable path is where the sidecar creates its socket.
    (writable,) = unit_value("Service.ReadWritePaths").split()
    assert posixpath.dirname(socket_path(str(config.listen))) == writable
    timeout = unit_value("Service.TimeoutStopSec")
    assert timeout.endswith("s") and float(timeout[:-1]) > stop_budget(config)
    assert int(unit_value("Service.MemoryMax").removesuffix("M")) * 2**20 == memory_limit()
    # tmpfiles.d creates both socket directories, setgid to the runner's group.
    created = {
        fields[1]: fields
        for line in (DEPLOY / "systemd" / "step-runner-exporter.tmpfiles.conf")
        .read_text(encoding="utf-8")
        .splitlines()
        if (fields := line.split()) and not line.startswith("#")
    }
    for address in (config.listen, config.upstream):
        directory = created[posixpath.dirname(socket_path(str(address)))]
        assert (
            directory[0] == "d"
            and directory[2].startswith("2")
            and directory[4] == (unit_value("Service.SupplementaryGroups"))
        )


def memory_limit() -> int:
    limit = sidecar_of(deployment_spec())["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    return int(limit[:-2]) * 2**20


def test_step_runner_unit_serves_the_vm_upstream_socket() -> None:
    directives = unit_directives(DEPLOY / "systemd" / "step-runner.service")
    environment = dict(
        item.split("=", 1)
        for value in directives["Service.Environment"]
        for item in shlex.split(value)
    )
    config = load_config(DEPLOY / "systemd" / "config.yml")
    assert f"{environment['TMPDIR']}/step-runner.sock" == socket_path(str(config.upstream))


# --- the docker tap (SPEC section 7) ---------------------------------------------------

# Where Docker's packaging puts the daemon's socket (docker.socket's ListenStream); /var/run
# is a symlink to /run on every systemd host, and Runner and the docker CLI use this path.
DAEMON_SOCKET = "/var/run/docker.sock"
DOCKER_GROUP = "docker"
TAP_UNIT_NAME = DOCKER_UNIT.name
# GitLab Runner retries a failed job preparation 3 s apart (common.PreparationRetryInterval).
RUNNER_PREPARE_RETRY_SECONDS = 3.0


@dataclass(frozen=True)
class DockerLayout:
    """One way to deploy the docker tap: its config file and the drop-ins it installs,
    by the unit each one extends."""

    name: str
    config: Path
    dropins: Mapping[str, Path]


BESIDE = DockerLayout("beside", DOCKER_TAP / "docker.yml", {})
IN_PLACE_LAYOUT = DockerLayout(
    "in-place",
    IN_PLACE / "docker.yml",
    {
        unit: IN_PLACE / f"{unit}.d" / "10-step-runner-exporter.conf"
        for unit in ("docker.service", "docker.socket")
    }
    | {TAP_UNIT_NAME: IN_PLACE / f"{TAP_UNIT_NAME}.d" / "10-in-place.conf"},
)
DOCKER_LAYOUTS = (BESIDE, IN_PLACE_LAYOUT)


def effective_directives(unit: Path, *dropins: Path) -> dict[str, list[str]]:
    """A unit's settings after its drop-ins, as systemd reads them: every assignment in
    order (a single-valued setting is its last one, see `last`), and an empty assignment
    resets the setting."""
    merged: dict[str, list[str]] = {}
    for path in (unit, *dropins):
        for key, values in unit_directives(path).items():
            for value in values:
                if value == "":
                    merged[key] = []
                else:
                    merged.setdefault(key, []).append(value)
    return merged


def last(directives: Mapping[str, list[str]], key: str) -> str:
    return directives[key][-1]


def words(directives: Mapping[str, list[str]], key: str) -> list[str]:
    return [word for value in directives.get(key, []) for word in value.split()]


def seconds(value: str) -> float:
    """A systemd time span of the simple forms the units use (500ms, 2s, 1min)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|min)?", value)
    assert match, f"unexpected time span {value!r}"
    factor = {"ms": 0.001, "s": 1.0, "min": 60.0, None: 1.0}[match.group(2)]
    return float(match.group(1)) * factor


def docker_unit_of(layout: DockerLayout) -> dict[str, list[str]]:
    extra = [layout.dropins[TAP_UNIT_NAME]] if TAP_UNIT_NAME in layout.dropins else []
    return effective_directives(DOCKER_UNIT, *extra)


def docker_exec_start() -> list[str]:
    (start,) = unit_directives(DOCKER_UNIT)["Service.ExecStart"]
    return shlex.split(start)


def docker_tap_runner() -> dict[str, Any]:
    config = tomllib.loads((DOCKER_TAP / "gitlab-runner-config.toml").read_text(encoding="utf-8"))
    (runner,) = config["runners"]
    return runner  # type: ignore[no-any-return]


@pytest.mark.parametrize("layout", DOCKER_LAYOUTS, ids=lambda layout: layout.name)
def test_docker_tap_configs_are_valid(layout: DockerLayout) -> None:
    config = load_config(layout.config)
    assert config.tap == "docker"
    assert config.listen is not None and config.upstream is not None
    assert config.listen.kind == "unix" and config.upstream.kind == "unix"
    # The daemon's own permissions: root-equivalent group docker, nobody else.
    assert config.socket.mode == 0o660
    assert config.socket.group == DOCKER_GROUP
    assert config.web.listen_address == ("0.0.0.0", WEB_PORT)
    directives = docker_unit_of(layout)
    assert seconds(last(directives, "Service.TimeoutStopSec")) > stop_budget(config)
    assert DOCKER_GROUP in words(directives, "Service.SupplementaryGroups")


def test_docker_tap_unit_runs_the_console_script_and_always_restarts_fast() -> None:
    argv = docker_exec_start()
    assert argv[0] == f"{venv_dir_of_build()}/bin/{console_script()}"
    assert argv[1:] == ["serve", "--config.file", DOCKER_CONFIG_ON_HOST]
    directives = unit_directives(DOCKER_UNIT)
    assert directives["Service.Restart"] == ["always"]
    (restart_sec,) = directives["Service.RestartSec"]
    # Back before Runner's next preparation attempt, with room for start-up (~0.2 s).
    assert seconds(restart_sec) <= RUNNER_PREPARE_RETRY_SECONDS / 3
    assert directives["Unit.StartLimitIntervalSec"] == ["0"], "never give up restarting"
    assert "docker.service" in words(directives, "Unit.After")
    assert "gitlab-runner.service" in words(directives, "Unit.Before")
    assert "docker.service" in words(directives, "Install.WantedBy")
    # The tap outlives a daemon restart (its socket and bind mounts of it stay valid).
    assert "Unit.BindsTo" not in directives and "Unit.PartOf" not in directives
    assert directives["Service.CapabilityBoundingSet"] == [""]
    # socket.group is a chown of its own socket; the syscall filter must let it through.
    assert directives["Service.SystemCallFilter"][-1] == "@chown"


def test_docker_tap_beside_the_daemon() -> None:
    config = load_config(BESIDE.config)
    directives = docker_unit_of(BESIDE)
    (runtime_directory,) = directives["Service.RuntimeDirectory"]
    listen = socket_path(str(config.listen))
    assert posixpath.dirname(listen) == f"/run/{runtime_directory}"
    assert socket_path(str(config.upstream)) == DAEMON_SOCKET
    assert last(directives, "Service.DynamicUser") == "yes"
    # The one line of GitLab Runner's config.toml: Docker's host is the tap.
    runner = docker_tap_runner()
    assert runner["executor"] == "docker"
    assert runner["docker"]["host"] == str(config.listen)


def test_docker_tap_in_place_of_the_daemon_socket() -> None:
    config = load_config(IN_PLACE_LAYOUT.config)
    assert socket_path(str(config.listen)) == DAEMON_SOCKET
    # docker.socket moves: its packaged ListenStream is reset, the daemon's new one is the
    # tap's upstream, and it stays out of the directory the tap binds in.
    socket_dropin = unit_directives(IN_PLACE_LAYOUT.dropins["docker.socket"])
    assert socket_dropin["Socket.ListenStream"][0] == "", "the packaged path must be reset"
    (moved,) = effective_directives(IN_PLACE_LAYOUT.dropins["docker.socket"])["Socket.ListenStream"]
    assert moved == socket_path(str(config.upstream))
    assert posixpath.dirname(moved) != "/run"
    # Starting the daemon starts its public face.
    service_dropin = unit_directives(IN_PLACE_LAYOUT.dropins["docker.service"])
    assert service_dropin["Unit.Wants"] == [TAP_UNIT_NAME]
    # uid 0 without a single capability: only root may create a file in /run.
    directives = docker_unit_of(IN_PLACE_LAYOUT)
    assert last(directives, "Service.DynamicUser") == "no"
    assert last(directives, "Service.User") == "root"
    assert directives["Service.CapabilityBoundingSet"] == []
    assert unit_directives(DOCKER_UNIT)["Service.CapabilityBoundingSet"] == [""]
    assert directives.get("Service.RuntimeDirectory") == []
    (writable,) = directives["Service.ReadWritePaths"]
    assert posixpath.dirname(DAEMON_SOCKET).replace("/var/run", "/run") == writable
    # One image serves a fleet: `runner` comes from service discovery, not the file.
    assert dict(config.labels) == {}
    job = load_yaml(DEPLOY / "prometheus" / "docker-autoscaler.yml")["scrape_configs"][0]
    assert job["job_name"] == SIDECAR
    assert job["sample_limit"] == prometheus_scrape_job()["sample_limit"]
    assert {sd["port"] for sd in job["ec2_sd_configs"]} == {WEB_PORT}
    assert "runner" in {r["target_label"] for r in job["relabel_configs"]}


def test_effective_directives_reset_on_an_empty_assignment(tmp_path: Path) -> None:
    base, dropin = tmp_path / "a.socket", tmp_path / "b.conf"
    base.write_text("[Socket]\nListenStream=/run/a.sock\nSocketMode=0660\n", encoding="utf-8")
    dropin.write_text("[Socket]\nListenStream=\nListenStream=/run/b.sock\n", encoding="utf-8")
    merged = effective_directives(base, dropin)
    assert merged["Socket.ListenStream"] == ["/run/b.sock"]
    assert merged["Socket.SocketMode"] == ["0660"]
    assert seconds("500ms") == 0.5 and seconds("2s") == 2.0


# --- docs ----------------------------------------------------------------------------


def test_deployment_guide_covers_every_deploy_file() -> None:
    guide = DOCS.read_text(encoding="utf-8")
    for path in sorted(DEPLOY.rglob("*")):
        if (
            path.is_file()
            and "__pycache__" not in path.parts
            and MONITORING_DIR not in path.parents
        ):
            relative = path.relative_to(REPO).as_posix()
            assert relative in guide, f"docs/deployment.md does not mention {relative}"
    headings = re.findall(r"^## (.+)$", guide, re.M)
    for target in ("Container image", "Kubernetes", "VM with systemd", "Compose", "Prometheus"):
        assert any(h.startswith(target) for h in headings), f"no section for {target}"


README = REPO / "README.md"
# A repository path as the docs write it: a top-level directory, then path characters;
# `<name>` and `$name` are placeholders and `*` a glob, each matching one path segment.
REPO_PATH = re.compile(
    r"(?<![\w./$<>-])((?:deploy|docs|examples|rules|dashboards|tests|exporter|monitoring"
    r"|benchmarks)/[\w./*<>$-]*)"
)
EXECUTOR_TABLE = re.compile(r"<!-- executor-table:.*?-->\n(.*?)<!-- /executor-table -->", re.S)
EXECUTORS = {
    "Docker",
    "docker-autoscaler",
    "docker+machine",
    "Kubernetes",
    "instance",
    "shell",
    "nested `run:` steps",
}


def repository_paths(text: str) -> set[str]:
    return {match.rstrip(".,:;") for match in REPO_PATH.findall(text)}


def path_exists(path: str) -> bool:
    pattern = re.sub(r"<[^>/]*>|\$\w+", "*", path)
    if "*" in pattern:
        return any(REPO.glob(pattern))
    return (REPO / pattern).exists()


@pytest.mark.parametrize("doc", [README, DOCS], ids=lambda p: p.name)
def test_every_repository_path_in_the_docs_exists(doc: Path) -> None:
    paths = repository_paths(doc.read_text(encoding="utf-8"))
    assert "deploy/systemd/docker-tap/docker.yml" in paths
    missing = sorted(path for path in paths if not path_exists(path))
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


def test_repository_paths_are_found_and_checked() -> None:
    text = "see `deploy/nope.yml`, [x](docs/runbooks/<Alert>.md) and /etc/deploy/x, `rules/*.yml`."
    assert repository_paths(text) == {"deploy/nope.yml", "docs/runbooks/<Alert>.md", "rules/*.yml"}
    assert not path_exists("deploy/nope.yml")
    assert path_exists("deploy/systemd/docker-tap/in-place/$unit.d/*.conf")


def executor_table(doc: Path) -> str:
    (table,) = EXECUTOR_TABLE.findall(doc.read_text(encoding="utf-8"))
    return str(table)


def test_executor_table_is_the_same_in_readme_and_guide() -> None:
    table = executor_table(DOCS)
    assert executor_table(README) == table
    rows = [line.split("|")[1:-1] for line in table.strip().splitlines()[2:]]
    assert {cells[0].strip() for cells in rows} == EXECUTORS
    covered = {cells[0].strip(): cells[2].strip() for cells in rows}
    assert {name for name, verdict in covered.items() if verdict == "yes"} == {
        "Docker",
        "docker-autoscaler",
    }
    assert covered["shell"] == "cannot be tapped"


def test_docs_give_the_paths_of_the_docker_tap_files() -> None:
    guide, readme = DOCS.read_text(encoding="utf-8"), README.read_text(encoding="utf-8")
    host_line = f'host = "{docker_tap_runner()["docker"]["host"]}"'
    assert host_line in guide and host_line in readme
    for layout in DOCKER_LAYOUTS:
        config = load_config(layout.config)
        for address in (config.listen, config.upstream):
            assert socket_path(str(address)) in guide, address
            assert socket_path(str(address)) in readme, address


def heading_anchors(doc: Path) -> set[str]:
    """GitHub's anchors of a document's headings: lower case, punctuation dropped,
    spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", doc.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", [README, DOCS], ids=lambda p: p.name)
def test_every_link_to_a_section_finds_it(doc: Path) -> None:
    links = re.findall(r"\]\(([\w./-]*)#([\w-]+)\)", doc.read_text(encoding="utf-8"))
    assert links
    for target, anchor in links:
        linked = doc if not target else (doc.parent / target).resolve()
        assert anchor in heading_anchors(linked), f"{doc.name}: {target}#{anchor}"
    assert "in-place-of-the-daemons-socket-docker-autoscaler-instances" in heading_anchors(DOCS)
