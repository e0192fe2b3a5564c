"""The launcher protocol's signed message format (``docs/launcher-protocol.rst``), shared by both ends.

Standard library only: the launcher (``kernel_launcher.py``, which runs on hosts where only the kernel's Python
exists) imports this module from beside it, and egd imports it as ``egd.launchers.launcher_protocol``. A copy
of the launcher on a host is the two files of this directory, side by side.

Every message is a JSON object on one line, with a protocol version ``v``, a random ``nonce``, a timestamp
``ts`` and ``mac``, the HMAC-SHA256 of the rest under the launch's secret. A message is accepted once
(:class:`NonceCache`), within :data:`MAX_SKEW` seconds of its timestamp.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import time
from typing import Any

PROTOCOL_VERSION = 1
#: The longest line either end reads.
MAX_LINE = 64 * 1024
#: Messages older or newer than this (seconds) are refused; nonces are remembered at least this long.
MAX_SKEW = 120.0


def canonical(message: dict[str, Any]) -> bytes:
    """The bytes a MAC covers: the message without ``mac``, as sorted compact JSON."""
    body = {k: v for k, v in message.items() if k != "mac"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def sign(message: dict[str, Any], secret: bytes) -> dict[str, Any]:
    """``message`` with a fresh nonce, a timestamp and its HMAC-SHA256 ``mac``."""
    signed = dict(message, v=PROTOCOL_VERSION, nonce=secrets.token_hex(16), ts=time.time())
    signed["mac"] = hmac.new(secret, canonical(signed), hashlib.sha256).hexdigest()
    return signed


class NonceCache:
    """Nonces seen recently: a message whose nonce was seen is a replay."""

    def __init__(self, keep: float = 2 * MAX_SKEW) -> None:
        self._keep = keep
        self._seen: dict[str, float] = {}

    def fresh(self, nonce: str, now: float) -> bool:
        """True the first time ``nonce`` is seen (and remembers it)."""
        if len(self._seen) > 10_000 or (self._seen and next(iter(self._seen.values())) < now - self._keep):
            self._seen = {n: t for n, t in self._seen.items() if t >= now - self._keep}
        if nonce in self._seen:
            return False
        self._seen[nonce] = now
        return True


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_message(line: bytes) -> Any:
    """The JSON value of one protocol line, or None when it is not strict JSON (also when nested too deeply,
    which ``json`` reports as ``RecursionError``, or when it uses ``NaN``/``Infinity``)."""
    try:
        return json.loads(line, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        return None


def _unsigned(message: dict[str, Any]) -> bool:
    """Whether the message lacks a well-formed ``mac``, ``nonce`` or numeric ``ts``."""
    mac, nonce, stamp = message.get("mac"), message.get("nonce"), message.get("ts")
    return (not isinstance(mac, str) or not mac.isascii() or not isinstance(nonce, str)
            or isinstance(stamp, bool) or not isinstance(stamp, (int, float)))


def _finite(stamp: float) -> float | None:
    """``stamp`` as a finite float, or None (too large, NaN or infinite: NaN compares false with everything,
    so it would pass the freshness check)."""
    try:
        when = float(stamp)
    except OverflowError:  # an int too large for a float
        return None
    return when if math.isfinite(when) else None


def _mac_problem(message: dict[str, Any], secret: bytes) -> str | None:
    """Why the message's ``mac`` is not the one ``secret`` gives (None when it is)."""
    try:
        expected = hmac.new(secret, canonical(message), hashlib.sha256).hexdigest()
    except (ValueError, RecursionError):  # nested too deeply (or numbers too long) to serialize again
        return "malformed message"
    return None if hmac.compare_digest(str(message["mac"]), expected) else "bad signature"


def verify(message: Any, secret: bytes, nonces: NonceCache, now: float | None = None) -> str | None:
    """None if ``message`` is authentic, fresh and not a replay; otherwise why it is refused."""
    if not isinstance(message, dict):
        return "not a JSON object"
    if _unsigned(message):
        return "unsigned message"
    when = _finite(message["ts"])
    if when is None:
        return "stale message"
    problem = _mac_problem(message, secret)
    if problem is not None:
        return problem
    now = time.time() if now is None else now
    if abs(now - when) > MAX_SKEW:
        return "stale message"
    if not nonces.fresh(str(message["nonce"]), now):
        return "replayed message"
    return None
