"""PostgreSQL on loopback for tests and `enrollbench services`: a temporary cluster, one database.

`initdb` refuses to run as root, so when enrollbench runs as root the cluster belongs to an
unprivileged system user (`postgres` when Debian's package created it, else `nobody`) and every
server binary runs through `runuser`. The server listens on 127.0.0.1 only (no Unix socket), with
scram-sha-256 password authentication; the password is random and only ever in the DSN.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.errors import BenchError

USER = "enrollbench"
DATABASE = "enrollbench"
# pg_ctl -w gives up after this many seconds (a cold start on a loaded 2-core machine takes ~1 s)
START_TIMEOUT = 60
_SYSTEM_USERS = ("postgres", "nobody")


class PostgresError(BenchError):
    """PostgreSQL could not be found, initialised, started, stopped or prepared."""


def bin_dir() -> Path:
    """The folder of the server binaries: $PG_BIN, Debian's newest /usr/lib/postgresql/N/bin,
    or the folder of `initdb` on PATH."""
    configured = os.environ.get("PG_BIN")
    if configured:
        return Path(configured)
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3])
    )
    if debian:
        return debian[-1].parent
    found = shutil.which("initdb")
    if found is None:
        raise PostgresError("PostgreSQL not found: install Debian's postgresql or set PG_BIN")
    return Path(found).parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _runuser() -> str:
    """util-linux's runuser (in /usr/sbin, which a plain PATH lacks)."""
    found = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
    if found is None:
        raise PostgresError("runuser not found (Debian: util-linux) to run PostgreSQL unprivileged")
    return found


def _owner() -> str | None:
    """The unprivileged user the cluster runs as when we are root; None when we are not."""
    if os.geteuid() != 0:
        return None
    for name in _SYSTEM_USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise PostgresError("running as root and no unprivileged user (postgres, nobody) exists")


class PostgresServer:
    """A running cluster: `dsn` names its database; `halt`/`resume` stop and start the same
    server (fault tests); `stop` stops it and removes its folder."""

    def __init__(self, folder: Path, port: int, password: str, owner: str | None) -> None:
        self.folder = folder
        self.port = port
        self._password = password
        self._owner = owner
        self._bin = bin_dir()
        self.running = False

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def dsn(self) -> str:
        return f"postgresql://{USER}:{self._password}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, what: str, tool: str, args: Sequence[str], timeout: float) -> None:
        command = [str(self._bin / tool), *args]
        if self._owner is not None:
            command = [_runuser(), "-u", self._owner, "--", *command]
        env = {**os.environ, "PGPASSWORD": self._password, "LC_ALL": "C"}
        try:
            done = subprocess.run(  # noqa: S603 (our own binaries, arguments we built)
                command, check=False, capture_output=True, text=True, timeout=timeout, env=env
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresError(f"PostgreSQL {what} failed: {exc}") from exc
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise PostgresError(f"PostgreSQL {what} failed ({tool}): {' | '.join(detail)}")

    def initialise(self) -> None:
        """initdb with a password-protected superuser and loopback-only password login."""
        pwfile = self.folder / "pwfile"
        pwfile.write_text(self._password + "\n")
        self._chown(pwfile)
        try:
            self._run(
                "initdb",
                "initdb",
                [
                    *("-D", str(self.data), "-U", USER, f"--pwfile={pwfile}", "-E", "UTF8"),
                    *("--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "--no-sync"),
                ],
                120,
            )
        finally:
            pwfile.unlink()

    def resume(self) -> None:
        """pg_ctl start on 127.0.0.1:port, waiting until it accepts connections."""
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories='' "
            "-c fsync=off -c max_connections=200"
        )
        log = self.folder / "postgres.log"
        self._run(
            f"start on 127.0.0.1:{self.port}",
            "pg_ctl",
            [
                *("start", "-w", "-t", str(START_TIMEOUT), "-D", str(self.data)),
                *("-l", str(log), "-o", options),
            ],
            START_TIMEOUT + 10,
        )
        self.running = True

    def halt(self) -> None:
        """pg_ctl stop -m fast: open connections are cut, the data stays."""
        if self.running:
            self.running = False
            self._run("stop", "pg_ctl", ["stop", "-w", "-m", "fast", "-D", str(self.data)], 60)

    def stop(self) -> None:
        """Stop the server and remove its folder."""
        try:
            self.halt()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def create_database(self) -> None:
        self._run(
            "createdb",
            "createdb",
            ["-h", "127.0.0.1", "-p", str(self.port), "-U", USER, DATABASE],
            60,
        )

    def _chown(self, path: Path) -> None:
        if self._owner is not None:
            shutil.chown(path, self._owner, self._owner)


def start_postgres(parent: Path | None = None) -> PostgresServer:
    """A fresh cluster in a new folder under `parent` (the system's temporary folder by
    default; the cluster's user must be able to reach it), started, with its database."""
    owner = _owner()
    folder = Path(tempfile.mkdtemp(prefix="enrollbench-pg-", dir=parent))
    server = PostgresServer(folder, free_port(), secrets.token_hex(16), owner)
    try:
        server._chown(folder)
        server.initialise()
        server.resume()
        server.create_database()
    except BaseException:
        server.stop()
        raise
    return server
