"""Placeholder being replaced in this session; registers no subcommand yet."""

import argparse
from typing import Any


def add_subcommands(sub: Any) -> None:
    """Register this module's subcommands on the `perkamo-webhooks` parser."""
    _ = (sub, argparse)
