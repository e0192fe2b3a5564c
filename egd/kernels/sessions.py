"""``/api/sessions`` with Jupyter Server 2.x semantics, kept in memory.

A session ties a path (a notebook) to a kernel. Creating one for a path that has a session returns it;
naming an existing kernel id attaches to it; naming a kernelspec starts a kernel. Changing the kernel of a
session shuts the old one down. Sessions whose kernel is gone disappear.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from egd.auth import Identity
from egd.errors import BadRequest, KernelNotFound, SessionNotFound
from egd.kernels.manager import KernelManager


@dataclass
class _Session:
    id: str
    path: str
    name: str
    type: str
    kernel_id: str


def _text(model: dict[str, Any], key: str, required: bool) -> str | None:
    value = model.get(key)
    if value is None:
        if required:
            raise BadRequest(f"Missing field in JSON data: {key}")
        return None
    if not isinstance(value, str):
        raise BadRequest(f"Field {key} must be a string")
    return value


def _kernel_request(model: dict[str, Any]) -> tuple[str | None, str | None, Any]:
    kernel = model.get("kernel") or {}
    if not isinstance(kernel, dict):
        raise BadRequest("Field kernel must be an object")
    kid, name = kernel.get("id"), kernel.get("name")
    if kid is not None and not isinstance(kid, str):
        raise BadRequest("kernel.id must be a string")
    if name is not None and not isinstance(name, str):
        raise BadRequest("kernel.name must be a string")
    return kid, name, kernel.get("env")


class SessionManager:
    """The sessions of this gateway."""

    def __init__(self, kernels: KernelManager) -> None:
        self._kernels = kernels
        self._sessions: dict[str, _Session] = {}

    def _live(self) -> list[_Session]:
        for session in list(self._sessions.values()):
            if session.kernel_id not in self._kernels.kernels:
                del self._sessions[session.id]
        return list(self._sessions.values())

    def model(self, session: _Session) -> dict[str, Any]:
        """The REST model of a session."""
        model: dict[str, Any] = {
            "id": session.id, "path": session.path, "name": session.name, "type": session.type,
            "kernel": self._kernels.get(session.kernel_id).model(),
        }
        if session.type == "notebook":
            model["notebook"] = {"path": session.path, "name": session.name}
        return model

    def _mine(self, session: _Session, identity: Identity) -> bool:
        kernel = self._kernels.kernels.get(session.kernel_id)
        return kernel is not None and identity.owns(kernel.env.username)

    def list(self, identity: Identity) -> list[dict[str, Any]]:
        """Every session whose kernel still exists and is the caller's."""
        return [self.model(s) for s in self._live() if self._mine(s, identity)]

    def get(self, session_id: str, identity: Identity) -> _Session:
        """One of the caller's sessions; :class:`SessionNotFound` if there is none (or its kernel is gone)."""
        self._live()
        session = self._sessions.get(session_id)
        if session is None or not self._mine(session, identity):
            raise SessionNotFound(session_id)
        return session

    async def _kernel_for(self, kernel_id: str | None, kernel_name: str | None, env: Any,
                          identity: Identity) -> str:
        if kernel_id is not None:
            kernel = self._kernels.kernels.get(kernel_id)
            if kernel is None or not identity.owns(kernel.env.username):
                raise KernelNotFound(kernel_id)
            return kernel_id
        kernel = await self._kernels.start_kernel(kernel_name, env, identity)
        return kernel.id

    async def create(self, model: Any, identity: Identity) -> dict[str, Any]:
        """Create a session, or return the one that exists for that path (Jupyter Server's rule)."""
        if not isinstance(model, dict):
            raise BadRequest("The request body must be a JSON object")
        path = _text(model, "path", True)
        mtype = _text(model, "type", True)
        name = _text(model, "name", False) or ""
        kernel_id, kernel_name, env = _kernel_request(model)
        assert path is not None and mtype is not None
        for session in self._live():
            if session.path == path and self._mine(session, identity):
                return self.model(session)
        kid = await self._kernel_for(kernel_id, kernel_name, env, identity)
        session = _Session(str(uuid.uuid4()), path, name, mtype, kid)
        self._sessions[session.id] = session
        return self.model(session)

    async def update(self, session_id: str, model: Any, identity: Identity) -> dict[str, Any]:
        """Change a session's path, name, type or kernel; a replaced kernel is shut down."""
        if not isinstance(model, dict):
            raise BadRequest("The request body must be a JSON object")
        session = self.get(session_id, identity)
        changes = {key: _text(model, key, False) for key in ("path", "name", "type") if key in model}
        old_kernel = session.kernel_id
        new_kernel = await self._replacement_kernel(model, identity) if "kernel" in model else None
        for key, value in changes.items():
            if value is not None:
                setattr(session, key, value)
        session.kernel_id = new_kernel or old_kernel
        if session.kernel_id != old_kernel and old_kernel in self._kernels.kernels:
            await self._kernels.shutdown_kernel(old_kernel)
        return self.model(session)

    async def _replacement_kernel(self, model: dict[str, Any], identity: Identity) -> str | None:
        """The kernel an update's ``kernel`` asks for: an existing one of ``identity``'s, or a new one (None when
        it names neither)."""
        kernel_id, kernel_name, env = _kernel_request(model)
        if kernel_id is None and kernel_name is None:
            return None
        existing = self._kernels.kernels.get(kernel_id) if kernel_id is not None else None
        if kernel_id is not None and (existing is None or not identity.owns(existing.env.username)):
            raise BadRequest(f"No such kernel: {kernel_id}")
        return await self._kernel_for(kernel_id, kernel_name, env, identity)

    async def delete(self, session_id: str, identity: Identity) -> None:
        """Delete a session and shut its kernel down."""
        session = self.get(session_id, identity)
        del self._sessions[session_id]
        if session.kernel_id in self._kernels.kernels:
            await self._kernels.shutdown_kernel(session.kernel_id)
