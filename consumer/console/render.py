"""The console's Jinja2 environment: autoescaping everywhere, strict undefined, small filters."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import orjson

from consumer.endpoints import mask_url

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
_BODY_SHOWN_MAX = 256 * 1024  # characters of a request body rendered (the rest is cut)


def _time(value: Any, ms: bool = True) -> str:
    """ISO text or datetime -> `2026-06-01 10:00:03.123` (UTC, the table's precision)."""
    if value is None or value == "":
        return "—"
    moment = value
    if isinstance(value, int | float):
        moment = datetime.fromtimestamp(value, tz=UTC)
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
    if isinstance(moment, datetime):
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        text = moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        return text[:-3] if ms else text[:-7]
    return str(value)


def _percent(value: Any) -> str:
    if value is None:
        return "—"
    return f"{float(value) * 100:.1f} %"


def expires_in(seconds: Any) -> str:
    """Seconds until a certificate expires -> `in 3 days`, `in 5 hours`, `expired 2 days ago`."""
    if seconds is None:
        return "—"
    left = float(seconds)
    days, hours = abs(left) / 86400, abs(left) / 3600
    span = f"{days:.0f} days" if days >= 2 else f"{hours:.0f} hours"
    return f"in {span}" if left >= 0 else f"expired {span} ago"


def pretty_body(text: str) -> str:
    """A request body as indented JSON when it parses, else as it was; bounded in size."""
    try:
        shown = orjson.dumps(orjson.loads(text), option=orjson.OPT_INDENT_2).decode()
    except (orjson.JSONDecodeError, TypeError):
        shown = text
    if len(shown) > _BODY_SHOWN_MAX:
        return shown[:_BODY_SHOWN_MAX] + f"\n… cut at {_BODY_SHOWN_MAX:,} characters"
    return shown


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["ts"] = _time
    env.filters["pct"] = _percent
    env.filters["mask_url"] = mask_url
    env.filters["expires_in"] = expires_in
    return env


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)
