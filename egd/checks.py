"""Settings checkers, shared by ``egd.config`` and the drivers (part of the driver toolkit).

A checker takes ``(value, path, problems)``: it returns the converted value, or appends ``"path: what is
wrong"`` to ``problems`` and returns None, so that a whole file is checked in one pass and every problem is
reported at once with its dotted path. A section (the gateway's or a driver's) is a frozen dataclass with a
schema (key -> checker); :func:`build` turns a YAML mapping into it. Messages never echo a value that may be a
secret (tokens, DSNs use :func:`string`, which does not).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, TypeVar

Checker = Callable[[Any, str, list[str]], Any]

_PORT_RANGE = re.compile(r"^(\d+)\.\.(\d+)\Z")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
#: A host name or address as ssh takes it: no space, no leading dash (it would read as an option).
_HOST = re.compile(r"^[A-Za-z0-9_.:@\[\]%-]{1,255}\Z")
_URL = re.compile(r"^https?://[^\s/?#]+(/[^\s?#]*)?\Z")



def number(minimum: float, maximum: float | None = None, integer: bool = False) -> Checker:
    """A number (a whole number with ``integer``) from ``minimum`` to ``maximum`` (both included)."""
    def check(value: Any, path: str, problems: list[str]) -> Any:
        kind = "a whole number" if integer else "a number"
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            problems.append(f"{path}: must be {kind}, got {type(value).__name__}")
            return None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            problems.append(f"{path}: must be {bounds}, got {value}")
            return None
        return value if integer else float(value)

    return check


def seconds(value: Any, path: str, problems: list[str]) -> Any:
    """A positive duration in seconds (0 is refused: a poll interval or timeout of 0 would spin or fail)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.append(f"{path}: must be a number of seconds, got {type(value).__name__}")
        return None
    if not 0 < value <= 86400:
        problems.append(f"{path}: must be a positive number of seconds (at most 86400), got {value}")
        return None
    return float(value)


#: A TCP port to connect to or listen on (1 to 65535).
port = number(1, 65535, integer=True)
#: A TCP port to listen on, 0 meaning any free one.
listen_port = number(0, 65535, integer=True)


def boolean(value: Any, path: str, problems: list[str]) -> Any:
    """``true`` or ``false`` (YAML booleans only: "yes please" is not one)."""
    if not isinstance(value, bool):
        problems.append(f"{path}: must be true or false, got {value!r}")
        return None
    return value


def choice(*choices: str) -> Checker:
    """One of ``choices`` (case-insensitive), returned lower-case."""
    def check(value: Any, path: str, problems: list[str]) -> Any:
        if not isinstance(value, str) or value.lower() not in choices:
            problems.append(f"{path}: must be one of {', '.join(choices)}, got {value!r}")
            return None
        return value.lower()

    return check


def string(value: Any, path: str, problems: list[str]) -> Any:
    """A non-empty string (the value is not echoed: it may be a secret)."""
    if not isinstance(value, str) or not value:
        problems.append(f"{path}: must be a non-empty string")
        return None
    return value


def text(value: Any, path: str, problems: list[str]) -> Any:
    """A non-empty string that is not a secret: the message says what was given instead."""
    if not isinstance(value, str) or not value:
        got = "an empty string" if value == "" else f"{type(value).__name__} {value!r}"
        problems.append(f"{path}: must be a non-empty string, got {got}")
        return None
    return value


def readable_file(value: Any, path: str, problems: list[str]) -> Any:
    """The path of a file egd can read now."""
    if not isinstance(value, str) or not os.path.isfile(value) or not os.access(value, os.R_OK):
        problems.append(f"{path}: not a readable file: {value!r}")
        return None
    return value


def refused(why: str, harmless: tuple[Any, ...] = (None,)) -> Checker:
    """A key a section inherits but cannot honour: a value other than the ``harmless`` ones (what the section does
    anyway) is a problem saying ``why``, so that an operator does not believe it does what it does elsewhere."""
    def refuse(value: Any, path: str, problems: list[str]) -> Any:
        if not any(value is ok for ok in harmless):
            problems.append(f"{path}: {why}")
        return None

    return refuse


def optional(check: Checker) -> Checker:
    """``check``, with ``null`` allowed (and kept as None)."""
    def optional_check(value: Any, path: str, problems: list[str]) -> Any:
        return None if value is None else check(value, path, problems)

    return optional_check


def ip(value: Any, path: str, problems: list[str]) -> Any:
    """An IPv4 or IPv6 address, normalized."""
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        problems.append(f"{path}: not an IP address: {value!r}")
        return None


def _list_of(value: Any, path: str, problems: list[str], what: str, fits: Callable[[Any], bool],
             wrong: Callable[[Any], str]) -> Any:
    """``value`` as a tuple when it is a list of items that ``fits``; otherwise a problem for the list (not a
    list of ``what``) or one for each item that does not fit (``wrong(item)`` says why)."""
    if not isinstance(value, list):
        problems.append(f"{path}: must be a list of {what}")
        return None
    bad = [f"{path}[{i}]: {wrong(v)}" for i, v in enumerate(value) if not fits(v)]
    problems.extend(bad)
    return None if bad else tuple(value)


def names(value: Any, path: str, problems: list[str]) -> Any:
    """A list of environment variable names (or ``*``)."""
    return _list_of(value, path, problems, "names",
                    lambda v: isinstance(v, str) and bool(_ENV_NAME.match(v) or v == "*"),
                    lambda v: f"not an environment variable name: {v!r}")


def strings(value: Any, path: str, problems: list[str]) -> Any:
    """A list of non-empty strings, as a tuple."""
    return _list_of(value, path, problems, "strings", lambda v: isinstance(v, str) and bool(v),
                    lambda v: "must be a non-empty string")


def whole_numbers(value: Any, path: str, problems: list[str]) -> Any:
    """A list of whole numbers (0 or more), as a tuple."""
    return _list_of(value, path, problems, "whole numbers",
                    lambda v: not isinstance(v, bool) and isinstance(v, int) and v >= 0,
                    lambda v: f"must be a whole number >= 0, got {v!r}")


def host_names(value: Any, path: str, problems: list[str]) -> Any:
    """A non-empty list of host names (a single string is refused: it is not silently split into letters)."""
    if not isinstance(value, list):
        got = "a string" if isinstance(value, str) else type(value).__name__
        problems.append(f"{path}: expected a list of host names, got {got}")
        return None
    if not value:
        problems.append(f"{path}: list at least one host")
        return None
    bad = [f"{path}[{i}]: not a host name: {v!r}" for i, v in enumerate(value)
           if not isinstance(v, str) or not _HOST.match(v) or v.startswith("-")]
    problems.extend(bad)
    return None if bad else tuple(value)


def urls(value: Any, path: str, problems: list[str]) -> Any:
    """One http(s) URL or a non-empty list of them, as a tuple."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(u, str) and _URL.match(u) for u in items):
        problems.append(f"{path}: list the web addresses, e.g. http://rm1:8088, got {value!r}")
        return None
    return tuple(items)


def string_map(value: Any, path: str, problems: list[str]) -> Any:
    """A mapping of names to scalar values, both kept as strings (``null``: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, (str, int, float, bool)) for v in value.values()):
        problems.append(f"{path}: must be a mapping of names to values")
        return None
    return {str(k): str(v) for k, v in value.items()}


def port_range(value: Any, path: str, problems: list[str]) -> Any:
    """``"LOW..HIGH"``: at least 20 unprivileged ports, as ``(low, high)``."""
    match = _PORT_RANGE.match(str(value))
    if not match:
        problems.append(f"{path}: must look like 40000..41000, got {value!r}")
        return None
    low, high = int(match.group(1)), int(match.group(2))
    if not 1024 <= low < high <= 65535 or high - low < 20:
        problems.append(f"{path}: needs 1024 <= low < high <= 65535 and at least 20 ports, got {value}")
        return None
    return (low, high)


class Settings:
    """Base of a settings section: a frozen dataclass whose ``schema`` checks each key of its YAML mapping.

    A key absent from the mapping keeps the field's default; a field without a default is required.
    :meth:`problems` adds the checks that span several keys.
    """

    schema: ClassVar[Mapping[str, Checker]] = {}

    def problems(self) -> list[str]:
        """``"key: what is wrong"`` for what no single key's checker can see (none by default)."""
        return []


S = TypeVar("S", bound=Settings)


#: Up to this many known keys, an unknown key's message lists them all when none is close.
_LISTED_KEYS = 8


def unknown_key(path: str, key: Any, known: Iterable[str], kind: str = "key") -> str:
    """The problem of ``key``, not one of the ``known`` keys under ``path`` (empty: the top level): the close
    match when there is one (a typo), else the known keys when they are few."""
    names = sorted(known)
    close = difflib.get_close_matches(str(key), names, n=1)
    if close:
        hint = f"did you mean {close[0]}?"
    elif len(names) <= _LISTED_KEYS:
        hint = f"known: {', '.join(names)}"
    else:
        hint = f"none of the {len(names)} keys of {path} is close; the configuration reference lists them"
    return f"{path}.{key}: unknown {kind} ({hint})" if path else f"{key}: unknown {kind} ({hint})"


def check_keys(schema: Mapping[str, Checker], raw: Mapping[Any, Any], path: str, problems: list[str],
               kind: str = "setting") -> dict[str, Any]:
    """Each key of ``raw`` checked by its checker (an unknown key is a problem, named as a ``kind``, with the
    close match of a typo: :func:`unknown_key`): the values that passed."""
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in schema:
            problems.append(unknown_key(path, key, schema, kind))
            continue
        checked = schema[key](value, f"{path}.{key}", problems)
        if checked is not None or value is None:
            values[key] = checked
    return values


def _required(cls: type, raw: Mapping[Any, Any], path: str) -> list[str]:
    """The fields of ``cls`` without a default that ``raw`` lacks, as problems."""
    return [f"{path}.{f.name}: required" for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in raw]


def build(cls: type[S], raw: Any, path: str, problems: list[str]) -> S | None:
    """``raw`` (a YAML mapping, or None for all defaults) checked against ``cls.schema`` into a ``cls``; None,
    with every problem appended under ``path``, when it is not valid."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.append(f"{path}: must be a mapping (or empty)")
        return None
    before = len(problems)
    values = check_keys(cls.schema, raw, path, problems)
    problems.extend(_required(cls, raw, path))
    if len(problems) > before:
        return None
    built = cls(**values)
    problems.extend(f"{path}.{problem}" for problem in built.problems())
    return None if len(problems) > before else built


def settings_of(cls: type[S], settings: Any, path: str) -> S:
    """``settings`` as a ``cls``: itself when it already is one (egd's config built it), else the mapping
    checked; ``ValueError`` listing every problem otherwise. For drivers built outside a config (tests)."""
    if isinstance(settings, cls):
        return settings
    problems: list[str] = []
    built = build(cls, settings, path, problems)
    if built is None:
        raise ValueError("; ".join(problems))
    return built
