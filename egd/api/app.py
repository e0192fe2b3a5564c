"""The REST API on Klein: what Jupyter Server's ``GatewayClient`` (and Enterprise Gateway's clients) use.

Handlers are thin: they parse and check the request, call the kernel or session manager, and shape the
answer. Every failure becomes a JSON ``{"reason", "message"}`` response in ``egd.api.errors``.
"""

from __future__ import annotations

import json
import mimetypes
import os
from typing import Any

from klein import Klein
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from egd import API_VERSION, __version__
from egd.api.cors import CorsPolicy
from egd.api.errors import json_response, render_failure
from egd.api.site import identity_of, security_log
from egd.api.websocket import KernelChannelsResource, make_factory
from egd.auth import Identity
from egd.config import Config
from egd.errors import BadRequest, Forbidden, NotFound, PayloadTooLarge
from egd.kernels.manager import KernelManager
from egd.kernels.sessions import SessionManager

MAX_BODY = 1024 * 1024


def read_json(request: Any) -> Any:
    """The request's JSON body (``None`` when empty); :class:`BadRequest` if it is not JSON."""
    content = request.content
    content.seek(0, os.SEEK_END)
    if content.tell() > MAX_BODY:
        raise PayloadTooLarge(f"The request body is larger than {MAX_BODY} bytes")
    content.seek(0)
    raw = content.read()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("The request body is not valid JSON") from None


def _user_arg(request: Any) -> str:
    """The ``?user=`` of a kernelspec request (EG's listing filter)."""
    return str(request.args.get(b"user", [b""])[0].decode("utf-8", "replace"))


def _read_file(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


class GatewayAPI:
    """The routes of egd's HTTP API."""

    app = Klein()

    def __init__(self, config: Config, kernels: KernelManager, reactor: Any, threadpool: ThreadPool) -> None:
        self._config = config
        self._base_url = config.server.base_url
        self._kernels = kernels
        self._sessions = SessionManager(kernels)
        self._reactor = reactor
        self._threadpool = threadpool
        self._ws_factory = make_factory(config.server, reactor)
        self._cors = CorsPolicy(config.server)

    def resource(self) -> Any:
        """The Klein resource to mount."""
        return self.app.resource()

    @staticmethod
    def _groups(identity: Identity, user: str) -> frozenset[str] | None:
        """The caller's own groups when it asks about itself (None: the configured groups of ``user``)."""
        return identity.groups if identity.user == user else None

    @app.handle_errors(Exception)
    def _error(self, request: Any, failure: Any) -> bytes:
        return render_failure(request, failure)

    # -- /api ---------------------------------------------------------------------------------------------

    @app.route("/api", methods=["GET"], strict_slashes=False)
    def api_version(self, request: Any) -> bytes:
        """The API and gateway versions."""
        return json_response(request, 200, {"version": API_VERSION, "gateway_version": __version__})

    # -- kernelspecs --------------------------------------------------------------------------------------

    @app.route("/api/kernelspecs", methods=["GET"], strict_slashes=False)
    async def list_kernelspecs(self, request: Any) -> bytes:
        """Every kernelspec the caller may use, and the default's name."""
        user = _user_arg(request)
        if "/" in user:
            # Jupyter Server's gateway client appends the spec name after "?user=...": answer that spec.
            return await self.get_kernelspec(request, user.rsplit("/", 1)[1])
        identity = identity_of(request)
        user = identity.user or user  # a user-bound caller sees what it may use, whatever ?user= says
        specs = await self._kernels.specs.all()
        default = self._kernels.default_kernel_name
        return json_response(request, 200, {
            "default": default,
            "kernelspecs": {name: spec.model(self._base_url, identity.admin) for name, spec in specs.items()
                            if not user or self._kernels.allows(spec, user, self._groups(identity, user))},
        })

    @app.route("/api/kernelspecs/<string:name>", methods=["GET"], strict_slashes=False)
    async def get_kernelspec(self, request: Any, name: str) -> bytes:
        """One kernelspec."""
        spec = await self._kernels.specs.get(name)
        identity = identity_of(request)
        user = identity.user or _user_arg(request).split("/", 1)[0]
        if user and not self._kernels.allows(spec, user, self._groups(identity, user)):
            raise Forbidden(f"User {user} is not authorized to use kernel spec {name}")
        return json_response(request, 200, spec.model(self._base_url, identity.admin))

    @app.route("/kernelspecs/<string:name>/<path:filename>", methods=["GET", "HEAD"])
    async def kernelspec_resource(self, request: Any, name: str, filename: str) -> bytes:
        """A file of a kernelspec's resource directory (logos, kernel.js); nothing outside it."""
        spec = await self._kernels.specs.get(name)
        root = os.path.realpath(spec.resource_dir)
        path = os.path.realpath(os.path.join(root, filename))
        if not path.startswith(root + os.sep) or not os.path.isfile(path):
            raise NotFound(f"Kernel spec {name} has no resource {filename}")
        try:
            data = await deferToThreadPool(self._reactor, self._threadpool, _read_file, path)
        except OSError:
            raise NotFound(f"Kernel spec {name} has no resource {filename}") from None
        request.setHeader(b"Content-Type", (mimetypes.guess_type(path)[0] or "application/octet-stream").encode())
        request.setHeader(b"Content-Length", str(len(data)).encode())
        return b"" if request.method == b"HEAD" else data

    # -- kernels ------------------------------------------------------------------------------------------

    @app.route("/api/kernels", methods=["GET"], strict_slashes=False)
    def list_kernels(self, request: Any) -> bytes:
        """Every kernel (Jupyter Server's gateway client polls this)."""
        if not self._config.server.list_kernels:
            raise Forbidden("Listing kernels is disabled on this gateway")
        return json_response(request, 200, [k.model() for k in self._kernels.visible(identity_of(request))])

    @app.route("/api/kernels", methods=["POST"], strict_slashes=False)
    async def start_kernel(self, request: Any) -> bytes:
        """Start a kernel: body ``{"name", "env"}``; an empty body starts the default kernel."""
        body = read_json(request) or {}
        if not isinstance(body, dict):
            raise BadRequest("The request body must be a JSON object")
        name = body.get("name")
        if name is not None and not isinstance(name, str):
            raise BadRequest("name must be a string")
        if isinstance(name, str) and not name:
            name = None
        kernel = await self._kernels.start_kernel(name, body.get("env"), identity_of(request))
        request.setHeader(b"Location", f"{self._base_url}api/kernels/{kernel.id}".encode())
        return json_response(request, 201, kernel.model())

    @app.route("/api/kernels/<string:kernel_id>", methods=["GET"], strict_slashes=False)
    def get_kernel(self, request: Any, kernel_id: str) -> bytes:
        """One kernel's model."""
        return json_response(request, 200, self._kernels.owned(kernel_id, identity_of(request), "read").model())

    @app.route("/api/kernels/<string:kernel_id>", methods=["DELETE"], strict_slashes=False)
    async def delete_kernel(self, request: Any, kernel_id: str) -> bytes:
        """Shut a kernel down."""
        await self._kernels.shutdown_kernel(kernel_id, identity_of(request))
        request.setResponseCode(204)
        return b""

    @app.route("/api/kernels/<string:kernel_id>/interrupt", methods=["POST"], strict_slashes=False)
    async def interrupt_kernel(self, request: Any, kernel_id: str) -> bytes:
        """Interrupt what the kernel is running."""
        await self._kernels.owned(kernel_id, identity_of(request), "interrupt").interrupt()
        request.setResponseCode(204)
        return b""

    @app.route("/api/kernels/<string:kernel_id>/restart", methods=["POST"], strict_slashes=False)
    async def restart_kernel(self, request: Any, kernel_id: str) -> bytes:
        """Restart the kernel under the same id."""
        kernel = self._kernels.owned(kernel_id, identity_of(request), "restart")
        await kernel.restart()
        return json_response(request, 200, kernel.model())

    @app.route("/api/kernels/<string:kernel_id>/channels", methods=["GET"])
    def kernel_channels(self, request: Any, kernel_id: str) -> Any:
        """The kernel's WebSocket."""
        kernel = self._kernels.owned(kernel_id, identity_of(request), "connection")
        if (request.getHeader(b"upgrade") or b"").lower() != b"websocket":
            raise BadRequest("This URL is a WebSocket endpoint; connect with a WebSocket client")
        origin = (request.getHeader(b"origin") or b"").decode("latin-1")
        if not self._cors.allowed(origin, (request.getHeader(b"host") or b"").decode("latin-1")):
            security_log.warn("refused a WebSocket to kernel {kernel_id} from origin {origin}", kernel_id=kernel_id,
                              origin=origin[:200])
            raise Forbidden("Cross-origin WebSocket connections are not allowed from this origin")
        return KernelChannelsResource(self._ws_factory, kernel)

    # -- sessions -----------------------------------------------------------------------------------------

    @app.route("/api/sessions", methods=["GET"], strict_slashes=False)
    def list_sessions(self, request: Any) -> bytes:
        """Every session."""
        return json_response(request, 200, self._sessions.list(identity_of(request)))

    @app.route("/api/sessions", methods=["POST"], strict_slashes=False)
    async def create_session(self, request: Any) -> bytes:
        """Create a session (or return the existing one for the path)."""
        model = await self._sessions.create(read_json(request), identity_of(request))
        request.setHeader(b"Location", f"{self._base_url}api/sessions/{model['id']}".encode())
        return json_response(request, 201, model)

    @app.route("/api/sessions/<string:session_id>", methods=["GET"], strict_slashes=False)
    def get_session(self, request: Any, session_id: str) -> bytes:
        """One session."""
        session = self._sessions.get(session_id, identity_of(request))
        return json_response(request, 200, self._sessions.model(session))

    @app.route("/api/sessions/<string:session_id>", methods=["PATCH"], strict_slashes=False)
    async def update_session(self, request: Any, session_id: str) -> bytes:
        """Change a session."""
        return json_response(request, 200, await self._sessions.update(session_id, read_json(request),
                                                                       identity_of(request)))

    @app.route("/api/sessions/<string:session_id>", methods=["DELETE"], strict_slashes=False)
    async def delete_session(self, request: Any, session_id: str) -> bytes:
        """Delete a session and its kernel."""
        await self._sessions.delete(session_id, identity_of(request))
        request.setResponseCode(204)
        return b""

