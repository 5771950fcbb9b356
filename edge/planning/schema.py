"""Checking the files users and ``edge plan`` write (plan.json, cluster.yaml, device
profiles) against field tables, with one kind of message: the file, the field, what was
expected and what came.

A table maps each field to ``(kind, required)``. A kind is the name of a scalar kind (a
description and a test, in the ``Schema``'s ``kinds``), another ``Table``, a ``("list",
kind)`` pair, or a function ``check(value, where)`` raising ``FieldError`` for kinds whose
checks reach inside the value. Checks across fields (a budget below the total memory,
unique names) stay with the loader, which raises ``Schema.error`` for them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from edge.errors import ConfigError

__all__ = ["FieldError", "Table", "Schema", "SCALARS", "is_int", "is_number", "show_json",
           "show_python"]


class FieldError(ConfigError, ValueError):
    """A field that is not what its table says. ``field`` is its path (``stages[1].sha256``,
    ``""`` for the whole file); the message says what was expected and what came, and
    ``Schema.check`` adds the file's name."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Table:
    """The fields of one object.

    Attributes:
        fields: name -> (kind, required).
        what: what the object is, for "expected ..., got ..." (``a device``).
    """

    fields: Mapping[str, tuple[Any, bool]]
    what: str = "an object"


def is_int(v: Any) -> bool:
    """An integer, and not a bool (``memory_mb: yes`` must not read as 1)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float, and not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Kinds every file uses. A Schema adds its own (plan.json's sha256 and paths, a profile's
# link) to these.
SCALARS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "any": ("anything", lambda v: True),
    "str": ("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip())),
    "text": ("a string", lambda v: isinstance(v, str)),
    "int": ("an integer >= 0", lambda v: is_int(v) and v >= 0),
    "count": ("an integer > 0", lambda v: is_int(v) and v > 0),
    "number": ("a number >= 0", lambda v: is_number(v) and v >= 0),
    "positive": ("a number > 0", lambda v: is_number(v) and v > 0),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
}


def show_json(v: Any) -> str:
    """A value as plan.json writes it."""
    return (json.dumps(v) if isinstance(v, (str, int, float, bool, list, dict))
            else repr(v))


def show_python(v: Any) -> str:
    """A value from a YAML file, as Python shows it (``'lots'``, ``True``)."""
    return repr(v)


@dataclass(frozen=True)
class Schema:
    """How one family of files is checked and its errors are written.

    Attributes:
        kinds: scalar kinds, name -> (description, test), on top of ``SCALARS``.
        show: writes a value that came (JSON for plan.json, Python for YAML files).
        label: writes a field's path in a message: ``"field {!r}"`` for plan.json,
            ``"{}"`` for YAML files (``devices[0].memory_mb``).
    """

    kinds: Mapping[str, tuple[str, Callable[[Any], bool]]] = field(default_factory=dict)
    show: Callable[[Any], str] = show_python
    label: str = "{}"

    def got(self, v: Any) -> str:
        """What came: ``null``, ``3`` or ``str 'lots'`` (a number's type is plain to see;
        a string's or a bool's is not)."""
        if v is None:
            return "null"
        r = self.show(v)
        r = r if len(r) <= 60 else r[:57] + "..."
        return r if is_number(v) else f"{type(v).__name__} {r}"

    def describe(self, kind: Any) -> str:
        if isinstance(kind, Table):
            return kind.what
        if isinstance(kind, tuple):
            return "a list"
        if callable(kind):
            return getattr(kind, "what", "a value")
        return ({**SCALARS, **self.kinds}[kind])[0]

    def fields(self, v: Any, kind: Any, where: str = "") -> None:
        """Raise ``FieldError`` naming the first field of ``v`` that is not of ``kind``.

        A required field that is absent or null is missing; an optional one that is null is
        checked like any value.
        """
        if isinstance(kind, Table):
            if not isinstance(v, Mapping):
                raise FieldError(where, f"expected {kind.what}, got {self.got(v)}")
            # A typo ('memory_md') silently ignored would make the planner use a default
            # instead of the user's number: reject it.
            unknown = sorted(str(k) for k in v if k not in kind.fields)
            if unknown:
                raise FieldError(where, f"unknown field(s) {', '.join(unknown)}; expected "
                                        f"some of {', '.join(kind.fields)}")
            for key, (sub, required) in kind.fields.items():
                path = f"{where}.{key}".lstrip(".")
                if key not in v or (required and v[key] is None):
                    if required:
                        raise FieldError(path, f"missing; expected {self.describe(sub)}")
                    continue
                self.fields(v[key], sub, path)
        elif isinstance(kind, tuple):  # ("list", item kind)
            if not isinstance(v, list):
                raise FieldError(where, f"expected a list, got {self.got(v)}")
            for i, item in enumerate(v):
                self.fields(item, kind[1], f"{where}[{i}]")
        elif callable(kind):
            kind(v, where)
        else:
            what, ok = {**SCALARS, **self.kinds}[kind]
            if not ok(v):
                raise FieldError(where, f"expected {what}, got {self.got(v)}")

    def error(self, source: str, field: str, message: str) -> ConfigError:
        """The ConfigError for ``field`` of the file ``source``: ``source: field: message``."""
        if not field:
            return ConfigError(f"{source}: {message}")
        return ConfigError(f"{source}: {self.label.format(field)}: {message}")

    def check(self, v: Any, kind: Any, source: str, where: str = "") -> None:
        """``fields``, raising ConfigError that names ``source`` and the field.

        Args:
            v: the parsed file (or a part of it, at ``where``).
            kind: its Table (or kind).
            source: the file's name or path, for the message.
            where: the path of ``v`` inside the file.

        Raises:
            ConfigError: the first field that does not match.
        """
        try:
            self.fields(v, kind, where)
        except FieldError as e:
            raise self.error(source, e.field, str(e)) from None
