"""egd's configuration: YAML in, frozen objects out, every problem reported at once with its path.

The file is optional: with no file, every key has the embedded default documented in ``conf/egd.yaml``.
A few keys can be overridden from the environment (see ``ENV_OVERRIDES``); the environment wins over the
file, so a systemd drop-in or a container can change the address without editing YAML.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import yaml

from egd.checks import (
    Checker,
    boolean,
    build,
    check_keys,
    choice,
    ip,
    names,
    number,
    optional,
    port_range,
    readable_file,
    string,
    strings,
    unknown_key,
)
from egd.logs import LOG_LEVELS
from egd.plugins import load_driver_class

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
    #: The largest frame egd accepts from a kernel (bytes); ZeroMQ resets the connection of a kernel that sends a
    #: larger one before egd holds any of it.
    max_message_size: int = 256 * 1024 * 1024
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
    #: Pooled kernels of one kernelspec started at the same time (when filling or replacing those handed out).
    pool_fill_at_once: int = 1
    #: Where IPython kernels keep their history: ``kernel`` (each kernel its own, in memory) or ``account``
    #: (IPython's default: the one history.sqlite of the account the kernel runs as, shared by its kernels).
    ipython_history: str = "kernel"


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
    #: What SIGTERM and Ctrl-C do to running kernels: shut them down (the default, so that stopping egd in a
    #: terminal leaves nothing behind), or keep them (re-attached at the next start; conf/egd.yaml, the systemd
    #: set-up, chooses it).
    on_stop: str = "shutdown"


@dataclass(frozen=True)
class Config:
    """The whole configuration of one egd process."""

    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    state: StateConfig = field(default_factory=StateConfig)
    #: Each driver's settings by driver name: an instance of the driver's ``settings_type`` (a mapping, checked
    #: when the driver is built, where a config is made in code).
    drivers: Mapping[str, Any] = field(default_factory=lambda: {"local": {}})
    source: str = "embedded defaults"


# ---------------------------------------------------------------------------------------------------------
# Field checkers: each takes (value, path, problems) and returns the converted value (or None on error).
# ---------------------------------------------------------------------------------------------------------

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


def _user(name: Any, entry: Any, where: str, problems: list[str]) -> UserCredential | None:
    """One entry of ``auth.users``; None, with the problem appended, when it is not valid."""
    if not isinstance(name, str) or not _USER_NAME.match(name):
        problems.append(f"{where}: not a user name")
        return None
    if not isinstance(entry, dict) or set(entry) - {"token_sha256", "groups", "admin"}:
        problems.append(f"{where}: must be a mapping with token_sha256 (and optionally groups, admin)")
        return None
    digest = entry.get("token_sha256")
    if not isinstance(digest, str) or not _SHA256.match(digest.lower()):
        problems.append(f"{where}.token_sha256: must be the 64 hex digits of the token's SHA-256 "
                        "(`egd token` prints a new token and its hash)")
        return None
    groups = strings(entry.get("groups", []), f"{where}.groups", problems)
    admin = boolean(entry.get("admin", False), f"{where}.admin", problems)
    if groups is None or admin is None:
        return None
    return UserCredential(name, digest.lower(), groups, admin)


def _users(value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, dict):
        problems.append(f"{path}: must map user names to {{token_sha256, groups, admin}}")
        return None
    checked = (_user(name, entry, f"{path}.{name}", problems) for name, entry in value.items())
    users = [user for user in checked if user is not None]
    digests = [u.token_sha256 for u in users]
    if len(set(digests)) != len(digests):
        problems.append(f"{path}: two users have the same token")
    return tuple(users)


def _read_key(value: Any, path: str, problems: list[str]) -> str | None:
    checked = readable_file(value, path, problems)
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
    for unknown in sorted(set(value) - known, key=str):
        problems.append(unknown_key(path, unknown, known))
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
    audience = string(value.get("audience"), f"{path}.audience", problems)
    issuer = optional(string)(value.get("issuer"), f"{path}.issuer", problems)
    user_claim = string(value.get("user_claim", "sub"), f"{path}.user_claim", problems)
    groups_claim = string(value.get("groups_claim", "groups"), f"{path}.groups_claim", problems)
    leeway = number(0, 600)(value.get("leeway", 30), f"{path}.leeway", problems)
    if None in (key, audience, user_claim, groups_claim, leeway):
        return None
    return JWTConfig(algorithm, str(key), audience, issuer, user_claim, groups_claim, float(leeway))


def _groups(value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, dict):
        problems.append(f"{path}: must map group names to lists of users")
        return None
    result = {}
    for name, members in value.items():
        checked = strings(members, f"{path}.{name}", problems)
        if checked is not None:
            result[str(name)] = checked
    return result


def _pools(value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, dict):
        problems.append(f"{path}: must map kernelspec names to a number of kernels, e.g. {{python3: 2}}")
        return None
    pools = {}
    for name, size in value.items():
        checked = number(0, 100, integer=True)(size, f"{path}.{name}", problems)
        if checked is not None and checked > 0:
            pools[str(name)] = checked
    return pools


def _base_url(value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, str) or any(c in value for c in "?#% \t\r\n"):
        problems.append(f"{path}: must be a URL path such as / or /gateway/")
        return None
    return "/" + "/".join(s for s in value.split("/") if s) + "/" if value.strip("/") else "/"


_SCHEMA: dict[type, dict[str, Checker]] = {
    ServerConfig: {
        "ip": ip,
        "port": number(0, 65535, integer=True),
        "base_url": _base_url,
        "ws_ping_interval": number(0),
        "ws_ping_timeout": number(1),
        "ws_max_message_size": number(1024, integer=True),
        "ws_handshake_timeout": number(1),
        "replay_buffer_messages": number(0, integer=True),
        "replay_buffer_bytes": number(0, integer=True),
        "replay_buffer_seconds": number(0),
        "list_kernels": boolean,
        "certfile": optional(readable_file),
        "keyfile": optional(readable_file),
        "client_ca": optional(readable_file),
        "allow_origin": _origins,
        "allow_credentials": boolean,
        "allow_headers": strings,
        "allow_methods": strings,
        "cors_max_age": number(0, 86400, integer=True),
        "metrics_public": boolean,
        "allowed_hosts": strings,
        "max_connections": number(1, integer=True),
        "header_timeout": number(0.1),
        "client_backlog_bytes": number(64 * 1024, integer=True),
        "client_backlog_messages": number(16, integer=True),
        "replay_buffer_sessions": number(0, integer=True),
    },
    AuthConfig: {
        "token": optional(_token),
        "users": _users,
        "jwt": optional(_jwt),
        "admin_users": strings,
        "admin_groups": strings,
        "groups": _groups,
        "users_trust_each_other": boolean,
    },
    StateConfig: {
        "store": choice("sqlite", "postgresql", "none"),
        "dsn": optional(string),
        "path": optional(string),
        "secret_key_file": optional(string),
        "on_stop": choice("keep", "shutdown"),
    },
    LoggingConfig: {
        "level": choice(*LOG_LEVELS),
        "format": choice("text", "json"),
    },
    KernelsConfig: {
        "default_kernel_name": string,
        "kernelspec_dirs": strings,
        "allowed_kernelspecs": strings,
        "launch_timeout": number(1),
        "max_launch_timeout": number(1),
        "shutdown_wait": number(0),
        "restart_limit": number(0, integer=True),
        "stable_start_seconds": number(0),
        "heartbeat_interval": number(0),
        "heartbeat_misses": number(1, integer=True),
        "client_envs": names,
        "inherited_envs": names,
        "working_dir": optional(string),
        "port_range": optional(port_range),
        "runtime_dir": optional(string),
        "max_kernels": optional(number(1, integer=True)),
        "max_kernels_per_user": optional(number(1, integer=True)),
        "max_message_size": number(1024 * 1024, integer=True),
        "authorized_users": strings,
        "unauthorized_users": strings,
        "cull_idle_timeout": number(0),
        "cull_busy_timeout": number(0),
        "cull_connected": boolean,
        "cull_interval": number(0.1),
        "pools": _pools,
        "pool_fill_at_once": number(1, integer=True),
        "ipython_history": choice("kernel", "account"),
    },
}


def _section(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        problems.append(f"{path}: must be a mapping")
        return cls()
    return cls(**check_keys(_SCHEMA[cls], raw, path, problems, "key"))


def _drivers(raw: Any, problems: list[str]) -> dict[str, Any]:
    """Each configured driver's settings, built with the ``settings_type`` its (verified) class declares, so that
    driver settings are checked here with everything else: by ``egd check-config`` and ``egd run`` alike."""
    if raw is None:
        raw = {"local": {}}
    elif not isinstance(raw, dict) or not raw:
        problems.append("drivers: must be a mapping of driver name to its settings, with at least one driver")
        return {"local": {}}
    result: dict[str, Any] = {}
    for name, settings in raw.items():
        if not isinstance(name, str) or not re.match(r"^[a-z][a-z0-9_]*$", name):
            problems.append(f"drivers.{name}: driver names are lower-case identifiers")
        elif settings is not None and not isinstance(settings, dict):
            problems.append(f"drivers.{name}: must be a mapping (or empty)")
        else:
            driver = load_driver_class(name, problems)  # an unknown or broken driver hides no other's problems
            built = None
            if driver is not None:
                built = build(driver.settings_type, settings, f"drivers.{name}", problems)
            if built is not None:
                result[name] = built
    return result


def missing_driver(driver: str, configured: Iterable[str]) -> str:
    """What a kernelspec needs that this gateway lacks, in words (``driver``: its driver's name)."""
    if driver.endswith("ProcessProxy"):
        return (f"Enterprise Gateway's {driver}, for which egd has no driver (egd runs EG's LocalProcessProxy, "
                "DistributedProcessProxy, YarnClusterProcessProxy, KubernetesProcessProxy, DockerProcessProxy and "
                "DockerSwarmProcessProxy kernelspecs)")
    return f"the {driver!r} driver, which is not in drivers (configured: {', '.join(sorted(configured))})"


#: Given the ``kernels`` section: the driver of each kernelspec egd would offer, by kernelspec name.
SpecDrivers = Callable[[KernelsConfig], Mapping[str, str]]


def _kernelspec_problems(kernels: KernelsConfig, configured: list[str], spec_drivers: SpecDrivers) -> list[str]:
    """The kernelspecs the config names (the default, the pools', the allowed ones) must exist, and every
    kernelspec offered must have a configured driver (else it is listed but every start of it fails)."""
    try:
        drivers = spec_drivers(kernels)
    except Exception as exc:  # an unreadable kernelspec directory is a problem to report, not a traceback
        return [f"kernels.kernelspec_dirs: the kernelspecs cannot be read: {exc}"]
    named = {"kernels.default_kernel_name": kernels.default_kernel_name,
             **{f"kernels.pools.{name}": name for name in kernels.pools},
             **{f"kernels.allowed_kernelspecs[{i}]": name for i, name in enumerate(kernels.allowed_kernelspecs)}}
    problems = [f"kernels: kernelspec {name!r} needs {missing_driver(driver, configured)}: "
                + ("" if driver.endswith("ProcessProxy") else "configure it, or ")
                + "leave the kernelspec out with kernels.allowed_kernelspecs"
                for name, driver in sorted(drivers.items()) if driver not in configured and name not in named.values()]
    for path, name in named.items():
        if name not in drivers:
            found = ", ".join(sorted(drivers)) or "none"
            problems.append(f"{path}: no kernelspec {name!r} is offered (found: {found})")
        elif drivers[name] not in configured:
            problems.append(f"{path}: kernelspec {name!r} needs {missing_driver(drivers[name], configured)}")
    return problems


def _apply_env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Put the environment's overrides into ``raw``; the variable of each key overridden, by dotted key."""
    applied = {}
    for variable, dotted in ENV_OVERRIDES.items():
        if variable in environ:
            section, key = dotted.split(".")
            target = raw.setdefault(section, {})
            if isinstance(target, dict):
                raw_value = environ[variable]
                try:
                    target[key] = raw_value if dotted in _RAW_ENV or not raw_value else yaml.safe_load(raw_value)
                except yaml.YAMLError:
                    target[key] = raw_value  # checked as the text it is, and refused with the variable's name
                applied[dotted] = variable
    return applied


def _from_environment(problems: list[str], applied: Mapping[str, str]) -> list[str]:
    """``problems``, those of a key the environment set naming its variable (not the file, which lacks it)."""
    def relabel(problem: str) -> str:
        for dotted, variable in applied.items():
            if problem.startswith((f"{dotted}:", f"{dotted}.", f"{dotted}[")):
                return f"{dotted} (from the environment variable {variable}){problem[len(dotted):]}"
        return problem

    return [relabel(problem) for problem in problems]


def _read_yaml(text: str, source: str) -> dict[Any, Any]:
    """The top-level mapping of the YAML ``text``; :class:`ConfigError` when there is none."""
    try:
        raw = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        for mark in (getattr(exc, "context_mark", None), getattr(exc, "problem_mark", None)):
            if mark is not None:  # PyYAML names text it was given as "<unicode string>": name the file
                mark.name = source
        raise ConfigError([f"not valid YAML: {exc}"], source) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(["the top level must be a mapping"], source)
    return raw


def _cross_section_problems(config: Config) -> list[str]:
    """What no single key's checker sees: keys that only make sense together."""
    problems = []
    if bool(config.server.certfile) != bool(config.server.keyfile):
        problems.append("server.certfile: TLS needs both server.certfile and server.keyfile")
    if config.server.client_ca and not config.server.certfile:
        problems.append("server.client_ca: client certificates need TLS (server.certfile and server.keyfile)")
    if config.state.store == "postgresql" and not (config.state.dsn and config.state.secret_key_file):
        problems.append("state: a postgresql store needs state.dsn and state.secret_key_file (shared by the gateways)")
    if config.kernels.launch_timeout > config.kernels.max_launch_timeout:
        problems.append("kernels.launch_timeout: must not exceed kernels.max_launch_timeout")
    return problems


def parse_config(text: str, source: str = "configuration", environ: Mapping[str, str] | None = None,
                 spec_drivers: SpecDrivers | None = None) -> Config:
    """Parse YAML text into a :class:`Config`, raising :class:`ConfigError` with every problem found.

    With ``spec_drivers`` (which reads the kernelspecs: ``egd check-config``), the kernelspecs the config names
    are checked too."""
    problems: list[str] = []
    raw = _read_yaml(text, source)
    applied = _apply_env_overrides(raw, os.environ if environ is None else environ)
    known = {"server", "auth", "logging", "kernels", "state", "drivers"}
    problems.extend(unknown_key("", key, known, "section") for key in raw if key not in known)
    config = Config(
        server=_section(ServerConfig, raw.get("server"), "server", problems),
        auth=_section(AuthConfig, raw.get("auth"), "auth", problems),
        logging=_section(LoggingConfig, raw.get("logging"), "logging", problems),
        kernels=_section(KernelsConfig, raw.get("kernels"), "kernels", problems),
        state=_section(StateConfig, raw.get("state"), "state", problems),
        drivers=_drivers(raw.get("drivers"), problems),
        source=source,
    )
    problems.extend(_cross_section_problems(config))
    if spec_drivers is not None:  # the drivers named, also those whose settings have problems (reported above)
        named = raw.get("drivers")
        configured = [str(n) for n in named] if isinstance(named, dict) and named else list(config.drivers)
        problems.extend(_kernelspec_problems(config.kernels, configured, spec_drivers))
    if problems:
        labelled = _from_environment(problems, applied)
        if all(a != b for a, b in zip(problems, labelled, strict=True)):
            source = "the environment"  # the file (or the defaults) is not at fault
        raise ConfigError(labelled, source)
    return config


def load_config(path: str | None, environ: Mapping[str, str] | None = None,
                spec_drivers: SpecDrivers | None = None) -> Config:
    """Read and parse the config file at ``path`` (``None``: embedded defaults plus environment overrides)."""
    if path is None:
        return parse_config("", "embedded defaults", environ, spec_drivers)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError([f"cannot read {path}: {exc.strerror}"], path) from None
    return parse_config(text, path, environ, spec_drivers)


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
