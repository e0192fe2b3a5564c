"""Domain errors. Each carries the HTTP status and reason it maps to (``egd.api.errors`` renders them).

Messages are written for the person at the client: they say what was wrong and never echo a rejected value
or carry a traceback.
"""

from __future__ import annotations


class EgdError(Exception):
    """Base of every error egd reports to a client."""

    status = 500
    reason = "Internal Server Error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(EgdError):
    """The request is malformed or asks for something invalid."""

    status, reason = 400, "Bad Request"


class Forbidden(EgdError):
    """The request is understood but not allowed here."""

    status, reason = 403, "Forbidden"


class NotFound(EgdError):
    """Base for a named thing that does not exist."""

    status, reason = 404, "Not Found"


class KernelNotFound(NotFound):
    """No kernel with this id (or not one the caller may see)."""

    def __init__(self, kernel_id: str) -> None:
        super().__init__(f"Kernel does not exist: {kernel_id}")


class KernelSpecNotFound(NotFound):
    """No kernelspec with this name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"Kernel spec {name} not found")


class SessionNotFound(NotFound):
    """No session with this id."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"Session not found: {session_id}")


class Conflict(EgdError):
    """The request collides with existing state (for example a kernel id already in use)."""

    status, reason = 409, "Conflict"


class PayloadTooLarge(EgdError):
    """The request body is larger than egd accepts."""

    status, reason = 413, "Payload Too Large"


class LaunchFailed(EgdError):
    """The kernel could not be started; the message says why (for example the tail of its stderr)."""

    status, reason = 500, "Kernel Launch Failed"


class LaunchTimeout(EgdError):
    """The kernel did not become ready within its launch timeout."""

    status, reason = 503, "Kernel Launch Timeout"


class ServiceUnavailable(EgdError):
    """egd cannot serve this now (stopping, or the kernelspec's driver is not configured)."""

    status, reason = 503, "Service Unavailable"


class KernelGone(EgdError):
    """The kernel stopped or died while the request was being served."""

    status, reason = 410, "Gone"
