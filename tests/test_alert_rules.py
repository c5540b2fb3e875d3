"""Prometheus alert rules and config in deploy/prometheus/ (docs/operations.md).

promtool checks the rules, runs their unit tests (alerts_test.yml) and checks the scrape config.
Without promtool (Debian package `prometheus`) these tests skip locally, but fail when CI is set.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from consumer.constants import ATTEMPTS_TOPIC, EVENTS_TOPIC, HELD_TOPIC, RETRY_TOPIC_PREFIX
from consumer.metrics import Metrics, metric_names

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
CONFIG = PROM_DIR / "prometheus.yml"

JOB = "perkamo-webhooks"
CONFIG_RULES_PATH = "/etc/prometheus/alerts.yml"
METRIC_RE = re.compile(r"\bperkamo_webhook_[a-z_]+")
OTHER_METRIC_RE = re.compile(r"\b(up|process_[a-z_]+)\b")
REQUIRED_ANNOTATIONS = ("summary", "description", "runbook")


def _load(path: Path) -> dict:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def _rules() -> list[dict]:
    groups = _load(ALERTS)["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _process_metrics() -> set[str]:
    """The process_* series the service's registry really exports (prometheus-client)."""
    registry = Metrics().registry
    return {
        sample.name
        for family in registry.collect()
        for sample in family.samples
        if sample.name.startswith("process_")
    }


def _alert_names() -> list[str]:
    return [rule["alert"] for rule in _rules() if "alert" in rule]



def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_promtool_check_rules(promtool: str) -> None:
    result = _run([promtool, "check", "rules", ALERTS.name], cwd=PROM_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_promtool_rule_unit_tests(promtool: str) -> None:
    # alerts_test.yml names its rule file relative to deploy/prometheus/
    result = _run([promtool, "test", "rules", ALERTS_TEST.name], cwd=PROM_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_check_config(promtool: str, tmp_path: Path) -> None:
    """The compose config, with only its rule file path pointed at this repo's file."""
    config = _load(CONFIG)
    assert config["rule_files"] == [CONFIG_RULES_PATH]
    config["rule_files"] = [str(ALERTS)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    result = _run([promtool, "check", "config", "prometheus.yml"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_config_scrapes_every_role_and_loads_the_rules() -> None:
    """One job (the rules match job="perkamo-webhooks"), a `role` label per target group."""
    config = _load(CONFIG)
    assert config["rule_files"] == [CONFIG_RULES_PATH]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs[JOB]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    by_role: dict[str, list[str]] = {}
    for static in job["static_configs"]:
        by_role.setdefault(static["labels"]["role"], []).extend(static["targets"])
    assert {role: sorted(t) for role, t in by_role.items()} == {
        "history": ["history:9464"],
        "deliver": ["deliver-1:9465", "deliver-2:9465"],
    }


def test_one_group_named_after_the_job() -> None:
    groups = _load(ALERTS)["groups"]
    assert [g["name"] for g in groups] == [JOB]


def test_every_rule_has_severity_and_annotations() -> None:
    names = _alert_names()
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in _rules():
        assert "alert" in rule, f"recording rules are not expected here: {rule}"
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        for key in REQUIRED_ANNOTATIONS:
            assert rule["annotations"].get(key, "").strip(), f"{name} lacks {key}"
        runbook = rule["annotations"]["runbook"]
        assert "\n" not in runbook.strip(), f"{name}: runbook must be one line"
        assert "resend" in runbook, f"{name}: runbook must say whether/how to resend"


def test_required_alerts_are_there() -> None:
    rules = {rule["alert"]: rule["expr"] for rule in _rules()}

    def using(*needles: str) -> list[str]:
        return [name for name, expr in rules.items() if all(n in expr for n in needles)]

    assert using("perkamo_webhook_attempts_total", 'outcome!="delivered"', "by (space)")
    assert using("perkamo_webhook_circuit_state", "by (space)")
    assert using("perkamo_webhook_dead_lettered_total", "increase(")
    assert using("perkamo_webhook_consumer_lag", "by (topic)", "deriv(")
    assert using("perkamo_webhook_consumer_lag", "perkamo_webhook_events_consumed_total")
    assert using("perkamo_webhook_history_write_errors_total")
    assert using("perkamo_webhook_history_buffer_rows")
    assert using(f'up{{job="{JOB}"}} == 0')
    assert using(f'absent(up{{job="{JOB}"}})')
    assert using(f'sum(perkamo_webhook_consumer_lag{{topic="{ATTEMPTS_TOPIC}"}}) > 10000')


_LAG_SELECTOR = re.compile(r"perkamo_webhook_consumer_lag\{([^}]*)\}")
_TOPIC_NOT_REGEX = re.compile(r'topic!~"((?:[^"\\]|\\.)*)"')


def test_input_lag_alerts_leave_out_retry_held_and_attempts_topics() -> None:
    """Lag on a retry tier (due later), the held topic (an open circuit) or the attempts topic
    (the history role's input, its own alert) is no input lag."""
    input_lag = [
        rule for rule in _rules()
        if "perkamo_webhook_consumer_lag" in rule["expr"] and ATTEMPTS_TOPIC not in rule["expr"]
    ]
    assert {r["alert"] for r in input_lag} >= {
        "PerkamoWebhookConsumerLagHigh", "PerkamoWebhookConsumerLagGrowing",
        "PerkamoWebhookConsumerStalled",
    }
    for rule in input_lag:
        selectors = _LAG_SELECTOR.findall(rule["expr"])
        assert selectors, rule["alert"]
        for selector in selectors:
            match = _TOPIC_NOT_REGEX.search(selector)
            assert match, f"{rule['alert']}: {selector} excludes no topics"
            # the PromQL string literal turns \\ into \; PromQL regexes are anchored (fullmatch)
            pattern = re.compile(match.group(1).replace("\\\\", "\\"))
            for topic in (RETRY_TOPIC_PREFIX + "1h", RETRY_TOPIC_PREFIX + "24h", HELD_TOPIC,
                          ATTEMPTS_TOPIC):
                assert pattern.fullmatch(topic), f"{rule['alert']} counts lag on {topic}"
            for topic in (EVENTS_TOPIC, "perkamo.events.eu"):
                assert not pattern.fullmatch(topic), f"{rule['alert']} ignores {topic}"
    (history,) = [r for r in _rules() if r["alert"] == "PerkamoWebhookHistoryLagging"]
    assert history["labels"]["severity"] == "warning" and history["for"] == "10m"
    assert "no resend needed" in history["annotations"]["runbook"]


def test_every_metric_in_the_rules_is_exported() -> None:
    exported = metric_names() | _process_metrics() | {"up"}
    used: set[str] = set()
    for rule in _rules():
        used |= set(METRIC_RE.findall(rule["expr"]))
        used |= set(OTHER_METRIC_RE.findall(rule["expr"]))
    assert used, "no metric names found in the rules"
    assert used - exported == set()


def test_metric_name_check_catches_a_typo() -> None:
    """The regex above really finds names, so a misspelt metric would not slip through."""
    expr = "rate(perkamo_webhook_attempt_total[5m]) > 0 and up == 0"
    assert METRIC_RE.findall(expr) == ["perkamo_webhook_attempt_total"]
    assert "perkamo_webhook_attempt_total" not in metric_names()


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in _load(ALERTS_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = set(_alert_names())
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested not firing"
    assert _load(ALERTS_TEST)["rule_files"] == [ALERTS.name]


def test_sre_doc_lists_every_metric_and_alert() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    # a histogram is documented once, by its base name
    documented = {re.sub(r"_(bucket|sum|count)$", "", name) for name in metric_names()}
    missing_metrics = {name for name in documented if f"`{name}`" not in doc}
    missing_alerts = {name for name in _alert_names() if f"`{name}`" not in doc}
    assert missing_metrics == set()
    assert missing_alerts == set()
    assert "perkamo-webhooks resend <delivery_id>" in doc
    assert "perkamo-webhooks replay --space S --since T" in doc
