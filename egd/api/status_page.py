"""The status page a person opens in a browser: ``GET /`` below the base URL.

One small HTML document, behind the same authentication as the API: egd's version, its drivers and the
readiness checks of ``/readyz``, the kernels the viewer may see counted per user and state, and links to the
OpenAPI document and (when the viewer may read them) the metrics. It needs no JavaScript and loads nothing:
the stylesheet is inline and allowed by its hash in a ``Content-Security-Policy`` that forbids everything
else, so that even a value that slipped through escaping could not run or fetch anything. Every value is
HTML-escaped (user names come from clients, a driver's health from the hosts it reaches).

A browser cannot send an ``Authorization`` header by itself, so a person opens ``<base_url>?token=<t>``; the
links of a page reached that way carry the same ``?token=``, so that they work when clicked. The page is never
cached and sends no ``Referer``, so the token does not travel further than the address bar it came from.
"""

from __future__ import annotations

import base64
import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any
from urllib.parse import quote

from egd import API_VERSION, __version__
from egd.auth import Identity
from egd.config import Config
from egd.kernels.kernel import Kernel, KernelState
from egd.metrics import driver_health as metrics_driver_health

#: The page's whole style: inline (no asset to serve or fetch), allowed by hash in the CSP.
STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2430;background:#f4f6f9}
header{background:#1d2430;color:#fff;padding:14px 28px;display:flex;align-items:baseline;gap:18px}
header h1{font-size:22px;margin:0}header .version{opacity:.75}
main{max-width:960px;margin:0 auto;padding:8px 28px 28px}
section{background:#fff;border:1px solid #dde2ea;border-radius:6px;margin-top:18px;padding:6px 18px 14px}
h2{font-size:16px;margin:12px 0 8px}
table{border-collapse:collapse;min-width:50%}
th,td{text-align:left;padding:4px 14px 4px 0;border-bottom:1px solid #eef0f4;vertical-align:top}
td.n,th.n{text-align:right}tfoot td{font-weight:600;border-bottom:0}
dl{display:grid;grid-template-columns:max-content auto;gap:4px 18px;margin:6px 0}dt{color:#5b6576}dd{margin:0}
.ok{color:#17753a;font-weight:600}.warn{color:#8a5a00;font-weight:600}.bad{color:#b3261e;font-weight:600}
.note{color:#5b6576}
.badge{padding:2px 10px;border-radius:12px;font-size:13px;font-weight:600;background:#17753a;color:#fff}
.badge.bad{background:#b3261e}
code{font:13px ui-monospace,monospace}
""".strip()

_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode("utf-8")).digest()).decode("ascii")

#: Nothing but the inline stylesheet and the empty data: icon (which spares the browser a request for
#: /favicon.ico, refused without credentials and logged as such); no frame may embed the page.
CONTENT_SECURITY_POLICY = (f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; img-src data:; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")

#: The order of the state columns (states not listed here follow, alphabetically).
STATE_ORDER = ("starting", "idle", "busy", "restarting", "terminating", "dead")


@dataclass(frozen=True)
class Link:
    """One link of the page."""

    label: str
    href: str
    note: str = ""


@dataclass(frozen=True)
class StatusView:
    """Everything the page shows, already filtered for its viewer."""

    version: str
    api_version: str
    base_url: str
    viewer: str
    #: Whether the viewer sees every user's kernels (admins, trusted clients, the local operator).
    sees_all: bool
    ready: bool
    #: Each driver and its health (``ok``, ``ok (note)``, or what is wrong).
    drivers: Sequence[tuple[str, str]]
    #: The readiness checks of ``/readyz``: name, ``ok`` or the problem.
    checks: Mapping[str, str]
    #: Kernels per (user, state); None when ``server.list_kernels`` hides them.
    kernels: Mapping[tuple[str, str], int] | None
    links: Sequence[Link]


def kernel_state(kernel: Kernel) -> str:
    """What a person wants to know of a kernel: idle or busy while it runs, otherwise where it is in its life."""
    return kernel.execution_state if kernel.state is KernelState.RUNNING else kernel.state.value


def driver_state(driver: Any) -> str:
    """One driver's health, as ``/readyz`` judges it: ``not running``; what its health hook says is wrong;
    ``ok``, with the hook's note when it has one (an ssh host out of the pool); and how many of its hosts are
    up when it has a pool."""
    if not getattr(driver, "running", False):
        return "not running"
    health = metrics_driver_health(driver) or {}
    detail = str(health.get("detail") or "")
    if not health.get("ready", True):
        return detail or "not ready"
    hosts = health.get("hosts") or {}
    notes = [f"{sum(1 for h in hosts.values() if h.get('up'))} of {len(hosts)} hosts up"] if hosts else []
    notes += [detail] if detail else []
    return f"ok ({'; '.join(notes)})" if notes else "ok"


def _with_token(href: str, token: str | None) -> str:
    return href if token is None else f"{href}?token={quote(token, safe='')}"


def build_view(config: Config, identity: Identity, kernels: Iterable[Kernel], readiness: tuple[bool, dict[str, str]],
               drivers: Mapping[str, Any], token: str | None = None) -> StatusView:
    """The page's content for ``identity``: ``kernels`` are the ones it may see, ``drivers`` the gateway's by
    name; ``token`` is the credential it sent in the query (the links then carry it)."""
    ready, checks = readiness
    base = config.server.base_url
    counts: Counter[tuple[str, str]] | None = None
    if config.server.list_kernels:  # the same switch as GET /api/kernels
        counts = Counter((k.env.username, kernel_state(k)) for k in kernels)
    links = [Link("OpenAPI document (YAML)", _with_token(f"{base}api/swagger.yaml", token)),
             Link("OpenAPI document (JSON)", _with_token(f"{base}api/swagger.json", token))]
    if config.server.list_kernels:
        links.append(Link("Kernels (JSON)", _with_token(f"{base}api/kernels", token)))
    # GET /metrics refuses a user-bound caller that is not an admin (it names every user with a kernel).
    if config.server.metrics_public or not identity.bound or identity.admin:
        links.append(Link("Metrics (Prometheus)", _with_token(f"{base}metrics", token)))
    links.append(Link("Readiness (JSON)", f"{base}readyz", "no credential needed"))
    viewer = "local operator (no credentials configured)" if identity.method == "none" else identity.describe()
    return StatusView(__version__, API_VERSION, base, viewer, not identity.bound or identity.admin, ready,
                      [(name, driver_state(driver)) for name, driver in sorted(drivers.items())], checks, counts,
                      links)


def _health_cell(value: str) -> str:
    css = "ok" if value == "ok" else "warn" if value.startswith("ok (") else "bad"
    return f'<td class="{css}">{escape(value)}</td>'


def _kernels_section(view: StatusView) -> str:
    scope = "every user's kernels" if view.sees_all else "your own kernels only"
    if view.kernels is None:
        return ('<p class="note" id="kernels-hidden">Listing kernels is disabled on this gateway '
                "(<code>server.list_kernels</code>).</p>")
    if not view.kernels:
        return f'<p class="note">No kernels ({escape(scope)}).</p>'
    known = {state for _, state in view.kernels}
    states = [s for s in STATE_ORDER if s in known] + sorted(known - set(STATE_ORDER))
    users = sorted({user for user, _ in view.kernels})
    head = "".join(f'<th class="n">{escape(s)}</th>' for s in states)
    rows = []
    for user in users:
        cells = "".join(f'<td class="n">{view.kernels.get((user, s), 0)}</td>' for s in states)
        total = sum(view.kernels.get((user, s), 0) for s in states)
        rows.append(f'<tr><td>{escape(user)}</td>{cells}<td class="n">{total}</td></tr>')
    totals = "".join(f'<td class="n">{sum(view.kernels.get((u, s), 0) for u in users)}</td>' for s in states)
    return (f'<p class="note">Kernels this gateway runs: {escape(scope)}.</p>'
            f'<table id="kernels"><thead><tr><th>user</th>{head}<th class="n">total</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody>'
            f'<tfoot><tr><td>total</td>{totals}<td class="n">{sum(view.kernels.values())}</td></tr></tfoot></table>')


def render(view: StatusView) -> bytes:
    """The page as UTF-8 HTML."""
    state = '<span class="badge" id="ready">ready</span>' if view.ready else \
        '<span class="badge bad" id="ready">not ready</span>'
    drivers = "".join(f"<tr><td>{escape(name)}</td>{_health_cell(health)}</tr>" for name, health in view.drivers)
    checks = "".join(f"<tr><td>{escape(name)}</td>{_health_cell(value)}</tr>" for name, value in view.checks.items())
    links = "".join(f'<li><a href="{escape(link.href)}">{escape(link.label)}</a>'
                    f'{f" <span class=note>({escape(link.note)})</span>" if link.note else ""}</li>'
                    for link in view.links)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<meta name="referrer" content="no-referrer"><link rel="icon" href="data:,">
<title>egd {escape(view.version)}: status</title><style>{STYLE}</style></head>
<body><header><h1>egd</h1><span class="version" id="version">version {escape(view.version)}</span>{state}</header>
<main>
<section id="gateway"><h2>Gateway</h2><dl>
<dt>egd version</dt><dd>{escape(view.version)}</dd>
<dt>Jupyter API version</dt><dd>{escape(view.api_version)}</dd>
<dt>Base URL</dt><dd><code>{escape(view.base_url)}</code></dd>
<dt>You are</dt><dd id="viewer">{escape(view.viewer)}</dd>
</dl></section>
<section><h2>Drivers</h2><table id="drivers"><thead><tr><th>driver</th><th>health</th></tr></thead>
<tbody>{drivers}</tbody></table></section>
<section id="kernel-counts"><h2>Kernels</h2>{_kernels_section(view)}</section>
<section><h2>Readiness checks</h2><table id="checks"><thead><tr><th>check</th><th>state</th></tr></thead>
<tbody>{checks}</tbody></table></section>
<section><h2>Links</h2><ul id="links">{links}</ul></section>
</main></body></html>
"""
    return page.encode("utf-8")


def respond(request: Any, view: StatusView) -> bytes:
    """Set the page's headers on ``request`` and return its body (Twisted leaves the body out for HEAD)."""
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    request.setHeader(b"Content-Security-Policy", CONTENT_SECURITY_POLICY.encode("ascii"))
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"X-Frame-Options", b"DENY")
    request.setHeader(b"Referrer-Policy", b"no-referrer")
    request.setHeader(b"Cache-Control", b"no-store")
    return render(view)


def query_token(request: Any, identity: Identity) -> str | None:
    """The credential ``request`` carried as ``?token=`` (and that authenticated it), for the page's links;
    None when it came in the header or no credential is configured."""
    if identity.method == "none" or request.getHeader(b"authorization"):
        return None
    values = request.args.get(b"token")
    return values[0].decode("utf-8", "replace") if values else None
