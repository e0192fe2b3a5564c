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

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kernels (
    kernel_id TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    spec TEXT NOT NULL,
    driver TEXT NOT NULL,
    updated REAL NOT NULL,
    sealed BLOB NOT NULL
)
"""


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

    def sealed_part(self) -> dict[str, Any]:
        """The fields stored encrypted."""
        data = asdict(self)
        for clear in ("kernel_id", "username", "spec", "driver", "updated"):
            data.pop(clear)
        return data


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
    """The SQLite store of kernel records."""

    def __init__(self, path: str, key: bytes) -> None:
        self.path = path
        self._fernet = Fernet(key)
        self._pool: adbapi.ConnectionPool | None = None

    async def open(self) -> None:
        """Open the database (creating it, private to egd's user) and its table."""
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        if not os.path.exists(self.path):
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._pool = adbapi.ConnectionPool("sqlite3", self.path, check_same_thread=False, cp_min=1, cp_max=1,
                                           cp_noisy=False)
        await self._pool.runOperation(_SCHEMA)

    def close(self) -> None:
        """Close the database."""
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
        await self._require().runOperation(
            "INSERT OR REPLACE INTO kernels (kernel_id, username, spec, driver, updated, sealed) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (record.kernel_id, record.username, record.spec, record.driver, record.updated, sealed))

    async def delete(self, kernel_id: str) -> None:
        """Forget a kernel."""
        await self._require().runOperation("DELETE FROM kernels WHERE kernel_id = ?", (kernel_id,))

    async def load(self) -> list[KernelRecord]:
        """Every record (a row that cannot be decrypted is logged and skipped)."""
        rows = await self._require().runQuery(
            "SELECT kernel_id, username, spec, driver, updated, sealed FROM kernels ORDER BY updated")
        records = []
        for kernel_id, username, spec, driver, updated, sealed in rows:
            try:
                data = json.loads(self._fernet.decrypt(bytes(sealed)))
            except (InvalidToken, ValueError):
                log.error("state: the record of kernel {kernel_id} cannot be decrypted with this key; skipped",
                          kernel_id=kernel_id)
                continue
            records.append(KernelRecord(kernel_id, username, spec, driver, updated=float(updated), **data))
        return records


def store_from_config(state: StateConfig, runtime_dir: str) -> StateStore | None:
    """The configured store (None for ``store: none``); its key file is made on first use."""
    if state.store == "none":
        return None
    path = state.path or os.path.join(runtime_dir, "egd-state.sqlite")
    key = load_or_create_key(state.secret_key_file or f"{path}.key")
    return StateStore(path, key)
