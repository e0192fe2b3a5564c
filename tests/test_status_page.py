"""The status page a person opens at ``GET /`` (below the base URL): a small HTML document behind the same
authentication as the API, showing the version, the drivers and readiness checks, the kernels the viewer may
see per user and state, and links (the metrics only to a viewer who may read them); every value escaped, a
strict Content-Security-Policy, HEAD, and a JSON 405 for any other method."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

import pytest
import yaml

from egd import API_VERSION, __version__
from egd.api.status_page import CONTENT_SECURITY_POLICY, StatusView, driver_state, render
from egd.auth import token_digest
from tests.client import GatewayClient, Response
from tests.conftest import GatewayProcess, wait_until

TOKENS = {"alice": "alice-status-token-0123456789", "bob": "bob-status-token-0123456789",
          "carol": "carol-status-token-0123456789"}
SHARED = "shared-status-token-0123456789"
HOSTILE = "<script>alert('x')</script>&\"'"
BASE_URL = "/gw/egd/"


class Page(HTMLParser):
    """What a test reads of the page: the text of each element with an id, table rows by table id, the links."""

    def __init__(self, body: bytes) -> None:
        super().__init__(convert_charrefs=True)
        self.texts: dict[str, str] = {}
        self.rows: dict[str, list[list[str]]] = {}
        self.links: dict[str, str] = {}
        self._open: list[tuple[str, str | None]] = []  # (tag, id) of the open elements
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._href: str | None = None
        self._label = ""
        self.feed(body.decode("utf-8"))
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Track ids, tables, cells and links."""
        ident = dict(attrs).get("id")
        if tag in ("meta", "link"):  # void elements
            return
        self._open.append((tag, ident))
        if ident:
            self.texts[ident] = ""
        if tag == "table" and ident:
            self._table = ident
            self.rows[ident] = []
        elif tag == "tr" and self._table:
            self.rows[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []
        elif tag == "a":
            self._href, self._label = dict(attrs).get("href"), ""

    def handle_endtag(self, tag: str) -> None:
        """Close what was tracked."""
        if tag in ("td", "th") and self._table and self._cell is not None:
            self.rows[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "a" and self._href is not None:
            self.links[self._label] = self._href
            self._href = None
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        """Text goes to every open element with an id, the current cell and link."""
        for _, ident in self._open:
            if ident:
                self.texts[ident] += data
        if self._cell is not None:
            self._cell.append(data)
        if self._href is not None:
            self._label += data

    def kernels(self) -> dict[str, dict[str, int]]:
        """The kernels table: per user, the count per state (with ``total``)."""
        rows = self.rows.get("kernels", [])
        if not rows:
            return {}
        states = rows[0][1:]
        return {row[0]: {s: int(n) for s, n in zip(states, row[1:], strict=True)} for row in rows[1:-1]}


def get_page(client: GatewayClient, path: str = "/", **kwargs: Any) -> tuple[Response, Page]:
    """GET the status page (asserting a 200 HTML answer with the page's headers) and parse it."""
    resp = client.request("GET", path, **kwargs)
    assert resp.status == 200, (resp.status, resp.body)
    assert resp.headers["content-type"] == "text/html; charset=utf-8"
    assert resp.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["cache-control"] == "no-store"
    assert resp.headers["referrer-policy"] == "no-referrer"
    return resp, Page(resp.body)


def as_user(gw: GatewayProcess, name: str) -> GatewayClient:
    """A client of ``gw`` with ``name``'s own token in the header."""
    return GatewayClient(gw.url, TOKENS[name])


@pytest.fixture(scope="module")
def plain() -> Iterator[GatewayProcess]:
    """A gateway without credentials (loopback, everyone is the local operator) under a base URL."""
    gw = GatewayProcess({"server": {"base_url": BASE_URL}})
    yield gw
    assert gw.stop() == 0


@pytest.fixture(scope="module")
def multi() -> Iterator[GatewayProcess]:
    """A gateway with a shared token and per-user tokens (carol is an admin); local kernels as egd's user, so
    the users are declared to trust each other (the API's separation is what is tested here)."""
    users = {"alice": {"token_sha256": token_digest(TOKENS["alice"])},
             "bob": {"token_sha256": token_digest(TOKENS["bob"])},
             "carol": {"token_sha256": token_digest(TOKENS["carol"]), "admin": True}}
    gw = GatewayProcess({"auth": {"token": SHARED, "users": users, "users_trust_each_other": True}})
    yield gw
    assert gw.stop() == 0


def test_page_shows_version_drivers_readiness_and_links(plain: GatewayProcess) -> None:
    """Without credentials configured the local operator sees the version, the local driver healthy, the
    readiness checks of /readyz, and links to the API document, the kernels and the metrics, below the base
    URL; with and without the base URL's final slash."""
    for path in ("/", ""):  # the client's URL ends in the base URL without its slash
        _, page = get_page(plain.client, path)
        assert page.texts["version"] == f"version {__version__}"
        assert API_VERSION in page.texts["gateway"]
        assert page.texts["viewer"] == "local operator (no credentials configured)"
        assert page.rows["drivers"][1:] == [["local", "ok"]]
        readyz = plain.client.request("GET", "/readyz").json
        assert page.rows["checks"][1:] == [[name, value] for name, value in readyz["checks"].items()]
        assert page.texts["ready"] == "ready"
        assert page.links == {
            "OpenAPI document (YAML)": f"{BASE_URL}api/swagger.yaml",
            "OpenAPI document (JSON)": f"{BASE_URL}api/swagger.json",
            "Kernels (JSON)": f"{BASE_URL}api/kernels",
            "Metrics (Prometheus)": f"{BASE_URL}metrics",
            "Readiness (JSON)": f"{BASE_URL}readyz",
        }
        for href in page.links.values():  # each link answers
            assert GatewayClient(f"http://127.0.0.1:{plain.port}").request("GET", href).status == 200, href
        assert "kernels" not in page.rows and "No kernels" in page.texts["kernel-counts"]


def test_outside_the_base_url_is_the_json_404(plain: GatewayProcess) -> None:
    """``/`` outside the base URL stays the JSON 404 of every unknown path: no redirect tells a scanner the
    prefix, and the root may belong to another application behind the same proxy."""
    root = GatewayClient(f"http://127.0.0.1:{plain.port}")
    for path in ("/", "/gw", "/gw/", "/gwx", "/gw/egdx", "/gw/egd/x/"):
        resp = root.request("GET", path)
        assert resp.status == 404 and resp.headers["content-type"] == "application/json", (path, resp.body)
        assert "location" not in resp.headers


def test_head_and_other_methods(plain: GatewayProcess) -> None:
    """HEAD answers the page's headers without a body; another method is a JSON 405 naming the allowed ones."""
    resp = plain.client.request("HEAD", "/")
    assert resp.status == 200 and resp.body == b""
    assert resp.headers["content-type"] == "text/html; charset=utf-8"
    assert resp.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        resp = plain.client.request(method, "/")
        assert resp.status == 405 and resp.headers["content-type"] == "application/json", (method, resp.body)
        assert resp.json == {"reason": "Method Not Allowed", "message": f"{method} is not allowed here"}
        assert set(resp.headers["allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}


def test_kernels_per_user_and_state_and_hostile_names_escaped(plain: GatewayProcess) -> None:
    """The kernels are counted per user and state; a user name with markup shows as text, never as markup
    (and nothing in the page runs: the CSP has no script source)."""
    client = plain.client
    hostile = client.start_kernel("python3", {"KERNEL_USERNAME": HOSTILE})
    unnamed = client.start_kernel("python3")
    try:
        resp, page = get_page(client)
        assert page.kernels() == {HOSTILE: {"idle": 1, "total": 1}, "(gateway)": {"idle": 1, "total": 1}}
        assert page.rows["kernels"][-1] == ["total", "2", "2"]
        assert b"<script" not in resp.body
        assert b"&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;&quot;&#x27;" in resp.body
        assert "script-src" not in CONTENT_SECURITY_POLICY and "unsafe-inline" not in CONTENT_SECURITY_POLICY
        # A busy kernel is counted as busy.
        sock = client.connect(unnamed)
        try:
            sock.request("execute_request", {"code": "import time; time.sleep(30)", "silent": False,
                                             "store_history": False, "user_expressions": {}, "allow_stdin": False})
            wait_until(lambda: get_page(client)[1].kernels()["(gateway)"].get("busy") == 1, 15, 0.1,
                       "the kernel to show as busy")
            client.request("POST", f"/api/kernels/{unnamed}/interrupt")
        finally:
            sock.close()
    finally:
        client.delete_kernel(hostile)
        client.delete_kernel(unnamed)


def test_list_kernels_off_hides_the_kernels(plain: GatewayProcess) -> None:
    """With ``server.list_kernels: false`` (applied by a reload) the page counts no kernels, as GET /api/kernels
    answers none; the link to that listing goes too."""
    config = yaml.safe_load(plain.config_path.read_text())
    config["server"]["list_kernels"] = False
    plain.config_path.write_text(yaml.safe_dump(config))
    plain.proc.send_signal(signal.SIGHUP)
    try:
        wait_until(lambda: plain.client.request("GET", "/api/kernels").status == 403, 15, 0.1, "the reload")
        _, page = get_page(plain.client)
        assert "kernels-hidden" in page.texts and "kernels" not in page.rows
        assert "Kernels (JSON)" not in page.links
    finally:
        config["server"]["list_kernels"] = True
        plain.config_path.write_text(yaml.safe_dump(config))
        plain.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: plain.client.request("GET", "/api/kernels").status == 200, 15, 0.1, "the reload back")


def test_behind_the_same_authentication(multi: GatewayProcess) -> None:
    """Without a valid credential the page is the API's JSON 401, whatever the method."""
    anonymous = GatewayClient(multi.url)
    for method, path in (("GET", "/"), ("HEAD", "/"), ("GET", "/?token=wrong"), ("POST", "/")):
        resp = anonymous.request(method, path)
        assert resp.status == 401, (method, path, resp.status)
        if method != "HEAD":
            assert resp.json["reason"] == "Unauthorized"


def test_each_user_sees_only_their_own_kernels(multi: GatewayProcess) -> None:
    """Alice sees her kernels only, and no metrics link (GET /metrics is for admins); carol (admin) and the
    shared token see every user's kernels and the metrics. Opened with ``?token=`` (a browser's way), the page's
    links carry the token; opened with the header, they do not."""
    alice, bob, carol = as_user(multi, "alice"), as_user(multi, "bob"), as_user(multi, "carol")
    kernels = [(alice, alice.start_kernel()), (bob, bob.start_kernel()), (bob, bob.start_kernel())]
    try:
        browser = GatewayClient(multi.url)  # no header: the token in the query, as a person opens it
        resp, page = get_page(browser, f"/?token={TOKENS['alice']}")
        assert page.kernels() == {"alice": {"idle": 1, "total": 1}}
        assert b"bob" not in resp.body
        assert page.texts["viewer"] == "alice (user-token)"
        assert "Metrics (Prometheus)" not in page.links
        assert multi.client.request("GET", "/metrics", headers={
            "Authorization": f"token {TOKENS['alice']}"}).status == 403
        assert page.links["OpenAPI document (YAML)"] == f"/api/swagger.yaml?token={TOKENS['alice']}"
        assert page.links["Readiness (JSON)"] == "/readyz"  # needs none
        assert browser.request("GET", page.links["Kernels (JSON)"]).status == 200

        _, page = get_page(bob)
        assert page.kernels() == {"bob": {"idle": 2, "total": 2}}
        assert page.links["OpenAPI document (YAML)"] == "/api/swagger.yaml"  # the header is not copied anywhere

        for viewer, who in ((carol, "carol (user-token, admin)"), (multi.client, "trusted client (token, admin)")):
            resp, page = get_page(viewer)
            assert page.texts["viewer"] == who
            assert page.kernels() == {"alice": {"idle": 1, "total": 1}, "bob": {"idle": 2, "total": 2}}
            assert page.links["Metrics (Prometheus)"] == "/metrics"
            assert TOKENS["carol"].encode() not in resp.body and SHARED.encode() not in resp.body
    finally:
        for client, kernel_id in kernels:
            client.delete_kernel(kernel_id)


class _Driver:
    """A driver as the page sees one: a service that runs, with the optional health hook of egd.metrics."""

    def __init__(self, running: bool, health: dict[str, Any] | None = None) -> None:
        self.running = running
        if health is not None:
            self.health = lambda: health


def test_driver_state_and_a_page_not_ready() -> None:
    """A driver that is not running says so; its health hook's verdict and note show as /readyz has them, with
    how many of its hosts are up; a page of a gateway not ready says so, every value escaped."""
    assert driver_state(_Driver(True)) == "ok"
    assert driver_state(_Driver(False)) == "not running"
    assert driver_state(_Driver(True, {"ready": False, "detail": "every host is out"})) == "every host is out"
    assert driver_state(_Driver(True, {"ready": False})) == "not ready"
    hosts = {"h1": {"up": True}, "h2": {"up": False}}
    assert driver_state(_Driver(True, {"ready": True, "detail": "h2 out: refused", "hosts": hosts})) == \
        "ok (1 of 2 hosts up; h2 out: refused)"
    view = StatusView("1", "2", "/", HOSTILE, False, False, [(HOSTILE, "not running")], {HOSTILE: HOSTILE}, {}, [])
    page = Page(render(view))
    assert page.texts["ready"] == "not ready"
    assert page.rows["drivers"][1:] == [[HOSTILE, "not running"]]
    assert page.rows["checks"][1:] == [[HOSTILE, HOSTILE]]
    assert page.texts["viewer"] == HOSTILE
