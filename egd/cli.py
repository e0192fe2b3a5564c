"""The ``egd`` command: run the gateway, check a config file, list kernelspecs, make a user token."""

from __future__ import annotations

import argparse
import gc
import json
import secrets
import signal
import sys
from dataclasses import replace
from typing import Any, cast

from egd import __version__
from egd.auth import token_digest
from egd.config import ENV_OVERRIDES, Config, ConfigError, KernelsConfig, load_config, missing_driver, with_overrides
from egd.logs import LOG_LEVELS

#: Descriptors to keep for kernels, the state store and logs beside the connections (server.max_connections).
_FILES_BESIDE_CONNECTIONS = 1024
_COMMANDS = ("run", "check-config", "kernelspecs", "token", "state-key", "migrate-eg")

_EPILOG = """\
With no command, egd runs the gateway. With no config file, it serves local kernels of every kernelspec
jupyter_client finds on 127.0.0.1:8888. Point Jupyter Server at it with
    jupyter server --gateway-url=http://127.0.0.1:8888

Environment overrides: {env}
""".format(env=", ".join(f"{k} ({v})" for k, v in ENV_OVERRIDES.items()))


def _add_run_flags(group: Any) -> None:
    """The flags of ``egd run``, on its own parser and, for ``egd --help``, on the top-level one."""
    group.add_argument("--config", metavar="FILE", help="YAML config file (default: embedded defaults)")
    group.add_argument("--ip", help="address to listen on (default 127.0.0.1)")
    group.add_argument("--port", type=int, help="port to listen on (default 8888; 0 picks a free one)")
    group.add_argument("--base-url", help="URL path egd is served under (default /)")
    group.add_argument("--log-level", choices=LOG_LEVELS, help="log level (default info)")


_RUN_DESCRIPTION = ("Run the gateway in the foreground until SIGTERM or Ctrl-C, which shut its kernels down "
                    "(unless state.on_stop is keep).")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egd", description="egd: a kernel gateway that runs Jupyter kernels where your cluster says.",
        usage="egd [run] [--config FILE] [--ip IP] [--port PORT] [--base-url URL] [--log-level LEVEL]\n"
              "       egd COMMAND [ARGS] (egd COMMAND --help for its own)",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"egd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", prog="egd")
    # Shown by `egd --help`; parsed by `run`, which main() puts in front of them when no command is given.
    _add_run_flags(parser.add_argument_group("options of run, the default command (egd --port 9000 is "
                                             "egd run --port 9000)"))
    run = commands.add_parser("run", help="run the gateway (the default command)", description=_RUN_DESCRIPTION)
    _add_run_flags(run)
    check = commands.add_parser("check-config", help="FILE: validate a config file and exit",
                                description="Report every problem in a config file; exit 0 if there is none.")
    check.add_argument("file", metavar="FILE")
    specs = commands.add_parser("kernelspecs", help="[--config FILE] [--json]: list the kernelspecs egd would "
                                                    "offer, and their drivers")
    specs.add_argument("--config", metavar="FILE", help="YAML config file")
    specs.add_argument("--json", action="store_true", help="print JSON")
    token = commands.add_parser("token", help="USER: make a new per-user token and the line for auth.users",
                                description="Print a new random token (give it to the user) and its SHA-256 "
                                            "as the auth.users entry to put in the config (egd stores only "
                                            "the hash).")
    token.add_argument("user", metavar="USER", help="the user the token belongs to")
    commands.add_parser("state-key", help="print a new key for state.secret_key_file",
                        description="Print a new key that encrypts secrets in the state store; gateways sharing "
                                    "a PostgreSQL store need the same one (write it to a file, mode 0600).")
    from egd import migrate_eg

    migrate_eg.add_parser(commands)
    return parser


def _token(user: str) -> int:
    value = secrets.token_urlsafe(32)
    print(f"token for {user} (give it to them; egd keeps only its hash):\n  {value}\n"
          f"config (auth.users):\n  {user}: {{token_sha256: {token_digest(value)}}}")
    return 0


def _fail(message: str) -> int:
    print(f"egd: {message}", file=sys.stderr)
    return 2


def _read_specs(kernels: KernelsConfig) -> dict[str, Any]:
    """Every kernelspec egd would offer with ``kernels``, read on this thread (the CLI has no reactor)."""
    from twisted.internet.interfaces import IReactorFromThreads
    from twisted.python.threadpool import ThreadPool

    from egd.kernels.specs import KernelSpecStore

    no_reactor = cast(IReactorFromThreads, None)  # read_all_blocking never goes through the reactor
    return KernelSpecStore(kernels, no_reactor, ThreadPool()).read_all_blocking()


def _spec_drivers(kernels: KernelsConfig) -> dict[str, str]:
    return {name: spec.driver for name, spec in _read_specs(kernels).items()}


def _check_config(path: str) -> int:
    problems: list[str] = []
    try:  # every problem of the file, driver settings and the kernelspecs it names included
        config = load_config(path, spec_drivers=_spec_drivers)
    except ConfigError as exc:
        try:  # valid but for its kernelspecs: the drivers' own checks below are still worth reporting
            config = load_config(path)
        except ConfigError:
            print(str(exc), file=sys.stderr)
            return 1
        problems.extend(exc.problems)
    from egd.driverapi import IDriverReactor
    from egd.kernels.specs import eg_spec_problems
    from egd.registry import DriverRegistry
    from egd.tenancy import tenancy_problems

    try:  # building the drivers checks what only this host can tell; nothing listens or starts
        # No reactor: a driver's constructor only keeps it and starts nothing (the contract, egd.driverapi).
        registry = DriverRegistry(config, cast(IDriverReactor, None), config.kernels.runtime_dir or "/nonexistent")
    except ValueError as exc:
        problems.append(str(exc))
    else:
        problems.extend(tenancy_problems(config, registry.names))
        for spec in _read_specs(config.kernels).values():
            problems.extend(eg_spec_problems(spec, config.drivers))
    if problems:
        print(str(ConfigError(problems, path)), file=sys.stderr)
        return 1
    print(f"{path}: OK (drivers: {', '.join(config.drivers)}; listening on {config.server.ip}:{config.server.port})")
    return 0


def _kernelspecs(args: argparse.Namespace) -> int:
    from egd.kernels.specs import eg_spec_problems

    config = load_config(args.config)
    specs = _read_specs(config.kernels)
    if args.json:
        print(json.dumps({name: {"display_name": s.display_name, "driver": s.driver, "language": s.language,
                                 "resource_dir": s.resource_dir} for name, s in specs.items()}, indent=2))
        return 0
    if not specs:
        print("no kernelspecs found (install ipykernel, or add kernels.kernelspec_dirs)")
        return 1
    width = max(len(n) for n in specs)
    for name, spec in specs.items():
        problems = eg_spec_problems(spec, config.drivers)
        missing = ("" if spec.driver in config.drivers
                   else f"  (cannot start: needs {missing_driver(spec.driver, config.drivers)})")
        if problems and not missing:
            missing = f"  (cannot start: {'; '.join(problems)})"
        default = " *" if name == config.kernels.default_kernel_name else ""
        print(f"{name:<{width}}  {spec.driver:<6}  {spec.display_name}{default}{missing}")
    return 0


def _raise_file_limit(config: Config, log: Any) -> None:
    """Each kernel holds a dozen descriptors (ZeroMQ sockets, pipes) and each connection one: lift the soft
    limit to the hard one (logged), and warn when even that leaves little room beside the connection cap."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("raised the open file limit from {soft} to {hard} (the hard limit)", soft=soft,
                     hard="unlimited" if hard == resource.RLIM_INFINITY else hard)
            soft = hard
        except (ValueError, OSError) as exc:
            log.warn("could not raise the open file limit from {soft} to {hard}: {why}", soft=soft, hard=hard,
                     why=str(exc))
    needed = config.server.max_connections + _FILES_BESIDE_CONNECTIONS
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warn("the open file limit ({limit}) is below server.max_connections ({cap}) plus {more} for kernels "
                 "and the rest: when it is reached, new connections fail; lower server.max_connections or raise "
                 "the limit (LimitNOFILE= in systemd)", limit=soft, cap=config.server.max_connections,
                 more=_FILES_BESIDE_CONNECTIONS)


def _run_config(args: argparse.Namespace) -> Config:
    """The configuration of ``egd run``: the file (or the defaults), the environment, then the command-line flags.
    Read at start and again on SIGHUP, so that a reload sees the flags as the start did."""
    config = with_overrides(load_config(args.config), ip=args.ip, port=args.port, base_url=args.base_url)
    if args.log_level:
        config = replace(config, logging=replace(config.logging, level=args.log_level))
    return config


def _handle_stop_signals() -> None:
    """Make SIGINT stop egd as SIGTERM does (state.on_stop decides for its kernels), however egd was started.

    A shell's background job (``egd run &`` in a script) inherits SIGINT ignored, and Twisted installs its
    handler only over Python's own: kill -INT (Ctrl-C) would do nothing, or with SIG_DFL end egd without
    stopping its kernels. Twisted installs its SIGTERM handler whatever was inherited."""
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def freeze_startup_heap() -> None:
    """Leave what the started gateway holds for good (modules, configuration, drivers, routes: some 77 000
    objects) out of every later garbage collection. A full collection otherwise walks all of it, and while it
    does (about 50 ms on a small machine) no kernel's messages are relayed."""
    gc.collect()
    gc.freeze()


def _run(args: argparse.Namespace) -> int:
    from egd import systemd

    # Socket activation first: importing twisted.internet.endpoints (egd.server does) consumes LISTEN_PID and
    # LISTEN_FDS from the environment for Twisted's own parser.
    passed = systemd.listen_fds()
    from twisted.internet import reactor as global_reactor
    from twisted.logger import Logger

    from egd.logs import set_level, start_logging
    from egd.registry import check_driver_names
    from egd.server import Gateway, IGatewayReactor

    # The installed reactor provides all of Twisted's reactor interfaces, but is typed as a module: it is seen as
    # what the gateway needs of it (and below as what the supervisor needs).
    reactor = cast(IGatewayReactor, global_reactor)
    config = _run_config(args)
    start_logging(config.logging.level, config.logging.format)
    log = Logger(namespace="egd")
    _raise_file_limit(config, log)
    if len(passed) > 1:
        log.warn("systemd passed {count} sockets ({names}); egd serves on the first only", count=len(passed),
                 names=", ".join(f"fd {fd} {name}" for fd, name in passed))
    try:
        gateway = Gateway(config, reactor, passed[0][0] if passed else None)  # serve on systemd's socket
    except ValueError as exc:
        return _fail(str(exc))
    outcome: dict[str, Any] = {"code": 0}
    supervisor = systemd.Supervisor(gateway, cast(systemd.ISupervisorReactor, global_reactor),
                                    lambda: _run_config(args), set_level, check=check_driver_names)
    supervisor.install_sighup()

    def started(_: Any) -> None:
        freeze_startup_heap()
        log.info("egd {version} ready ({source}; drivers: {drivers})", version=__version__,
                 source=config.source, drivers=", ".join(config.drivers))
        host, port = gateway.http.address
        url = systemd.describe_listener("https" if config.server.certfile else "http", host, port,
                                        config.server.base_url)
        supervisor.started(f"egd {__version__} listening on {url} (drivers: {', '.join(config.drivers)})")

    def failed(failure: Any) -> None:
        log.critical("egd could not start: {why}", why=failure.getErrorMessage())
        outcome["code"] = 1
        reactor.stop()

    def start() -> None:
        supervisor.start_watchdog()
        gateway.startService().addCallbacks(started, failed)

    def stop() -> Any:
        supervisor.stopping()  # first, so that systemd knows the stop is under way while kernels are stopped
        return gateway.stopService()

    _handle_stop_signals()
    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.addSystemEventTrigger("after", "shutdown", supervisor.stop)
    reactor.run()
    log.info("egd stopped")
    return int(outcome["code"])


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``egd`` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (args_list[0] not in _COMMANDS and args_list[0] not in ("-h", "--help", "--version")):
        args_list.insert(0, "run")
    args = _parser().parse_args(args_list)
    try:
        if args.command == "check-config":
            return _check_config(args.file)
        if args.command == "kernelspecs":
            return _kernelspecs(args)
        if args.command == "migrate-eg":
            from egd import migrate_eg

            return migrate_eg.run(args)
        if args.command == "token":
            return _token(args.user)
        if args.command == "state-key":
            from cryptography.fernet import Fernet

            print(Fernet.generate_key().decode())
            return 0
        return _run(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
