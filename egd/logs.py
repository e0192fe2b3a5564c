"""Log output: text for people and journald, or one JSON object per line for log shippers."""

from __future__ import annotations

import os
import re
import sys
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
    jsonFileLogObserver,
)

_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error,
           "critical": LogLevel.critical}
#: The levels of logging.level, --log-level and EGD_LOG_LEVEL, from the most to the least verbose.
LOG_LEVELS = tuple(_LEVELS)
_ORDER = list(LOG_LEVELS)

#: Twisted's own lines about its machinery, at info, which say nothing to an operator ("Starting factory
#: <object at 0x...>" for every outgoing HTTP connection of a driver): logged at debug. egd says itself where
#: it listens and when it stopped.
_CHATTER_FORMATS = frozenset({"Starting factory {factory!r}", "Stopping factory {factory!r}",
                              "Main loop terminated."})
#: The same from twisted.python.log ("GatewaySite (ConnectionLimit) starting on 8888", "(TCP Port 8888 Closed)").
_LEGACY_CHATTER = re.compile(r"\S.* starting on \d+|\(\w+ Port \d+ Closed\)")


_NEWLINES = re.compile(r"\s*[\r\n]+\s*")
#: syslog priorities by level: journald reads a leading "<N>" as the line's PRIORITY (journalctl -p err works).
_PRIORITY = {"debug": 7, "info": 6, "warn": 4, "error": 3, "critical": 2}
#: The filter of the running observer, so that a config reload can change the level (set_level).
_predicate: Any = None


def stream_is_journal(out: IO[str], environ: Any = None) -> bool:
    """Whether ``out`` is connected to journald (systemd sets ``$JOURNAL_STREAM`` to its device:inode)."""
    expected = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        stat = os.fstat(out.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{stat.st_dev}:{stat.st_ino}"


def _text_observer(out: IO[str], journal: bool = False) -> Any:
    from datetime import datetime, timezone

    def observe(event: dict[str, Any]) -> None:
        # One event, one line: a message that carries newlines (a remote command's stderr, say) has them as " | ",
        # so that grep, journald's entries and their priorities see the whole event.
        text = _NEWLINES.sub(" | ", formatEvent(event).strip())
        when = datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        level = event.get("log_level", LogLevel.info).name
        namespace = event.get("log_namespace", "-")
        # journald stamps each line itself and takes the priority from the prefix
        head = f"<{_PRIORITY.get(level, 6)}>" if journal else f"{when}Z "
        out.write(f"{head}{level:<5} [{namespace}] {text}\n")
        failure = event.get("log_failure")
        if failure is not None:
            # A traceback (a bug in egd) stays readable, indented under its event; on journald every line of it
            # carries the event's priority, so `journalctl -p err` shows it whole.
            prefix = head if journal else ""
            out.writelines(f"{prefix}    {line}\n" for line in failure.getTraceback().rstrip().splitlines())
        out.flush()

    return observe


def _is_chatter(event: dict[str, Any]) -> bool:
    if event.get("log_format") in _CHATTER_FORMATS:
        return True
    if event.get("log_namespace") == "log_legacy":
        return bool(_LEGACY_CHATTER.fullmatch(" ".join(str(part) for part in event.get("message", ()))))
    return False


def _demoting_chatter(observer: Any) -> Any:
    """``observer``, given Twisted's chatter (see ``_CHATTER_FORMATS``) at debug instead of info."""
    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.info and _is_chatter(event):
            event = {**event, "log_level": LogLevel.debug}
        observer(event)

    return observe


def start_logging(level: str = "info", fmt: str = "text", out: IO[str] | None = None) -> None:
    """Send twisted.logger events at ``level`` and above to ``out`` (stderr) as text or JSON lines."""
    global _predicate
    stream = out or sys.stderr
    # JSON: one object per line, without RFC 7464's leading \x1e (journald would store every line as binary).
    observer: Any = (jsonFileLogObserver(stream, recordSeparator="") if fmt == "json"
                     else _text_observer(stream, stream_is_journal(stream)))
    _predicate = LogLevelFilterPredicate()
    set_level(level)
    filtered: Any = FilteringLogObserver(observer, [_predicate])
    globalLogBeginner.beginLoggingTo([_demoting_chatter(filtered)], redirectStandardIO=False)


def set_level(level: str) -> None:
    """Log events at ``level`` and above from now on (at start, and when a config reload changes it)."""
    if _predicate is None:
        return
    _predicate.defaultLogLevel = _LEVELS[level]
    _predicate.setLogLevelForNamespace("", _LEVELS[level])  # the root entry is what unlisted namespaces use
    # autobahn and twisted.web are chatty at info about every connection; egd logs what matters itself.
    quiet = _LEVELS[_ORDER[max(_ORDER.index(level), _ORDER.index("warn"))]]
    for noisy in ("autobahn", "twisted.web", "txzmq"):
        _predicate.setLogLevelForNamespace(noisy, quiet)
