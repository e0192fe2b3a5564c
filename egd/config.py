"""egd's configuration: YAML in, frozen objects out, every problem reported at once with its path.

The file is optional: with no file, every key has the embedded default documented in ``conf/egd.yaml``.
A few keys can be overridden from the environment (see ``ENV_OVERRIDES``); the environment wins over the
file, so a systemd drop-in or a container can change the address without editing YAML.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import yaml

#: Environment variable -> dotted config key. Values are parsed like the YAML scalar they replace.
ENV_OVERRIDES: dict[str, str] = {
    "EGD_IP": "server.ip",
    "EGD_PORT": "server.port",
    "EGD_BASE_URL": "server.base_url",
    "EGD_LOG_LEVEL": "logging.level",
    "EGD_LOG_FORMAT": "logging.format",
    "EGD_DEFAULT_KERNEL_NAME": "kernels.default_kernel_name",
    "EGD_LAUNCH_TIMEOUT": "kernels.launch_timeout",
    "EGD_AUTH_TOKEN": "auth.token",
    "EGD_CERTFILE": "server.certfile",
    "EGD_KEYFILE": "server.keyfile",
    "EGD_STATE_DSN": "state.dsn",
}

#: Overrides taken as text, never parsed as YAML (a token of digits must stay a string).
_RAW_ENV = frozenset({"auth.token", "server.certfile", "server.keyfile", "state.dsn"})
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_PORT_RANGE = re.compile(r"^(\d+)\.\.(\d+)\Z")


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists every ``path: what is wrong`` found."""

    def __init__(self, problems: list[str], source: str = "configuration") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source} has {len(problems)} problem(s):\n" + "\n".join(f"  {p}" for p in problems))


@dataclass(frozen=True)
class ServerConfig:
    """Where and how egd listens."""

    ip: str = "127.0.0.1"
    port: int = 8888
    base_url: str = "/"
    ws_ping_interval: float = 30.0
    ws_ping_timeout: float = 60.0
    ws_max_message_size: int = 64 * 1024 * 1024
    ws_handshake_timeout: float = 30.0
    replay_buffer_messages: int = 10_000
    replay_buffer_bytes: int = 64 * 1024 * 1024
    replay_buffer_seconds: float = 300.0
    list_kernels: bool = True
    certfile: str | None = None
    keyfile: str | None = None
    client_ca: str | None = None
    #: Origins whose browser pages may call the API (CORS) and open kernel WebSockets; "*" for any.
    allow_origin: tuple[str, ...] = ()
    allow_credentials: bool = False
    allow_headers: tuple[str, ...] = ("Authorization", "Content-Type", "X-XSRFToken")
    allow_methods: tuple[str, ...] = ("GET", "POST", "PATCH", "DELETE", "OPTIONS")
    cors_max_age: int = 600
    #: GET /metrics without credentials (for a Prometheus that cannot send a token); it names users.
    metrics_public: bool = False
    #: Host names (the Host header) served besides the loopback names (localhost, 127.0.0.1, [::1]). Without
    #: credentials only these are served (DNS rebinding); with credentials, when not empty, too.
    allowed_hosts: tuple[str, ...] = ()
    #: Open connections per listener; past it new connections are closed at once.
    max_connections: int = 1000
    #: Seconds a client has to send a request's whole header block, then again its body (slowloris).
    header_timeout: float = 10.0
    #: How far one WebSocket client may fall behind its kernel's output (queued for it inside egd) before it
    #: is disconnected (it then gets what it missed from its session's replay buffer when it reconnects).
    client_backlog_bytes: int = 16 * 1024 * 1024
    client_backlog_messages: int = 20_000
    #: Absent sessions (with a session_id) whose messages one kernel keeps for a reconnect.
    replay_buffer_sessions: int = 16


@dataclass(frozen=True)
class LoggingConfig:
    """What egd logs and in which shape."""

    level: str = "info"
    format: str = "text"


DEFAULT_INHERITED_ENVS = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")


@dataclass(frozen=True)
class KernelsConfig:
    """Kernel policy shared by every driver."""

    default_kernel_name: str = "python3"
    kernelspec_dirs: tuple[str, ...] = ()
    allowed_kernelspecs: tuple[str, ...] = ()
    launch_timeout: float = 60.0
    max_launch_timeout: float = 300.0
    shutdown_wait: float = 5.0
    restart_limit: int = 5
    stable_start_seconds: float = 10.0
    heartbeat_interval: float = 3.0
    heartbeat_misses: int = 3
    client_envs: tuple[str, ...] = ()
    inherited_envs: tuple[str, ...] = DEFAULT_INHERITED_ENVS
    working_dir: str | None = None
    port_range: tuple[int, int] | None = None
    runtime_dir: str | None = None
    max_kernels: int | None = None
    max_kernels_per_user: int | None = None
    authorized_users: tuple[str, ...] = ()
    unauthorized_users: tuple[str, ...] = ()
    #: Culling (Jupyter Server's cull_*): seconds idle / busy before a kernel is shut down (0 = never), whether
    #: kernels with a WebSocket client are culled too, seconds between checks. Kernelspecs may override the
    #: first three in metadata.egd.cull.
    cull_idle_timeout: float = 0.0
    cull_busy_timeout: float = 0.0
    cull_connected: bool = False
    cull_interval: float = 60.0
    #: Pre-started kernels per kernelspec name, handed out on POST and replenished in the background.
    pools: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class UserCredential:
    """One user's own token, stored as its SHA-256 (``egd token`` makes a token and its hash)."""

    name: str
    token_sha256: str
    groups: tuple[str, ...] = ()
    admin: bool = False


@dataclass(frozen=True)
class JWTConfig:
    """Signed JSON Web Tokens: the user comes from a claim of a token egd can verify."""

    algorithm: str
    key: str  # the HS256 secret or the RS256 public key (PEM)
    audience: str
    issuer: str | None = None
    user_claim: str = "sub"
    groups_claim: str = "groups"
    leeway: float = 30.0


@dataclass(frozen=True)
class AuthConfig:
    """Who may use the gateway."""

    token: str | None = None
    users: tuple[UserCredential, ...] = ()
    jwt: JWTConfig | None = None
    admin_users: tuple[str, ...] = ()
    admin_groups: tuple[str, ...] = ()
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: With distinct users (per-user tokens or JWT), every driver must run kernels as their users, or the
    #: operator says with this switch that the users trust each other (their kernels share egd's OS user).
    users_trust_each_other: bool = False

    @property
    def configured(self) -> bool:
        """Whether any credential is configured (without one, egd serves loopback only)."""
        return bool(self.token or self.users or self.jwt)


@dataclass(frozen=True)
class StateConfig:
    """Where egd keeps its kernels' records, so that a restarted egd re-attaches to them."""

    #: sqlite (embedded, the default), postgresql (several gateways share it), or none (not remembered).
    store: str = "sqlite"
    #: PostgreSQL's connection string (libpq: "host=... dbname=... user=..." or a postgresql:// URL).
    dsn: str | None = None
    #: The SQLite file (default: egd-state.sqlite in kernels.runtime_dir).
    path: str | None = None
    #: The key that encrypts kernel keys and launch secrets in the store (default: a file beside it, made at
    #: first start, mode 0600).
    secret_key_file: str | None = None
    #: What SIGTERM does to running kernels: keep them (re-attached at the next start) or shut them down.
    on_stop: str = "keep"


@dataclass(frozen=True)
class Config:
    """The whole configuration of one egd process."""

    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    state: StateConfig = field(default_factory=StateConfig)
    drivers: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: {"local": {}})
    source: str = "embedded defaults"


# ---------------------------------------------------------------------------------------------------------
# Field checkers: each takes (value, path, problems) and returns the converted value (or None on error).
# ---------------------------------------------------------------------------------------------------------

Checker = Callable[[Any, str, list[str]], Any]


def _number(minimum: float, maximum: float | None = None, integer: bool = False) -> Checker:
    def check(value: Any, path: str, problems: list[str]) -> Any:
        kind = "a whole number" if integer else "a number"
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            problems.append(f"{path}: must be {kind}, got {type(value).__name__}")
            return None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            problems.append(f"{path}: must be {bounds}, got {value}")
            return None
        return value if integer else float(value)

    return check


def _boolean(value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, bool):
        problems.append(f"{path}: must be true or false, got {value!r}")
        return None
    return value


def _choice(*choices: str) -> Checker:
    def check(value: Any, path: str, problems: list[str]) -> Any:
        if not isinstance(value, str) or value.lower() not in choices:
            problems.append(f"{path}: must be one of {', '.join(choices)}, got {value!r}")
            return None
        return value.lower()

    return check


def _string(value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, str) or not value:
        problems.append(f"{path}: must be a non-empty string")
        return None
    return value


def _readable_file(value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, str) or not os.path.isfile(value) or not os.access(value, os.R_OK):
        problems.append(f"{path}: not a readable file: {value!r}")
        return None
    return value


def _token(value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, str) or len(value) < 16 or any(c.isspace() for c in value):
        problems.append(f"{path}: must be a string of at least 16 characters without spaces")
        return None
    return value


_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.-]+(:\d{1,5})?\Z|^\*\Z")


def _origins(value: Any, path: str, problems: list[str]) -> Any:
    items = value.split(",") if isinstance(value, str) else value  # Enterprise Gateway's is one string
    if not isinstance(items, list):
        problems.append(f"{path}: must be a list of origins such as https://lab.example.org, or *")
        return None
    origins = tuple(str(o).strip().rstrip("/") for o in items if str(o).strip())
    bad = [o for o in origins if not _ORIGIN.match(o)]
    if bad:
        problems.append(f"{path}: not an origin (scheme://host[:port]) or *: {', '.join(bad)}")
        return None
    return origins


_USER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}\Z")  # \Z: "$" allows a final newline
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")


def _users(value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, dict):
        problems.append(f"{path}: must map user names to {{token_sha256, groups, admin}}")
        return None
    users = []
    for name, entry in value.items():
        where = f"{path}.{name}"
        if not isinstance(name, str) or not _USER_NAME.match(name):
            problems.append(f"{where}: not a user name")
            continue
        if not isinstance(entry, dict) or set(entry) - {"token_sha256", "groups", "admin"}:
            problems.append(f"{where}: must be a mapping with token_sha256 (and optionally groups, admin)")
            continue
        digest = entry.get("token_sha256")
        if not isinstance(digest, str) or not _SHA256.match(digest.lower()):
            problems.append(f"{where}.token_sha256: must be the 64 hex digits of the token's SHA-256 "
                            "(`egd token` prints a new token and its hash)")
            continue
        groups = _strings(entry.get("groups", []), f"{where}.groups", problems)
        admin = _boolean(entry.get("admin", False), f"{where}.admin", problems)
        if groups is not None and admin is not None:
            users.append(UserCredential(name, digest.lower(), groups, admin))
    digests = [u.token_sha256 for u in users]
    if len(set(digests)) != len(digests):
        problems.append(f"{path}: two users have the same token")
    return tuple(users)


def _read_key(value: Any, path: str, problems: list[str]) -> str | None:
    checked = _readable_file(value, path, problems)
    if checked is None:
        return None
    with open(checked, encoding="utf-8") as handle:
        return handle.read()


def _jwt(value: Any, path: str, problems: list[str]) -> Any:
    known = {"algorithm", "secret", "secret_file", "public_key_file", "audience", "issuer", "user_claim",
             "groups_claim", "leeway"}
    if not isinstance(value, dict):
        problems.append(f"{path}: must be a mapping ({', '.join(sorted(known))})")
        return None
    for unknown in set(value) - known:
        problems.append(f"{path}.{unknown}: unknown key (known: {', '.join(sorted(known))})")
    algorithm = str(value.get("algorithm", "")).upper()
    key: str | None = None
    if algorithm == "HS256":
        if value.get("secret_file"):
            key = _read_key(value["secret_file"], f"{path}.secret_file", problems)
            key = key.strip() if key else None
        else:
            key = _token(value.get("secret"), f"{path}.secret", problems)
        if key is not None and len(key) < 32:
            problems.append(f"{path}.secret: an HS256 secret needs at least 32 characters")
            key = None
    elif algorithm == "RS256":
        key = _read_key(value.get("public_key_file"), f"{path}.public_key_file", problems)
        if key is not None and "PUBLIC KEY" not in key:
            problems.append(f"{path}.public_key_file: not a PEM public key")
            key = None
    else:
        problems.append(f"{path}.algorithm: must be HS256 or RS256")
    audience = _string(value.get("audience"), f"{path}.audience", problems)
    issuer = _optional(_string)(value.get("issuer"), f"{path}.issuer", problems)
    user_claim = _string(value.get("user_claim", "sub"), f"{path}.user_claim", problems)
    groups_claim = _string(value.get("groups_claim", "groups"), f"{path}.groups_claim", problems)
    leeway = _number(0, 600)(value.get("leeway", 30), f"{path}.leeway", problems)
    if None in (key, audience, user_claim, groups_claim, leeway):
        return None
    return JWTConfig(algorithm, str(key), audience, issuer, user_claim, groups_claim, float(leeway))


def _groups(value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, dict):
        problems.append(f"{path}: must map group names to lists of users")
        return None
    result = {}
    for name, members in value.items():
        checked = _strings(members, f"{path}.{name}", problems)
        if checked is not None:
            result[str(name)] = checked
    return result


def _pools(value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, dict):
        problems.append(f"{path}: must map kernelspec names to a number of kernels, e.g. {{python3: 2}}")
        return None
    pools = {}
    for name, size in value.items():
        checked = _number(0, 100, integer=True)(size, f"{path}.{name}", problems)
        if checked is not None and checked > 0:
            pools[str(name)] = checked
    return pools


def _optional(check: Checker) -> Checker:
    def optional(value: Any, path: str, problems: list[str]) -> Any:
        return None if value is None else check(value, path, problems)

    return optional


def _ip(value: Any, path: str, problems: list[str]) -> Any:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        problems.append(f"{path}: not an IP address: {value!r}")
        return None


def _base_url(value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, str) or any(c in value for c in "?#% \t\r\n"):
        problems.append(f"{path}: must be a URL path such as / or /gateway/")
        return None
    return "/" + "/".join(s for s in value.split("/") if s) + "/" if value.strip("/") else "/"


def _names(value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, list):
        problems.append(f"{path}: must be a list of names")
        return None
    bad = [f"{path}[{i}]: not an environment variable name: {v!r}" for i, v in enumerate(value)
           if not isinstance(v, str) or not (_ENV_NAME.match(v) or v == "*")]
    problems.extend(bad)
    return None if bad else tuple(value)


def _strings(value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, list):
        problems.append(f"{path}: must be a list of strings")
        return None
    bad = [f"{path}[{i}]: must be a non-empty string" for i, v in enumerate(value) if not isinstance(v, str) or not v]
    problems.extend(bad)
    return None if bad else tuple(value)


def _port_range(value: Any, path: str, problems: list[str]) -> Any:
    match = _PORT_RANGE.match(str(value))
    if not match:
        problems.append(f"{path}: must look like 40000..41000, got {value!r}")
        return None
    low, high = int(match.group(1)), int(match.group(2))
    if not 1024 <= low < high <= 65535 or high - low < 20:
        problems.append(f"{path}: needs 1024 <= low < high <= 65535 and at least 20 ports, got {value}")
        return None
    return (low, high)


_SCHEMA: dict[type, dict[str, Checker]] = {
    ServerConfig: {
        "ip": _ip,
        "port": _number(0, 65535, integer=True),
        "base_url": _base_url,
        "ws_ping_interval": _number(0),
        "ws_ping_timeout": _number(1),
        "ws_max_message_size": _number(1024, integer=True),
        "ws_handshake_timeout": _number(1),
        "replay_buffer_messages": _number(0, integer=True),
        "replay_buffer_bytes": _number(0, integer=True),
        "replay_buffer_seconds": _number(0),
        "list_kernels": _boolean,
        "certfile": _optional(_readable_file),
        "keyfile": _optional(_readable_file),
        "client_ca": _optional(_readable_file),
        "allow_origin": _origins,
        "allow_credentials": _boolean,
        "allow_headers": _strings,
        "allow_methods": _strings,
        "cors_max_age": _number(0, 86400, integer=True),
        "metrics_public": _boolean,
        "allowed_hosts": _strings,
        "max_connections": _number(1, integer=True),
        "header_timeout": _number(0.1),
        "client_backlog_bytes": _number(64 * 1024, integer=True),
        "client_backlog_messages": _number(16, integer=True),
        "replay_buffer_sessions": _number(0, integer=True),
    },
    AuthConfig: {
        "token": _optional(_token),
        "users": _users,
        "jwt": _optional(_jwt),
        "admin_users": _strings,
        "admin_groups": _strings,
        "groups": _groups,
        "users_trust_each_other": _boolean,
    },
    StateConfig: {
        "store": _choice("sqlite", "postgresql", "none"),
        "dsn": _optional(_string),
        "path": _optional(_string),
        "secret_key_file": _optional(_string),
        "on_stop": _choice("keep", "shutdown"),
    },
    LoggingConfig: {
        "level": _choice("debug", "info", "warn", "error", "critical"),
        "format": _choice("text", "json"),
    },
    KernelsConfig: {
        "default_kernel_name": _string,
        "kernelspec_dirs": _strings,
        "allowed_kernelspecs": _strings,
        "launch_timeout": _number(1),
        "max_launch_timeout": _number(1),
        "shutdown_wait": _number(0),
        "restart_limit": _number(0, integer=True),
        "stable_start_seconds": _number(0),
        "heartbeat_interval": _number(0),
        "heartbeat_misses": _number(1, integer=True),
        "client_envs": _names,
        "inherited_envs": _names,
        "working_dir": _optional(_string),
        "port_range": _optional(_port_range),
        "runtime_dir": _optional(_string),
        "max_kernels": _optional(_number(1, integer=True)),
        "max_kernels_per_user": _optional(_number(1, integer=True)),
        "authorized_users": _strings,
        "unauthorized_users": _strings,
        "cull_idle_timeout": _number(0),
        "cull_busy_timeout": _number(0),
        "cull_connected": _boolean,
        "cull_interval": _number(0.1),
        "pools": _pools,
    },
}


def _section(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        problems.append(f"{path}: must be a mapping")
        return cls()
    schema = _SCHEMA[cls]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in schema:
            problems.append(f"{path}.{key}: unknown key (known: {', '.join(sorted(schema))})")
            continue
        checked = schema[key](value, f"{path}.{key}", problems)
        if checked is not None or value is None:
            values[key] = checked
    return cls(**values)


def _drivers(raw: Any, problems: list[str]) -> dict[str, dict[str, Any]]:
    if raw is None:
        return {"local": {}}
    if not isinstance(raw, dict) or not raw:
        problems.append("drivers: must be a mapping of driver name to its settings, with at least one driver")
        return {"local": {}}
    result: dict[str, dict[str, Any]] = {}
    for name, settings in raw.items():
        if not isinstance(name, str) or not re.match(r"^[a-z][a-z0-9_]*$", name):
            problems.append(f"drivers.{name}: driver names are lower-case identifiers")
        elif settings is not None and not isinstance(settings, dict):
            problems.append(f"drivers.{name}: must be a mapping (or empty)")
        else:
            result[name] = dict(settings or {})
    return result


def _apply_env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for variable, dotted in ENV_OVERRIDES.items():
        if variable in environ:
            section, key = dotted.split(".")
            target = raw.setdefault(section, {})
            if isinstance(target, dict):
                raw_value = environ[variable]
                target[key] = raw_value if dotted in _RAW_ENV or not raw_value else yaml.safe_load(raw_value)


def parse_config(text: str, source: str = "configuration", environ: Mapping[str, str] | None = None) -> Config:
    """Parse YAML text into a :class:`Config`, raising :class:`ConfigError` with every problem found."""
    problems: list[str] = []
    try:
        raw = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], source) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["the top level must be a mapping"], source)
    _apply_env_overrides(raw, os.environ if environ is None else environ)
    known = {"server", "auth", "logging", "kernels", "state", "drivers"}
    problems.extend(f"{key}: unknown section (known: {', '.join(sorted(known))})" for key in raw if key not in known)
    config = Config(
        server=_section(ServerConfig, raw.get("server"), "server", problems),
        auth=_section(AuthConfig, raw.get("auth"), "auth", problems),
        logging=_section(LoggingConfig, raw.get("logging"), "logging", problems),
        kernels=_section(KernelsConfig, raw.get("kernels"), "kernels", problems),
        state=_section(StateConfig, raw.get("state"), "state", problems),
        drivers=_drivers(raw.get("drivers"), problems),
        source=source,
    )
    if bool(config.server.certfile) != bool(config.server.keyfile):
        problems.append("server.certfile: TLS needs both server.certfile and server.keyfile")
    if config.server.client_ca and not config.server.certfile:
        problems.append("server.client_ca: client certificates need TLS (server.certfile and server.keyfile)")
    if config.state.store == "postgresql" and not (config.state.dsn and config.state.secret_key_file):
        problems.append("state: a postgresql store needs state.dsn and state.secret_key_file (shared by the gateways)")
    if config.kernels.launch_timeout > config.kernels.max_launch_timeout:
        problems.append("kernels.launch_timeout: must not exceed kernels.max_launch_timeout")
    if problems:
        raise ConfigError(problems, source)
    return config


def load_config(path: str | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read and parse the config file at ``path`` (``None``: embedded defaults plus environment overrides)."""
    if path is None:
        return parse_config("", "embedded defaults", environ)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError([f"cannot read {path}: {exc.strerror}"], path) from None
    return parse_config(text, path, environ)


def with_overrides(config: Config, **server: Any) -> Config:
    """Return ``config`` with the given ``server`` keys replaced (command-line flags such as ``--port``)."""
    known = {f.name for f in fields(ServerConfig)}
    unknown = set(server) - known
    if unknown:
        raise ValueError(f"unknown server settings: {sorted(unknown)}")
    problems: list[str] = []
    checked = {k: _SCHEMA[ServerConfig][k](v, f"--{k.replace('_', '-')}", problems)
               for k, v in server.items() if v is not None}
    if problems:
        raise ConfigError(problems, "command line")
    return replace(config, server=replace(config.server, **checked))
