"""Environment variables for a command's flags: ``--memory-budget`` is also
``EDGE_MEMORY_BUDGET``, ``--no-announce`` is ``EDGE_NO_ANNOUNCE=1``; the command line wins.

Done once, on the argparse parser, so a new flag gets its variable without more code.
systemd units and containers set the variables (``Environment=EDGE_DEVICE=rpi4b-2gb``)
instead of editing a command line.

Each variable's value is checked with the flag's own type only when its command runs
(:func:`resolve`): a bad ``EDGE_MAX_QUEUE`` stops ``edge worker`` naming the variable,
and does not break ``edge plan``. An empty value counts as unset.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Mapping

from edge.errors import ConfigError

__all__ = ["PREFIX", "RENAMED", "env_name", "env_flags", "add_env_defaults", "resolve",
           "env_table"]

PREFIX = "EDGE_"
# Flags whose natural variable already means something else: $EDGE_CERTS is the folder
# `edge certs` keeps the CA and bundles in (``--certs NAME`` is $EDGE_CERTS/NAME).
RENAMED = {"--certs": "EDGE_BUNDLE"}
# Flags of the main parser, with variables of their own (EDGE_LOG, EDGE_LOG_FORMAT).
_SKIPPED = {"--help", "--log-level", "--log-format", "--version"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class _FromEnv:
    """A default that came from the environment, converted by :func:`resolve`."""

    var: str
    raw: str
    flag: str

    def __repr__(self) -> str:  # shown by --help's "(default: ...)" if ever asked
        return f"${self.var}={self.raw}"


def env_name(flag: str) -> str:
    """``--memory-budget`` -> ``EDGE_MEMORY_BUDGET`` (or the name in :data:`RENAMED`)."""
    return RENAMED.get(flag) or PREFIX + flag.lstrip("-").replace("-", "_").upper()


def env_flags(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.Action]]:
    """(flag, variable, action) for each optional flag of ``parser`` that takes one."""
    out = []
    for action in parser._actions:  # argparse has no public list of a parser's actions
        long = [s for s in action.option_strings if s.startswith("--")]
        if not long or long[0] in _SKIPPED or action.help == argparse.SUPPRESS:
            continue
        out.append((long[0], env_name(long[0]), action))
    return out


def add_env_defaults(parser: argparse.ArgumentParser,
                     environ: Mapping[str, str] | None = None) -> None:
    """Let ``parser``'s flags default to their ``EDGE_*`` variables.

    Marks each flag's help with its variable, and takes each variable that is set as the
    flag's default (a required flag set so is no longer required). Call :func:`resolve` on
    the parsed arguments to convert and check those values.

    Args:
        parser: a (sub)command's parser.
        environ: the environment (default ``os.environ``).
    """
    environ = os.environ if environ is None else environ
    parser.set_defaults(_env_parser=parser)  # for resolve(): which actions to convert with
    for flag, var, action in env_flags(parser):
        action.help = f"{action.help or ''} [env {var}]".strip()
        raw = environ.get(var, "")
        if raw != "":
            action.default = _FromEnv(var, raw, flag)
            action.required = False


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Convert the values that came from the environment with their flags' types.

    Raises:
        ConfigError: a value the flag would refuse, naming the variable, the flag, what
            was expected and what came.
    """
    parser = getattr(args, "_env_parser", None)
    if parser is None:
        return args
    actions = {a.dest: a for _, _, a in env_flags(parser)}
    for dest, value in vars(args).items():
        if isinstance(value, _FromEnv):
            setattr(args, dest, _convert(actions[dest], value))
    return args


def _convert(action: argparse.Action, value: _FromEnv):
    where = f"${value.var} (for {value.flag})"
    if action.nargs == 0:  # store_true / store_false
        text = value.raw.strip().lower()
        if text not in _TRUE | _FALSE:
            raise ConfigError(f"{where}: expected 1/true/yes/on or 0/false/no/off, "
                              f"got {value.raw!r}")
        return (text in _TRUE) == bool(action.const)
    try:
        result = action.type(value.raw) if action.type else value.raw
    except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
        detail = str(e) if isinstance(e, argparse.ArgumentTypeError) else (
            f"expected {getattr(action.type, '__name__', 'a valid value')}, got {value.raw!r}")
        raise ConfigError(f"{where}: {detail}") from None
    if action.choices is not None and result not in action.choices:
        raise ConfigError(f"{where}: expected one of {', '.join(map(str, action.choices))}, "
                          f"got {value.raw!r}")
    return result


def env_table(parsers: Mapping[str, argparse.ArgumentParser]) -> str:
    """The README's table of variables: one row per variable, with its flag and the
    commands that read it.

    Args:
        parsers: command name (``edge worker``) -> its parser.
    """
    rows: dict[str, tuple[str, list[str]]] = {}
    for command, parser in parsers.items():
        for flag, var, _ in env_flags(parser):
            rows.setdefault(var, (flag, []))[1].append(f"`{command}`")
    lines = ["| variable | flag | read by |", "|---|---|---|"]
    lines += [f"| `{var}` | `{flag}` | {', '.join(cmds)} |"
              for var, (flag, cmds) in sorted(rows.items())]
    return "\n".join(lines)
