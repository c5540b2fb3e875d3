"""The Grafana dashboard and its provisioning in deploy/grafana/ (docs/operations.md).

Checked statically (no Grafana runs here): every metric a panel queries is exported by the
service, the panels an SRE expects are there, they use the provisioned datasource, and every
query parses as PromQL (with promtool; that one test skips locally without it, fails in CI).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from consumer.metrics import metric_names

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "perkamo-webhooks.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "perkamo.yml"

METRIC_RE = re.compile(r"\bperkamo_webhook_[a-z_]+")
# Grafana's variables, replaced by what Grafana would put there, so promtool can parse the query.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$space": ".*"}


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _panels(dashboard: dict) -> list[dict]:
    """Every panel, those nested in collapsed rows included; rows themselves left out."""
    out: list[dict] = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def _exprs(panel: dict) -> list[str]:
    return [t["expr"] for t in panel.get("targets", []) if t.get("expr")]


def _all_exprs() -> list[str]:
    return [expr for panel in _panels(_dashboard()) for expr in _exprs(panel)]


def _provisioned_uid() -> str:
    config = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))
    (datasource,) = config["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    return str(datasource["uid"])


def test_provisioned_datasource_uid() -> None:
    assert _provisioned_uid() == "prometheus"


def test_dashboard_provider_reads_the_mounted_folder() -> None:
    config = yaml.safe_load(PROVIDERS.read_text(encoding="utf-8"))
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dashboard_model_basics() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "perkamo-webhooks"
    assert 36 <= dashboard["schemaVersion"] <= 41
    ids = [p["id"] for p in dashboard["panels"]] + [
        p["id"] for row in dashboard["panels"] for p in row.get("panels", [])
    ]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in _panels(dashboard):
        assert panel["type"] in {"timeseries", "stat"}, panel["title"]
        assert panel["title"].strip()
        assert _exprs(panel), f"{panel['title']} has no query"
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]


def test_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in _dashboard()["panels"]:
        pos = panel["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_metric_on_the_dashboard_is_exported() -> None:
    used = {name for expr in _all_exprs() for name in METRIC_RE.findall(expr)}
    assert used, "no perkamo_webhook_* metric found on the dashboard"
    assert used - metric_names() == set()


def test_dashboard_covers_every_exported_metric() -> None:
    """An SRE should find every metric docs/operations.md names somewhere on the dashboard."""
    exprs = "\n".join(_all_exprs())
    missing = {
        name
        for name in metric_names()
        if not name.endswith(("_sum", "_count")) and name not in exprs
    }
    assert missing == set()


def test_panels_use_the_provisioned_datasource() -> None:
    uid = _provisioned_uid()
    dashboard = _dashboard()
    for panel in _panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == uid, panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid, variable["name"]


def test_space_variable() -> None:
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    space = variables["space"]
    query = space["query"]["query"] if isinstance(space["query"], dict) else space["query"]
    assert query == "label_values(perkamo_webhook_attempts_total, space)"
    assert space["includeAll"] and space["multi"]
    assert space["allValue"] == ".*"
    # per-Space panels filter on it
    assert any('space=~"$space"' in expr for expr in _all_exprs())


def _find(predicate: object) -> list[str]:
    assert callable(predicate)
    return [p["title"] for p in _panels(_dashboard()) if any(predicate(e) for e in _exprs(p))]


@pytest.mark.parametrize(
    ("what", "needles"),
    [
        ("throughput", ("rate(perkamo_webhook_events_consumed_total",)),
        ("success rate", ('outcome="delivered"', "/", "rate(perkamo_webhook_attempts_total")),
        ("retries per tier", ("perkamo_webhook_retries_scheduled_total", "by (tier)")),
        ("DLQ", ("perkamo_webhook_dead_lettered_total", "by (reason)")),
        ("lag", ("perkamo_webhook_consumer_lag", "by (topic")),
        ("history rows written", ("rate(perkamo_webhook_history_rows_written_total",)),
        ("history buffer", ("perkamo_webhook_history_buffer_rows",)),
        ("history write errors", ("rate(perkamo_webhook_history_write_errors_total",)),
    ],
)
def test_expected_panels(what: str, needles: tuple[str, ...]) -> None:
    assert _find(lambda e: all(n in e for n in needles)), f"no {what} panel"


def test_latency_percentiles_panel() -> None:
    quantiles: set[str] = set()
    for panel in _panels(_dashboard()):
        for expr in _exprs(panel):
            match = re.match(
                r"histogram_quantile\((0\.\d+),\s*sum by \([^)]*\ble\b[^)]*\) "
                r"\(rate\(perkamo_webhook_attempt_duration_seconds_bucket\b",
                expr,
            )
            if match:
                quantiles.add(match.group(1))
    assert {"0.5", "0.95", "0.99"} <= quantiles



def test_every_query_parses(promtool: str, tmp_path: Path) -> None:
    """Each panel query, Grafana variables filled in, as a recording rule promtool checks."""
    rules = []
    for i, query in enumerate(_all_exprs()):
        expr = query
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard_query_{i}", "expr": expr})
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", path.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
