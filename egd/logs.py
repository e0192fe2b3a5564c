"""Log output: text for people and journald, or one JSON object per line for log shippers."""

from __future__ import annotations

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

_ORDER = ["debug", "info", "warn", "error", "critical"]
_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error,
           "critical": LogLevel.critical}


def _text_observer(out: IO[str]) -> Any:
    from datetime import datetime, timezone

    def observe(event: dict[str, Any]) -> None:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}\n{failure.getTraceback()}"
        when = datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        level = event.get("log_level", LogLevel.info).name
        namespace = event.get("log_namespace", "-")
        out.write(f"{when}Z {level:<5} [{namespace}] {text}\n")
        out.flush()

    return observe


def start_logging(level: str = "info", fmt: str = "text", out: IO[str] | None = None) -> None:
    """Send twisted.logger events at ``level`` and above to ``out`` (stderr) as text or JSON lines."""
    stream = out or sys.stderr
    observer: Any = jsonFileLogObserver(stream) if fmt == "json" else _text_observer(stream)
    predicate: Any = LogLevelFilterPredicate(defaultLogLevel=_LEVELS[level])
    # autobahn and twisted.web are chatty at info about every connection; egd logs what matters itself.
    quiet = _LEVELS[_ORDER[max(_ORDER.index(level), _ORDER.index("warn"))]]
    for noisy in ("autobahn", "twisted.web", "txzmq"):
        predicate.setLogLevelForNamespace(noisy, quiet)
    filtered: Any = FilteringLogObserver(observer, [predicate])
    globalLogBeginner.beginLoggingTo([filtered], redirectStandardIO=False)
