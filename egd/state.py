"""The kernels' records, kept so that a restarted egd re-attaches to the kernels still running.

One row per kernel: its id, user, kernelspec and driver in the clear (what an operator may query), and in one
encrypted column everything a driver needs to find the kernel again: its connection info (with the kernel's
message key), the driver's handle (pids, hosts, launch secrets) and the request's environment. The key
(Fernet: AES-128-CBC with HMAC-SHA256) lives in a file of its own, mode 0600, made at first start; a store
without it is unreadable.

The embedded store is SQLite through Twisted's ``adbapi`` (one connection in a worker thread, so the reactor
never waits on the disk). An SQLite store belongs to one gateway: it is locked (``flock`` on ``<store>.lock``,
held for the life of the process, so a lock of a gateway that died vanishes with it) and a second gateway on
the same store refuses to start, naming the holder. Gateways that share kernels share a PostgreSQL store.

The store, its key, its lock and the SQLite journals are readable by egd's OS user only (0600; looser files are
made so, with a warning), in a directory nobody else may list or write (egd makes it 0700; an existing one that
is open to others is warned about): kernels that run as other users (impersonation) cannot read kernel keys.
A store that cannot be written is refused at start (a probe row is written and deleted); at run time a failed
write is logged once per episode and turns the readiness check ``store`` to not ready until a write succeeds.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
import uuid
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from twisted.enterprise import adbapi
from twisted.logger import Logger

from egd.config import StateConfig
from egd.util import Episode, describe

log = Logger()
#: Files beside an SQLite store that hold its data too (SQLite gives them the store's mode, but an older egd or
#: an operator may have loosened them).
_SQLITE_COMPANIONS = ("-journal", "-wal", "-shm", ".lock")


class StoreUnusable(Exception):
    """The state store cannot be used by this gateway (locked by another one, not writable): egd does not
    start. The text says why and what to do."""


def _make_private(path: str, directory: bool = False) -> None:
    """Check that a file of the store is egd's alone (0600 at most) and a directory of it lets nobody else list or
    change it (others may pass through, as impersonated kernels must through the runtime directory).

    A file of egd's user that is open to others (made by an older version or by hand) is made 0600, with a
    warning. A directory is only warned about: it may hold more than the store (a home directory), and changing
    its mode could break what else uses it. So is a file egd cannot change (another owner)."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return
    mode = stat.S_IMODE(status.st_mode)
    loose = mode & (0o066 if directory else 0o077)
    if not loose:
        return
    wanted = mode & ~(0o066 if directory else 0o077)
    if not directory and status.st_uid == os.geteuid():
        try:
            os.chmod(path, wanted)
        except OSError as exc:
            log.warn("state: {path} is open to other users (mode {mode:o}) and egd could not change that ({why}): "
                     "they may read kernel keys", path=path, mode=mode, why=exc.strerror)
            return
        log.warn("state: {path} was open to other users (mode {mode:o}); it is {wanted:o} now", path=path,
                 mode=mode, wanted=wanted)
        return
    log.warn("state: {path} is open to other users (mode {mode:o}, owner uid {uid}): they may read or replace "
             "kernel keys (chmod {wanted:o} closes it)", path=path, mode=mode, uid=status.st_uid, wanted=wanted)


class _StoreLock:
    """The lock that makes an SQLite store one gateway's: ``flock`` on a file beside it, held as long as this
    process lives (the kernel releases it when the process ends, however it ends), naming its holder."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, store: str) -> None:
        """Take the lock, or :class:`StoreUnusable` naming the gateway that has it."""
        try:
            # O_CLOEXEC: a kernel started by this gateway must not hold the lock after the gateway has gone;
            # O_NOFOLLOW: a link planted in a directory open to others must not make egd truncate its target.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise StoreUnusable(f"the state store {store} cannot be written: its lock file {self.path} cannot be "
                                f"created ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._holder(fd)
            os.close(fd)
            raise StoreUnusable(
                f"the state store {store} is in use by another egd ({holder}). An SQLite store belongs to one "
                "gateway: give this one its own kernels.runtime_dir or state.path, or let the gateways share a "
                "PostgreSQL store (state.store: postgresql)") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode() + b"\n", 0)
        self._fd = fd

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            holder = json.loads(os.pread(fd, 4096, 0))
            return (f"pid {int(holder['pid'])} on host {str(holder['host'])[:100]}, "
                    f"started {str(holder['started'])[:40]}")
        except (OSError, ValueError, KeyError, TypeError):
            return "its pid is not recorded yet"

    def release(self) -> None:
        """Let go (at the end of the process: closing the file releases the lock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class _Dialect:
    """What differs between the databases: the DB-API module, placeholders, upsert and blob type."""

    module: str
    mark: str
    blob: str
    upsert: str


_SQLITE = _Dialect("sqlite3", "?", "BLOB", "INSERT OR REPLACE INTO kernels ({cols}) VALUES ({marks})")
_POSTGRES = _Dialect("psycopg2", "%s", "BYTEA",
                     "INSERT INTO kernels ({cols}) VALUES ({marks}) ON CONFLICT (kernel_id) DO UPDATE SET {sets}")
_COLUMNS = ("kernel_id", "username", "spec", "driver", "updated", "gateway", "epoch", "sealed")


@dataclass
class KernelRecord:
    """What egd remembers of one kernel."""

    kernel_id: str
    username: str
    spec: str
    driver: str
    #: Connection info as the driver reported it (transport, ip, ports, key, signature_scheme).
    connection: dict[str, Any]
    #: The driver's own description of the running kernel (see ``LaunchedKernel.persistent_state``).
    handle: dict[str, Any]
    #: The checked request environment (``KernelEnv``'s fields), for restarts after re-attaching.
    env: dict[str, Any] = field(default_factory=dict)
    working_dir: str | None = None
    launch_timeout: float = 60.0
    updated: float = 0.0
    #: The gateway that runs the kernel now (several gateways share one store), and how often it changed hands.
    gateway: str = ""
    epoch: int = 1

    def sealed_part(self) -> dict[str, Any]:
        """The fields stored encrypted."""
        data = asdict(self)
        for clear in ("kernel_id", "username", "spec", "driver", "updated", "gateway", "epoch"):
            data.pop(clear)
        return data


@dataclass(frozen=True)
class Summary:
    """A record's clear columns: enough to list a kernel another gateway runs, and to see who runs it."""

    kernel_id: str
    username: str
    spec: str
    driver: str
    updated: float
    gateway: str
    epoch: int


#: Columns later versions added, with what older rows get.
_ADDED_COLUMNS = {"gateway": "TEXT NOT NULL DEFAULT ''", "epoch": "INTEGER NOT NULL DEFAULT 1"}


def _add_missing_columns(cursor: Any) -> None:
    """Bring a store made by an older egd up to date (its rows stay valid)."""
    cursor.execute("SELECT * FROM kernels WHERE 1 = 0")
    present = {str(column[0]).lower() for column in cursor.description}
    for name, definition in _ADDED_COLUMNS.items():
        if name not in present:
            log.info("state: adding column {name} to the store", name=name)
            cursor.execute(f"ALTER TABLE kernels ADD COLUMN {name} {definition}")


def _load_or_create_key(path: str) -> bytes:
    """The store's encryption key from ``path``, created (mode 0600) if the file does not exist yet."""
    _make_private(path)
    try:
        with open(path, "rb") as handle:
            return handle.read().strip()
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    _make_private(os.path.dirname(path) or ".", directory=True)
    key = Fernet.generate_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key + b"\n")
    return key


class StateStore:
    """The store of kernel records: SQLite (one gateway) or PostgreSQL (several gateways share it)."""

    def __init__(self, key: bytes, dialect: _Dialect, connect: tuple[Any, ...], options: dict[str, Any],
                 where: str, path: str | None = None) -> None:
        self._fernet = Fernet(key)
        self._dialect = dialect
        self._connect = connect
        self._options = options
        self.where = where
        self.path = path
        self._pool: adbapi.ConnectionPool | None = None
        self._lock = _StoreLock(f"{path}.lock") if path is not None else None
        #: Writes failing now (logged once per episode; the readiness check reports it).
        self.writes = Episode(f"state store {where}: writing", log)

    @property
    def shared(self) -> bool:
        """Whether other gateways may use the same store (then kernels change hands)."""
        return self._dialect is _POSTGRES

    def _sql(self, text: str) -> str:
        return text.replace("?", self._dialect.mark)

    async def open(self) -> None:
        """Lock an SQLite store (created private to egd's user), connect, create the table and check that it can
        be written: :class:`StoreUnusable` when another gateway holds it or a write fails."""
        if self.path is not None:
            self._open_file(self.path)
        self._pool = adbapi.ConnectionPool(self._dialect.module, *self._connect, cp_noisy=False, **self._options)
        try:
            await self._pool.runOperation(
                "CREATE TABLE IF NOT EXISTS kernels (kernel_id TEXT PRIMARY KEY, username TEXT NOT NULL, "
                "spec TEXT NOT NULL, driver TEXT NOT NULL, updated REAL NOT NULL, gateway TEXT NOT NULL, "
                f"epoch INTEGER NOT NULL, sealed {self._dialect.blob} NOT NULL)")
            await self._pool.runInteraction(_add_missing_columns)
            await self._pool.runInteraction(self._write_probe)
        except Exception as exc:
            raise StoreUnusable(f"the state store {self.where} cannot be written ({describe(exc)}): kernels started "
                                "now could not be found again after a restart") from None
        log.info("state: kernels are recorded in {where}", where=self.where)

    def _open_file(self, path: str) -> None:
        """An SQLite store's directory and files: private to egd's user, and locked by this gateway."""
        directory = os.path.dirname(path) or "."
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StoreUnusable(f"the state store's directory {directory} cannot be made ({exc.strerror})") from None
        _make_private(directory, directory=True)
        assert self._lock is not None
        self._lock.acquire(path)
        try:
            if not os.path.exists(path):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError as exc:
            self._lock.release()
            raise StoreUnusable(f"the state store {path} cannot be created ({exc.strerror})") from None
        for name in (path, *(path + suffix for suffix in _SQLITE_COMPANIONS)):
            _make_private(name)

    def _write_probe(self, cursor: Any) -> None:
        """Write a row and take it back in one transaction (nobody else ever sees it): raises if the store
        cannot be written (a read-only file or file system, a full disk, a database user without rights)."""
        probe = f"~write-check-{uuid.uuid4().hex}"  # never a kernel id (those are UUIDs)
        cursor.execute(self._sql(f"INSERT INTO kernels ({', '.join(_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
                       (probe, "", "", "", 0.0, "", 0, b""))
        cursor.execute(self._sql("DELETE FROM kernels WHERE kernel_id = ?"), (probe,))

    async def check_writable(self) -> bool:
        """Whether a write succeeds now (a probe row); the outcome counts like any write (see ``writes``)."""
        try:
            await self._writing(self._require().runInteraction(self._write_probe))
        except Exception:
            return False
        return True

    async def _writing(self, work: Awaitable[Any]) -> Any:
        """Await a write; note its failure (logged once per episode, the store is then not ready) or success."""
        try:
            result = await work
        except Exception as exc:
            self.writes.failed(describe(exc))
            raise
        self.writes.recovered()
        return result

    @property
    def problem(self) -> str | None:
        """Readiness: None while the store is open and writable, otherwise what is wrong."""
        if self._pool is None:
            return "the state store is not open"
        if self.writes.problem is not None:
            return f"the state store cannot be written: {self.writes.problem}"
        return None

    def close(self) -> None:
        """Close the connections."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._lock is not None:
            self._lock.release()

    def _require(self) -> adbapi.ConnectionPool:
        if self._pool is None:
            raise RuntimeError("the state store is not open")
        return self._pool

    async def save(self, record: KernelRecord) -> None:
        """Insert or replace a kernel's record."""
        sealed = self._fernet.encrypt(json.dumps(record.sealed_part()).encode())
        cols = ", ".join(_COLUMNS)
        marks = ", ".join([self._dialect.mark] * len(_COLUMNS))
        sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in _COLUMNS[1:])
        await self._writing(self._require().runOperation(
            self._dialect.upsert.format(cols=cols, marks=marks, sets=sets),
            (record.kernel_id, record.username, record.spec, record.driver, record.updated, record.gateway,
             record.epoch, sealed)))

    async def delete(self, kernel_id: str) -> None:
        """Forget a kernel."""
        await self._writing(self._require().runOperation(self._sql("DELETE FROM kernels WHERE kernel_id = ?"),
                                                         (kernel_id,)))

    async def claim(self, kernel_id: str, gateway: str, epoch: int) -> bool:
        """Take a kernel over if its record is still at ``epoch`` (compare and set: of gateways racing for it,
        exactly one wins); its epoch is then ``epoch + 1``."""
        def update(cursor: Any) -> int:
            cursor.execute(self._sql("UPDATE kernels SET gateway = ?, epoch = epoch + 1 "
                                     "WHERE kernel_id = ? AND epoch = ?"), (gateway, kernel_id, epoch))
            return int(cursor.rowcount)

        return bool(await self._writing(self._require().runInteraction(update)))

    async def summaries(self) -> dict[str, Summary]:
        """Every kernel's clear columns (cheap: nothing is decrypted)."""
        rows = await self._require().runQuery(
            "SELECT kernel_id, username, spec, driver, updated, gateway, epoch FROM kernels")
        return {str(row[0]): Summary(*row) for row in rows}

    async def get(self, kernel_id: str) -> KernelRecord | None:
        """One kernel's record, or None."""
        records = await self._select(self._sql(" WHERE kernel_id = ?"), (kernel_id,))
        return records[0] if records else None

    async def load(self) -> list[KernelRecord]:
        """Every record (a row that cannot be decrypted is logged and skipped)."""
        return await self._select(" ORDER BY updated", ())

    async def _select(self, tail: str, args: tuple[Any, ...]) -> list[KernelRecord]:
        rows = await self._require().runQuery(f"SELECT {', '.join(_COLUMNS)} FROM kernels{tail}", args)
        records = []
        for kernel_id, username, spec, driver, updated, gateway, epoch, sealed in rows:
            try:
                data = json.loads(self._fernet.decrypt(bytes(sealed)))
            except (InvalidToken, ValueError):
                log.error("state: the record of kernel {kernel_id} cannot be decrypted with this key; skipped",
                          kernel_id=kernel_id)
                continue
            records.append(KernelRecord(kernel_id, username, spec, driver, updated=float(updated),
                                        gateway=str(gateway), epoch=int(epoch), **data))
        return records


def store_from_config(state: StateConfig, runtime_dir: str) -> StateStore | None:
    """The configured store (None for ``store: none``); an SQLite store's key file is made on first use,
    PostgreSQL's must be given (every gateway sharing the store needs the same key)."""
    if state.store == "none":
        return None
    if state.store == "postgresql":
        if not state.secret_key_file:
            raise ValueError("state.secret_key_file: several gateways share a PostgreSQL store; give them the "
                             "same key file (`egd state-key > FILE` makes one)")
        _make_private(state.secret_key_file)
        with open(state.secret_key_file, "rb") as handle:
            key = handle.read().strip()
        dsn = state.dsn or ""
        shown = dsn.split("@")[-1] if "@" in dsn else dsn
        return StateStore(key, _POSTGRES, (dsn,), {"cp_min": 1, "cp_max": 4, "cp_reconnect": True},
                          f"PostgreSQL {shown}")
    path = state.path or os.path.join(runtime_dir, "egd-state.sqlite")
    key = _load_or_create_key(state.secret_key_file or f"{path}.key")
    return StateStore(key, _SQLITE, (path,), {"check_same_thread": False, "cp_min": 1, "cp_max": 1},
                      f"SQLite {path}", path)
