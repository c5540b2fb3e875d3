"""Issue 13, item 5: endpoint-record errors say which field breaks which rule, in a sentence,
wherever a record is read (the file at start-up, the registry follower's log, the CLI); the CLI
prints receiver-controlled text as plain text, never as Rich markup."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer import cli_history_output as history_output
from consumer.endpoints import EndpointRegistry, load_file, parse_record
from consumer.errors import InvalidEndpoint

SECRET_PATH = "/hooks/s3cr3t-path"

SENTENCES = [
    ({"space": "shop", "url": f"http://hooks.example.com{SECRET_PATH}"},
     "url must be an https:// URL (it is http:); plain http and other schemes are refused"),
    ({"space": "shop", "url": f"ftp://hooks.example.com{SECRET_PATH}"}, "url must be an https:// URL"),
    ({"space": "shop", "url": f"hooks.example.com{SECRET_PATH}"}, "url must be an https:// URL"),
    ({"space": "shop", "url": f"https://u:p@hooks.example.com{SECRET_PATH}"},
     "url must not carry credentials"),
    ({"space": "shop", "url": f"https://hooks.example.com{SECRET_PATH} x"},
     "url must not contain spaces"),
    ({"space": "shop", "url": "https://" + "a" * 2100}, "url must be at most 2048 characters"),
    ({"space": "shop", "url": f"https://hooks.example.com:0{SECRET_PATH}"},
     "url port must be a number from 1 to 65535"),
    ({"space": "shop", "url": f"https://hooks.example.com:99999{SECRET_PATH}"},
     "url port must be a number from 1 to 65535"),
    ({"space": "shop", "url": f"https://bücher.example{SECRET_PATH}"}, "url host must be plain ASCII"),
    ({"space": "shop", "url": f"https://ho%73t.example{SECRET_PATH}"}, "url host must be a DNS name"),
    ({"space": "shop", "url": 42}, "url must be a string"),
    ({"space": "Shop!", "url": "https://hooks.example.com/h"}, "space must be a Space slug"),
    ({"url": "https://hooks.example.com/h"}, "space is required"),
    ({"space": "shop"}, "url is required"),
    ({"space": "shop", "url": "https://hooks.example.com/h", "active": "yes"},
     "active must be true or false"),
    ({"space": "shop", "url": "https://hooks.example.com/h", "id": "endpoint-1"},
     "id must be ep_ followed by"),
    ({"space": "shop", "url": "https://hooks.example.com/h", "colour": "red"},
     "unknown field 'colour'; an endpoint record has space, url, active, id, signing_secrets"),
    ({"space": "shop", "url": "https://hooks.example.com/h", "signing_secrets": "whsec_x"},
     "signing_secrets must be a list"),
    ({"space": "shop", "url": "https://hooks.example.com/h", "signing_secrets": ["nope"]},
     "signing_secrets[0]: a signing secret does not start with 'whsec_'"),
    (["not", "an", "object"], "an endpoint record must be a JSON object"),
]


@pytest.mark.parametrize(("doc", "sentence"), SENTENCES, ids=[s[1][:40] for s in SENTENCES])
def test_record_errors_name_the_field_and_the_rule(doc: Any, sentence: str) -> None:
    with pytest.raises(InvalidEndpoint) as caught:
        parse_record(doc)
    message = str(caught.value)
    assert sentence in message
    assert "violates" not in message and "data." not in message
    assert "s3cr3t" not in message  # the URL is a secret


def test_the_file_loader_says_which_record_and_why(tmp_path: Path) -> None:
    # Measured: a plain http:// endpoint stopped start-up with "data.url violates pattern".
    path = tmp_path / "endpoints.json"
    path.write_bytes(orjson.dumps([{"space": "ok", "url": "https://hooks.example.com/h"},
                                   {"space": "plain", "url": f"http://hooks.example.com{SECRET_PATH}"}]))
    with pytest.raises(InvalidEndpoint) as caught:
        load_file(path)
    assert str(caught.value) == (
        f"PERKAMO_ENDPOINTS_FILE {path}: record 1: url must be an https:// URL (it is http:); "
        "plain http and other schemes are refused")


def test_start_up_refuses_the_file_with_the_sentence(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.json"
    path.write_bytes(orjson.dumps([{"space": "plain", "url": f"http://hooks.example.com{SECRET_PATH}"}]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERKAMO_")}
    env.update({"PERKAMO_ENDPOINTS_FILE": str(path), "PERKAMO_DATA_DIR": str(tmp_path / "data"),
                "PERKAMO_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"})
    result = subprocess.run([sys.executable, "-m", "consumer", "run"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 78, result.stderr  # EX_CONFIG: a setting no restart mends
    assert "record 0: url must be an https:// URL" in result.stderr
    assert "s3cr3t" not in result.stderr and "Traceback" not in result.stderr


def test_the_registry_follower_logs_the_sentence(caplog: pytest.LogCaptureFixture) -> None:
    registry = EndpointRegistry()
    caplog.set_level(logging.WARNING)
    value = orjson.dumps({"space": "shop", "url": f"http://hooks.example.com{SECRET_PATH}"})
    assert registry.apply(b"shop", value) == "schema"
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "url must be an https:// URL" in logged
    assert "s3cr3t" not in logged


@pytest.mark.parametrize(("args", "sentence"), [
    (["--space", "shop", "--url", f"http://hooks.example.com{SECRET_PATH}"], "url must be an https:// URL"),
    (["--record", orjson.dumps({"space": "shop", "url": f"https://127\u30020\u30020\u30021{SECRET_PATH}"
                                }).decode()], "url host must be plain ASCII"),
    (["--record", orjson.dumps({"space": "shop", "url": "https://h.example/x", "id": "bad"}).decode()],
     "id must be ep_"),
])
def test_the_cli_refuses_with_the_sentence(tmp_path: Path, args: list[str], sentence: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERKAMO_")}
    env["PERKAMO_KAFKA_BOOTSTRAP_SERVERS"] = "127.0.0.1:9"  # never reached: refused before Kafka
    result = subprocess.run([sys.executable, "-m", "consumer", "endpoints", "set", *args], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert sentence in result.stderr and "nothing published" in result.stderr
    assert "s3cr3t" not in result.stderr


# --- receiver text is not markup ---------------------------------------------------------------

LINK = "[link=https://evil.example/phish]click to fix your webhook[/link]"


def detail(error: str, status_text: str) -> dict[str, Any]:
    return {
        "delivery_id": "dlv_x", "space": "shop", "event_id": "evt_[bold]x[/]",
        "event_type": "purchase.completed", "status": "failed",
        "attempts": [{
            "attempt": 1, "trigger": "initial", "status": "failed", "status_code": 500,
            "status_text": status_text, "error_kind": "http_status", "duration_ms": 12,
            "attempted_at": "2026-06-01T10:00:00.000Z", "next_attempt_at": None,
            "replay_id": "", "error": error,
        }],
    }


@pytest.fixture(autouse=True)
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # no wrapping inside the strings looked for


def test_history_detail_prints_receiver_text_literally(capsys: pytest.CaptureFixture[str]) -> None:
    # Measured: a [link=…] in a response became a clickable link in a support terminal.
    history_output.print_detail(detail(f"HTTP 500 {LINK}", "[red]Server Error[/red]"))
    out = capsys.readouterr().out
    assert "[link=https://evil.example/phish]" in out
    assert "[red]Server Error[/red]" in out
    assert "evt_[bold]x[/]" in out
    assert "\x1b]8;" not in out  # no terminal hyperlink escape


def test_history_detail_makes_no_hyperlink_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from io import StringIO

    from rich.console import Console

    buffer = StringIO()
    real = history_output.console

    def terminal() -> Console:
        console = real()
        console.file = buffer
        return console

    monkeypatch.setattr(history_output, "console", terminal)
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("TERM", "xterm-256color")
    history_output.print_detail(detail(LINK, ""))
    out = buffer.getvalue()
    assert "\x1b]8;" not in out and "evil.example/phish]click" in out


def test_history_list_prints_receiver_text_literally(capsys: pytest.CaptureFixture[str]) -> None:
    history_output.print_list({"deliveries": [{
        "first_attempted_at": "2026-06-01T10:00:00.000Z", "delivery_id": "dlv_[blink]x[/]",
        "space": "shop", "event_type": "[link=https://evil.example]t[/link]", "status": "failed",
        "attempts": 1, "last_status_code": 500, "last_error_kind": "http_status",
        "last_attempted_at": "2026-06-01T10:00:00.000Z",
    }], "next_cursor": "abc[/]"})
    out = capsys.readouterr().out
    assert "[link=https://evil.example]" in out and "dlv_[blink]x[/]" in out and "abc[/]" in out
