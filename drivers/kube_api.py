"""The Kubernetes API server, reached with treq: where it is and who egd is to it (a kubeconfig, or the pod's own
service account when egd runs in the cluster), over TLS verified against the cluster's CA.

Credentials are read once, when the driver is built (a startup, not a request); the in-cluster token is re-read
when its file changes, since the kubelet rotates it. Exec and auth-provider plugins of a kubeconfig are not
supported: the error says so and names the user entry.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from typing import Any

import yaml
from twisted.web.client import Agent, HTTPConnectionPool

from egd.driverapi import IDriverReactor
from egd.drivers.http_api import JsonApi, ServerTLS

#: Where a pod finds its service account's credentials.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
#: Seconds between readings of a token file.
TOKEN_REREAD = 60.0


@dataclass(frozen=True)
class KubeCredentials:
    """Where the API server is and how egd authenticates to it."""

    server: str
    #: PEM of the CA that signed the server's certificate (None: the system's trust store).
    ca_pem: bytes | None = None
    token: str | None = None
    #: A token file read again when it changes (the in-cluster service account token).
    token_file: str | None = None
    client_cert_pem: bytes | None = None
    client_key_pem: bytes | None = None
    insecure: bool = False
    #: The namespace of the context (or of egd's own pod).
    namespace: str = "default"
    #: Where these came from, for messages.
    source: str = ""


def _file_or_data(entry: dict[str, Any], key: str, base_dir: str) -> bytes | None:
    """A kubeconfig value given either as ``<key>-data`` (base64) or as ``<key>`` (a file path)."""
    data = entry.get(f"{key}-data")
    if data:
        return base64.b64decode(str(data))
    path = entry.get(key)
    if path:
        path = os.path.join(base_dir, os.path.expanduser(str(path)))
        with open(path, "rb") as handle:
            return handle.read()
    return None


def _named(items: Any, name: str, what: str, source: str) -> dict[str, Any]:
    for item in items or []:
        if isinstance(item, dict) and item.get("name") == name:
            value = item.get(what)
            return value if isinstance(value, dict) else {}
    raise ValueError(f"{source}: no {what} named {name!r}")


def load_kubeconfig(path: str, context: str | None = None) -> KubeCredentials:
    """The credentials of ``context`` (default: the current context) of the kubeconfig at ``path``;
    ``ValueError`` saying what is missing or unsupported."""
    path = os.path.expanduser(path)
    with open(path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a kubeconfig")
    name = context or config.get("current-context")
    if not name:
        raise ValueError(f"{path}: no current-context, and no context was named")
    ctx = _named(config.get("contexts"), str(name), "context", path)
    cluster = _named(config.get("clusters"), str(ctx.get("cluster")), "cluster", path)
    user = _named(config.get("users"), str(ctx.get("user")), "user", path) if ctx.get("user") else {}
    for unsupported in ("exec", "auth-provider"):
        if user.get(unsupported):
            raise ValueError(f"{path}: user {ctx.get('user')!r} authenticates with {unsupported}, which egd does not "
                             "run; give it a token or a client certificate (a service account's token, for example)")
    base = os.path.dirname(path)
    token = user.get("token")
    token_file = user.get("tokenFile")
    if not cluster.get("server"):
        raise ValueError(f"{path}: cluster {ctx.get('cluster')!r} has no server")
    return KubeCredentials(
        server=str(cluster["server"]).rstrip("/"),
        ca_pem=_file_or_data(cluster, "certificate-authority", base),
        token=str(token) if token else None,
        token_file=os.path.join(base, str(token_file)) if token_file else None,
        client_cert_pem=_file_or_data(user, "client-certificate", base),
        client_key_pem=_file_or_data(user, "client-key", base),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        namespace=str(ctx.get("namespace") or "default"),
        source=f"kubeconfig {path} (context {name})",
    )


def in_cluster_credentials(account_dir: str = SERVICE_ACCOUNT_DIR) -> KubeCredentials:
    """The credentials of the pod egd runs in; ``ValueError`` when egd does not run in a pod."""
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    token_file = os.path.join(account_dir, "token")
    if not host or not port or not os.path.exists(token_file):
        raise ValueError("not running in a Kubernetes pod (no KUBERNETES_SERVICE_HOST or service account token)")
    with open(os.path.join(account_dir, "ca.crt"), "rb") as handle:
        ca = handle.read()
    namespace = "default"
    namespace_file = os.path.join(account_dir, "namespace")
    if os.path.exists(namespace_file):
        with open(namespace_file, encoding="utf-8") as handle:
            namespace = handle.read().strip() or namespace
    server_host = f"[{host}]" if ":" in host else host
    return KubeCredentials(server=f"https://{server_host}:{port}", ca_pem=ca, token_file=token_file,
                           namespace=namespace, source="the pod's service account")


def find_credentials(kubeconfig: str | None, context: str | None) -> KubeCredentials:
    """The credentials to use: ``kubeconfig`` when set; else, inside a pod, the pod's service account; else
    ``$KUBECONFIG`` or ``~/.kube/config``, as kubectl looks."""
    if kubeconfig:
        return load_kubeconfig(kubeconfig, context)
    if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(os.path.join(SERVICE_ACCOUNT_DIR, "token")):
        return in_cluster_credentials()
    path = (os.environ.get("KUBECONFIG") or "").split(os.pathsep)[0] or os.path.expanduser("~/.kube/config")
    if not os.path.exists(path):
        raise ValueError("no Kubernetes credentials: set drivers.kubernetes.kubeconfig, run egd in a pod, or "
                         f"provide {path}")
    return load_kubeconfig(path, context)


class KubeAPI(JsonApi):
    """Calls to the Kubernetes API server with egd's credentials (``requests`` counts them)."""

    def __init__(self, reactor: IDriverReactor, credentials: KubeCredentials, timeout: float = 10.0) -> None:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 8
        tls = ServerTLS(credentials.ca_pem, credentials.client_cert_pem, credentials.client_key_pem,
                        credentials.insecure)
        agent: Any = Agent(reactor, contextFactory=tls, pool=pool, connectTimeout=timeout)
        super().__init__(reactor, credentials.server, agent, pool, timeout, what="Kubernetes API server")
        self.credentials = credentials
        self._token = credentials.token
        self._token_read: float | None = None

    def _current_token(self) -> str | None:
        path = self.credentials.token_file
        now = self._reactor.seconds()
        # The kubelet rotates a projected token well before it expires (at 80% of its life, an hour at least):
        # reading its small tmpfs file once a minute follows it without a file read per request.
        if path and (self._token_read is None or now - self._token_read >= TOKEN_REREAD):
            try:
                with open(path, encoding="utf-8") as handle:
                    self._token = handle.read().strip()
                self._token_read = now
            except OSError:
                pass
        return self._token

    def headers(self) -> dict[str, str]:
        """JSON, and the bearer token when there is one."""
        headers = super().headers()
        token = self._current_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers
