"""The kernels' records, kept so that a restarted egd re-attaches to the kernels still running.

One row per kernel: its id, user, kernelspec and driver in the clear (what an operator may query), and in one
encrypted column everything a driver needs to find the kernel again: its connection info (with the kernel's
message key), the driver's handle (pids, hosts, launch secrets) and the request's environment. The key
(Fernet: AES-128-CBC with HMAC-SHA256) lives in a file of its own, mode 0600, made at first start; a store
without it is unreadable.

The embedded store is SQLite through Twisted's ``adbapi`` (one connection in a worker thread, so the reactor
never waits on the disk).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from twisted.enterprise import adbapi
from twisted.logger import Logger

from egd.config import StateConfig

log = Logger()

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


def load_or_create_key(path: str) -> bytes:
    """The store's encryption key from ``path``, created (mode 0600) if the file does not exist yet."""
    try:
        with open(path, "rb") as handle:
            return handle.read().strip()
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
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

    @property
    def shared(self) -> bool:
        """Whether other gateways may use the same store (then kernels change hands)."""
        return self._dialect is _POSTGRES

    def _sql(self, text: str) -> str:
        return text.replace("?", self._dialect.mark)

    async def open(self) -> None:
        """Connect (an SQLite file is created private to egd's user) and create the table."""
        if self.path is not None:
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
            if not os.path.exists(self.path):
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._pool = adbapi.ConnectionPool(self._dialect.module, *self._connect, cp_noisy=False, **self._options)
        await self._pool.runOperation(
            "CREATE TABLE IF NOT EXISTS kernels (kernel_id TEXT PRIMARY KEY, username TEXT NOT NULL, "
            "spec TEXT NOT NULL, driver TEXT NOT NULL, updated REAL NOT NULL, gateway TEXT NOT NULL, "
            f"epoch INTEGER NOT NULL, sealed {self._dialect.blob} NOT NULL)")
        await self._pool.runInteraction(_add_missing_columns)
        log.info("state: kernels are recorded in {where}", where=self.where)

    def close(self) -> None:
        """Close the connections."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    @property
    def ready(self) -> bool:
        """Whether the store is open."""
        return self._pool is not None

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
        await self._require().runOperation(
            self._dialect.upsert.format(cols=cols, marks=marks, sets=sets),
            (record.kernel_id, record.username, record.spec, record.driver, record.updated, record.gateway,
             record.epoch, sealed))

    async def delete(self, kernel_id: str) -> None:
        """Forget a kernel."""
        await self._require().runOperation(self._sql("DELETE FROM kernels WHERE kernel_id = ?"), (kernel_id,))

    async def claim(self, kernel_id: str, gateway: str, epoch: int) -> bool:
        """Take a kernel over if its record is still at ``epoch`` (compare and set: of gateways racing for it,
        exactly one wins); its epoch is then ``epoch + 1``."""
        def update(cursor: Any) -> int:
            cursor.execute(self._sql("UPDATE kernels SET gateway = ?, epoch = epoch + 1 "
                                     "WHERE kernel_id = ? AND epoch = ?"), (gateway, kernel_id, epoch))
            return int(cursor.rowcount)

        return bool(await self._require().runInteraction(update))

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
        with open(state.secret_key_file, "rb") as handle:
            key = handle.read().strip()
        dsn = state.dsn or ""
        shown = dsn.split("@")[-1] if "@" in dsn else dsn
        return StateStore(key, _POSTGRES, (dsn,), {"cp_min": 1, "cp_max": 4, "cp_reconnect": True},
                          f"PostgreSQL {shown}")
    path = state.path or os.path.join(runtime_dir, "egd-state.sqlite")
    key = load_or_create_key(state.secret_key_file or f"{path}.key")
    return StateStore(key, _SQLITE, (path,), {"check_same_thread": False, "cp_min": 1, "cp_max": 1},
                      f"SQLite {path}", path)
