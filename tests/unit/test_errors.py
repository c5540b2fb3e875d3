"""consumer.errors: every exception the package defines has the one root, PerkamoError."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import consumer
from consumer.errors import PerkamoError


def test_every_exception_class_is_a_perkamo_error() -> None:
    strays = []
    for info in pkgutil.walk_packages(consumer.__path__, "consumer."):
        if info.name == "consumer.__main__":
            continue
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != info.name or not issubclass(cls, BaseException):
                continue
            if cls is not PerkamoError and not issubclass(cls, PerkamoError):
                strays.append(f"{info.name}.{name}")
    assert not strays, f"subclass PerkamoError: {strays}"
