"""The project's JSON Schemas (schemas/*.json), compiled once with fastjsonschema."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import fastjsonschema
import orjson

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
_PACKAGED = Path(__file__).resolve().parent / "_schemas"

Validator = Callable[[Any], Any]


def schema_path(name: str) -> Path:
    """Path of `schemas/<name>`, from the source tree or the copy packaged in the wheel."""
    for folder in (SCHEMA_DIR, _PACKAGED):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"schema {name} not found in {SCHEMA_DIR} or {_PACKAGED}")


@cache
def validator(name: str) -> Validator:
    """A compiled validator for `schemas/<name>`; raises JsonSchemaException on bad data."""
    schema = orjson.loads(schema_path(name).read_bytes())
    return fastjsonschema.compile(schema)
