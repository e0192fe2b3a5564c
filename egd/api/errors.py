"""Errors to HTTP: one place maps every failure to a status and a JSON ``{"reason", "message"}`` body.

No traceback ever reaches a client: an unexpected failure is logged here and answered with a plain 500.
"""

from __future__ import annotations

import errno
import json
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from egd.api.redact import loggable
from egd.errors import EgdError

log = Logger()


def json_response(request: Any, status: int, body: Any) -> bytes:
    """Set the status and JSON content type; return the encoded body."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(body).encode("utf-8")


def error_response(request: Any, status: int, reason: str, message: str) -> bytes:
    """A JSON error body in Jupyter's shape."""
    return json_response(request, status, {"reason": reason, "message": message})


def render_failure(request: Any, failure: Failure) -> bytes:
    """The response for any failure raised by a route."""
    error = failure.value
    if isinstance(error, EgdError):
        if error.status >= 500:
            log.warn("{method} {path}: {status} {message}", method=loggable(request.method),
                     path=loggable(request.path), status=error.status, message=error.message)
        return error_response(request, error.status, error.reason, error.message)
    if isinstance(error, HTTPException) and error.code is not None:
        message = "" if error.code == 404 else str(error.description or "")
        if isinstance(error, MethodNotAllowed):
            message = f"{loggable(request.method)} is not allowed here"
            # RFC 9110: a 405 names the methods the resource has (OPTIONS: every path answers CORS preflights).
            allowed = sorted({*(error.valid_methods or ()), "OPTIONS"})
            request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
        return error_response(request, error.code, error.name, message)
    if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE):
        # The gateway, not the request, is short of something: say what, without a traceback.
        log.error("{method} {path}: out of file descriptors ({why}); raise egd's open-file limit (LimitNOFILE=) "
                  "or lower kernels.max_kernels", method=loggable(request.method), path=loggable(request.path),
                  why=error.strerror)
        return error_response(request, 503, "Service Unavailable",
                              "The gateway has run out of file descriptors (its open-file limit); try again later")
    log.failure("unexpected error serving {method} {path}", failure, method=loggable(request.method),
                path=loggable(request.path))
    return error_response(request, 500, "Internal Server Error",
                          "An unexpected error occurred; the gateway's log has the details")
