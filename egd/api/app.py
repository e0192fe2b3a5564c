"""The REST API on Klein: what Jupyter Server's ``GatewayClient`` (and Enterprise Gateway's clients) use.

Handlers are thin: they parse and check the request, call the kernel or session manager, and shape the
answer. Every failure becomes a JSON ``{"reason", "message"}`` response in ``egd.api.errors``.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import os
from typing import Any

import yaml
from klein import Klein
from klein.resource import KleinResource
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from egd import API_VERSION, __version__
from egd.api.cors import CorsPolicy, HostPolicy
from egd.api.errors import error_response, json_response, render_failure
from egd.api.redact import printable
from egd.api.site import identity_of, security_log
from egd.api.status_page import build_view, query_token, respond
from egd.api.websocket import KernelChannelsResource, make_factory
from egd.auth import Identity
from egd.config import Config
from egd.errors import BadRequest, Forbidden, KernelSpecNotFound, NotFound, PayloadTooLarge
from egd.kernels.manager import KernelManager
from egd.kernels.sessions import SessionManager
from egd.kernels.specs import KernelSpecInfo
from egd.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from egd.util import shield, wait_for

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
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deeply
        raise BadRequest("The request body is not valid JSON") from None


def _header_tokens(request: Any, name: bytes) -> set[bytes]:
    """The comma-separated tokens of a header, lower case."""
    return {token.strip().lower() for value in request.requestHeaders.getRawHeaders(name, []) for token in
            value.split(b",")}


def websocket_handshake_problem(request: Any) -> str | None:
    """What makes ``request`` not a WebSocket handshake egd accepts (RFC 6455 section 4.2.1), None if nothing
    does: checked before the hand-over, whose own refusals are not JSON."""
    if b"websocket" not in _header_tokens(request, b"upgrade"):
        return "This URL is a WebSocket endpoint; connect with a WebSocket client"
    if request.clientproto != b"HTTP/1.1":
        return "A WebSocket handshake needs HTTP/1.1"
    if b"upgrade" not in _header_tokens(request, b"connection"):
        return "A WebSocket handshake needs the header 'Connection: Upgrade'"
    if request.getHeader(b"sec-websocket-version") != b"13":
        return "Only WebSocket version 13 is supported (Sec-WebSocket-Version: 13)"
    try:
        key = base64.b64decode(request.getHeader(b"sec-websocket-key") or b"", validate=True)
    except ValueError:
        key = b""
    if len(key) != 16:
        return "The WebSocket handshake needs a Sec-WebSocket-Key of 16 bytes in base64"
    return None


def _user_arg(request: Any) -> str:
    """The ``?user=`` of a kernelspec request (EG's listing filter)."""
    return str(request.args.get(b"user", [b""])[0].decode("utf-8", "replace"))


def _read_file(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


#: The OpenAPI document of this API, installed with the package.
OPENAPI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi.yaml")


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings as ``|`` blocks, as the document is written."""


_BlockDumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))


def render_openapi(base_url: str, secured: bool, public_metrics: bool = False,
                   client_envs: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
    """The OpenAPI document as served (YAML, JSON): ``servers`` is the base URL, the version egd's, without
    configured credentials no security requirement, and the variables of ``kernels.client_envs`` checked as egd
    checks them. Blocking file I/O: call it in a thread."""
    document = yaml.safe_load(_read_file(OPENAPI_PATH))
    env = document["components"]["schemas"]["KernelEnv"]
    checked = {"$ref": "#/components/schemas/KernelEnvValue"}
    if "*" in client_envs:  # every valid name is passed, so checked
        env["patternProperties"] = {"^(?!KERNEL_GATEWAY$)[A-Za-z_][A-Za-z0-9_]{0,254}$": checked,
                                    "^KERNEL_GATEWAY$": {}}
    elif client_envs:  # these names are passed too ("properties" apply besides the name patterns)
        env["properties"] = {name: checked for name in client_envs if name != "KERNEL_GATEWAY"}
    document["servers"] = [{"url": base_url.rstrip("/") or "/"}]
    document["info"]["version"] = __version__
    if not secured:
        document["security"] = []
    if public_metrics:
        document["paths"]["/metrics"]["get"]["security"] = []
    return (yaml.dump(document, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True, width=120).encode(),
            json.dumps(document).encode("utf-8"))


class _Resource(KleinResource):
    """Klein's resource, with a JSON 400 (instead of Klein's text one and a logged traceback) for a URL whose
    path or host is not UTF-8."""

    def render(self, request: Any) -> Any:
        """Check the URL's encoding, then route. An empty segment (``//``) is a 404 wherever it is: Klein would
        drop one right after the base URL, werkzeug merge the others."""
        try:
            for part in (*request.prepath, *request.postpath, request.getRequestHostname()):
                part.decode("utf-8")
        except UnicodeDecodeError:
            return error_response(request, 400, "Bad Request", "The URL is not valid UTF-8")
        if b"" in request.postpath[:-1]:
            return error_response(request, 404, "Not Found", "")
        if not request.postpath:
            # The base URL without its final slash (/egd for /egd/): its status page, as a person types it
            # (werkzeug would answer a 308 whose Location Klein drops).
            request.postpath = [b""]
        return super().render(request)


class IAPIReactor(IReactorTime, IReactorFromThreads):
    """The reactor the API runs on: time (WebSocket timeouts) and threads (blocking reads off its thread)."""


class GatewayAPI:
    """The routes of egd's HTTP API."""

    app = Klein()
    # "//" in a path is a 404 like any other unknown path: werkzeug would merge the slashes and answer a 308
    # without a Location (Klein drops it).
    app.url_map.merge_slashes = False

    def __init__(self, config: Config, kernels: KernelManager, reactor: IAPIReactor, threadpool: ThreadPool) -> None:
        self._config = config
        self._base_url = config.server.base_url
        self._kernels = kernels
        self._sessions = SessionManager(kernels)
        self._reactor = reactor
        self._threadpool = threadpool
        self._ws_factory = make_factory(config.server, reactor, kernels.metrics.relay)
        self._cors = CorsPolicy(config.server, HostPolicy(config.server.allowed_hosts, config.auth.configured))
        self._openapi: tuple[bytes, bytes] | None = None
        #: Requests that start a kernel and are not answered yet (the gateway's stop answers them first).
        self._starting: set[Deferred[None]] = set()

    def _track_start(self, request: Any) -> None:
        """Count ``request`` among the unanswered kernel starts until it is finished (or its client left)."""
        finished: Deferred[None] = request.notifyFinish()
        self._starting.add(finished)
        finished.addBoth(lambda _: self._starting.discard(finished))

    async def answered(self, limit: float = 2.0) -> None:
        """Wait until every kernel start in progress has been answered and the answers written out (at most
        ``limit`` seconds): the gateway's stop abandons launches first, and their 503s must reach the clients
        before the connections close."""
        pending = [shield(d) for d in self._starting]
        if pending:
            waited: Deferred[Any] = DeferredList(pending, consumeErrors=True)
            await wait_for(waited, limit, self._reactor)
            await deferLater(self._reactor, 0.05, lambda: None)  # at least one I/O turn to flush the answers

    def reconfigure(self, config: Config) -> None:
        """Use ``config`` from now on for what the routes read per request (``server.list_kernels``)."""
        self._config = config

    def resource(self) -> Any:
        """The Klein resource to mount."""
        return _Resource(self.app)

    @staticmethod
    def _groups(identity: Identity, user: str) -> frozenset[str] | None:
        """The caller's own groups when it asks about itself (None: the configured groups of ``user``)."""
        return identity.groups if identity.user == user else None

    # Klein tries error handlers in this order: the first whose exception types match answers.
    @app.handle_errors(KernelSpecNotFound)
    async def _spec_not_found(self, request: Any, failure: Any) -> bytes:
        """A 404 for an unknown kernelspec (named in a URL, a kernel start, a session) names the kernelspecs
        the caller may use instead, as GET /api/kernelspecs lists them for it."""
        identity = identity_of(request)
        try:
            usable = await self._usable_specs(identity, identity.user or _user_arg(request).split("/", 1)[0])
        except Exception:  # the specs cannot be read now: the 404 without the list
            return render_failure(request, failure)
        message = f"{failure.value.message}; available: {', '.join(usable) or 'none'}"
        return error_response(request, failure.value.status, failure.value.reason, message)

    @app.handle_errors(Exception)
    def _error(self, request: Any, failure: Any) -> bytes:
        return render_failure(request, failure)

    # -- the status page (a person's view; egd.api.status_page) ----------------------------------------------

    @app.route("/", methods=["GET"])
    def status_page(self, request: Any) -> bytes:
        """An HTML page for a person: version, drivers, readiness, the caller's kernels per user and state."""
        identity = identity_of(request)
        view = build_view(self._config, identity, self._kernels.visible(identity), self._kernels.readiness.report(),
                          self._kernels.drivers, query_token(request, identity))
        return respond(request, view)

    # -- /api ---------------------------------------------------------------------------------------------

    @app.route("/api", methods=["GET"], strict_slashes=False)
    def api_version(self, request: Any) -> bytes:
        """The API and gateway versions."""
        return json_response(request, 200, {"version": API_VERSION, "gateway_version": __version__})

    async def _openapi_document(self) -> tuple[bytes, bytes]:
        if self._openapi is None:
            self._openapi = await deferToThreadPool(self._reactor, self._threadpool, render_openapi,
                                                    self._base_url, self._config.auth.configured,
                                                    self._config.server.metrics_public,
                                                    self._config.kernels.client_envs)
        return self._openapi

    @app.route("/api/swagger.yaml", methods=["GET"])
    async def openapi_yaml(self, request: Any) -> bytes:
        """This API's OpenAPI document in YAML."""
        document = (await self._openapi_document())[0]
        request.setHeader(b"Content-Type", b"application/yaml")
        return document

    @app.route("/api/swagger.json", methods=["GET"])
    async def openapi_json(self, request: Any) -> bytes:
        """This API's OpenAPI document in JSON."""
        document = (await self._openapi_document())[1]
        request.setHeader(b"Content-Type", b"application/json")
        return document

    # -- operations: probes and metrics (egd.api.site lets the probes through without credentials) ----------

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: Any) -> bytes:
        """Liveness: 200 whenever the process serves HTTP."""
        request.setHeader(b"Cache-Control", b"no-store")
        return json_response(request, 200, {"status": "ok"})

    @app.route("/readyz", methods=["GET"])
    def readyz(self, request: Any) -> bytes:
        """Readiness: 200 when every check passes (drivers running, kernel manager accepting work), else 503;
        the body names each check's state."""
        ready, checks = self._kernels.readiness.report()
        request.setHeader(b"Cache-Control", b"no-store")
        return json_response(request, 200 if ready else 503,
                             {"status": "ready" if ready else "not ready", "checks": checks})

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: Any) -> bytes:
        """Prometheus metrics. Its kernels gauge names every user with a kernel, so a user-bound caller must be
        an admin (trusted clients, and everyone when ``server.metrics_public``, may read it)."""
        identity = identity_of(request)
        if identity.bound and not identity.admin:
            raise Forbidden("Metrics are for administrators")
        request.setHeader(b"Content-Type", METRICS_CONTENT_TYPE.encode())
        request.setHeader(b"Cache-Control", b"no-store")
        return self._kernels.metrics.render()

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
        specs = await self._usable_specs(identity, user)
        default = self._kernels.default_kernel_name
        return json_response(request, 200, {
            "default": default,
            "kernelspecs": {name: spec.model(self._base_url, identity.admin) for name, spec in specs.items()},
        })

    async def _usable_specs(self, identity: Identity, user: str) -> dict[str, KernelSpecInfo]:
        """The kernelspecs ``user`` may use (every offered one when no user is named), by name."""
        specs = await self._kernels.specs.all()
        return {name: spec for name, spec in specs.items()
                if not user or self._kernels.allows(spec, user, self._groups(identity, user))}

    async def _usable_spec(self, request: Any, name: str) -> KernelSpecInfo:
        """The kernelspec ``name`` if the caller (a user-bound caller, or the ``?user=`` it names) may use it;
        :class:`Forbidden` if not, :class:`NotFound` if there is no such spec."""
        spec = await self._kernels.specs.get(name)
        identity = identity_of(request)
        user = identity.user or _user_arg(request).split("/", 1)[0]
        if user and not self._kernels.allows(spec, user, self._groups(identity, user)):
            raise Forbidden(f"User {user} is not authorized to use kernel spec {name}")
        return spec

    @app.route("/api/kernelspecs/<string:name>", methods=["GET"], strict_slashes=False)
    async def get_kernelspec(self, request: Any, name: str) -> bytes:
        """One kernelspec."""
        spec = await self._usable_spec(request, name)
        return json_response(request, 200, spec.model(self._base_url, identity_of(request).admin))

    @app.route("/kernelspecs/<string:name>/<path:filename>", methods=["GET", "HEAD"])
    async def kernelspec_resource(self, request: Any, name: str, filename: str) -> bytes:
        """One of a kernelspec's resource files (its logos, kernel.js, kernel.css: what its model's
        ``resources`` lists), to whoever may see the spec's model. Nothing else of its directory: kernel.json
        holds the command line and environment, which only admins see."""
        spec = await self._usable_spec(request, name)
        root = os.path.realpath(spec.resource_dir)
        if filename not in spec.resources.values() or filename.lower().endswith(".json"):
            raise NotFound(f"Kernel spec {name} has no resource {filename}")
        path = os.path.realpath(os.path.join(root, filename))
        # A resource that is a link to the spec's kernel.json or out of the directory is not served either.
        if (not path.startswith(root + os.sep) or os.path.basename(path).lower().endswith(".json")
                or not os.path.isfile(path)):
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
        identity = identity_of(request)
        models = [k.model() for k in self._kernels.visible(identity)]
        return json_response(request, 200, [*models, *self._kernels.others(identity)])

    @app.route("/api/kernels", methods=["POST"], strict_slashes=False)
    async def start_kernel(self, request: Any) -> bytes:
        """Start a kernel: body ``{"name", "env"}``; an empty body starts the default kernel."""
        body = read_json(request)
        if body is None:
            body = {}
        if not isinstance(body, dict):  # also [], 0, false and "": not an empty body
            raise BadRequest("The request body must be a JSON object")
        name = body.get("name")
        if name is not None and not isinstance(name, str):
            raise BadRequest("name must be a string")
        if isinstance(name, str) and not name:
            name = None
        self._track_start(request)
        kernel = await self._kernels.start_kernel(name, body.get("env"), identity_of(request))
        request.setHeader(b"Location", f"{self._base_url}api/kernels/{kernel.id}".encode())
        return json_response(request, 201, kernel.model())

    @app.route("/api/kernels/<string:kernel_id>", methods=["GET"], strict_slashes=False)
    async def get_kernel(self, request: Any, kernel_id: str) -> bytes:
        """One kernel's model (also of a kernel another gateway sharing the state store runs)."""
        identity = identity_of(request)
        if kernel_id in self._kernels.kernels:
            return json_response(request, 200, self._kernels.owned(kernel_id, identity, "read").model())
        return json_response(request, 200, await self._kernels.other(kernel_id, identity))

    @app.route("/api/kernels/<string:kernel_id>", methods=["DELETE"], strict_slashes=False)
    async def delete_kernel(self, request: Any, kernel_id: str) -> bytes:
        """Shut a kernel down."""
        await self._kernels.shutdown_kernel(kernel_id, identity_of(request))
        request.setResponseCode(204)
        return b""

    @app.route("/api/kernels/<string:kernel_id>/interrupt", methods=["POST"], strict_slashes=False)
    async def interrupt_kernel(self, request: Any, kernel_id: str) -> bytes:
        """Interrupt what the kernel is running."""
        await (await self._kernels.acquire(kernel_id, identity_of(request), "interrupt")).interrupt()
        request.setResponseCode(204)
        return b""

    @app.route("/api/kernels/<string:kernel_id>/restart", methods=["POST"], strict_slashes=False)
    async def restart_kernel(self, request: Any, kernel_id: str) -> bytes:
        """Restart the kernel under the same id."""
        kernel = await self._kernels.acquire(kernel_id, identity_of(request), "restart")
        await kernel.restart()
        return json_response(request, 200, kernel.model())

    @app.route("/api/kernels/<string:kernel_id>/channels", methods=["GET"])
    async def kernel_channels(self, request: Any, kernel_id: str) -> Any:
        """The kernel's WebSocket: the handshake and the browser's origin (and Host) are checked here, so that
        every refusal is a JSON answer before the connection is handed over."""
        problem = websocket_handshake_problem(request)
        if problem is not None:
            self._kernels.owned(kernel_id, identity_of(request), "connection")  # 404 first, as for the REST API
            raise BadRequest(problem)
        kernel = await self._kernels.acquire(kernel_id, identity_of(request), "connection")
        origin = (request.getHeader(b"origin") or b"").decode("latin-1")
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        if not self._cors.allowed(origin, host):
            security_log.warn("refused a WebSocket to kernel {kernel_id} from origin {origin} (Host {host})",
                              kernel_id=kernel_id, origin=printable(origin), host=printable(host))
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
        self._track_start(request)
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

