"""Every exception class edge defines derives from EdgeError, so a caller (the CLI, a
script embedding edge) can catch everything edge raises on purpose with one clause."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import edge
from edge.errors import EdgeError, MissingPackageError


def _edge_modules():
    for info in pkgutil.walk_packages(edge.__path__, "edge."):
        if info.name.rsplit(".", 1)[-1] == "__main__":  # runs the CLI when imported
            continue
        yield info.name


def test_every_edge_exception_is_an_edge_error():
    defined, wrong, skipped = [], [], []
    for name in _edge_modules():
        try:
            module = importlib.import_module(name)
        except MissingPackageError:  # an optional extra is not installed here
            skipped.append(name)
            continue
        for attr, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == module.__name__):
                defined.append(f"{name}.{attr}")
                if not issubclass(obj, EdgeError):
                    wrong.append(f"{name}.{attr} ({', '.join(b.__name__ for b in obj.__bases__)})")
    assert not wrong, "not derived from EdgeError: " + "; ".join(wrong)
    # The walk must find edge's errors at all, or it proves nothing.
    assert "edge.errors.ConfigError" in defined and "edge.worker.cache.CacheError" in defined
    assert len(skipped) < 5, skipped


@pytest.mark.parametrize("cls, also", [
    ("edge.planning.plan._FieldError", ValueError),  # callers may still catch ValueError
])
def test_errors_keep_their_builtin_bases(cls, also):
    module, attr = cls.rsplit(".", 1)
    assert issubclass(getattr(importlib.import_module(module), attr), also)
