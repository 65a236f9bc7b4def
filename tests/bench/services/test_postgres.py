"""bench.services.postgres: a temporary PostgreSQL cluster on loopback."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from bench.services import postgres
from tests.conftest import require_tool


def _require_postgres() -> Path:
    """The server binaries, or skip locally / fail in CI (as require_tool does)."""
    try:
        folder = postgres.bin_dir()
    except postgres.PostgresError:
        require_tool("initdb")
        raise
    require_tool(str(folder / "initdb"))
    return folder


async def _version(dsn: str) -> str:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        return str(await connection.fetchval("SELECT version()"))
    finally:
        await connection.close()


@pytest.mark.server
def test_start_serves_the_dsn_and_stop_removes_the_folder() -> None:
    """The DSN connects with its password on 127.0.0.1; stop removes the cluster's folder."""
    _require_postgres()
    server = postgres.start_postgres()
    try:
        assert server.dsn.startswith(f"postgresql://{postgres.USER}:")
        assert f"@127.0.0.1:{server.port}/{postgres.DATABASE}" in server.dsn
        assert "PostgreSQL" in asyncio.run(_version(server.dsn))
    finally:
        server.stop()
    assert not server.folder.exists()


@pytest.mark.server
def test_a_wrong_password_is_refused() -> None:
    """Loopback login needs the password (no trust authentication)."""
    _require_postgres()
    server = postgres.start_postgres()
    try:
        wrong = f"postgresql://{postgres.USER}:wrong@127.0.0.1:{server.port}/{postgres.DATABASE}"
        with pytest.raises(asyncpg.InvalidPasswordError):
            asyncio.run(_version(wrong))
    finally:
        server.stop()


@pytest.mark.server
def test_halt_and_resume_keep_the_port() -> None:
    """After halt the port refuses; resume serves the same DSN again."""
    _require_postgres()
    server = postgres.start_postgres()
    try:
        server.halt()
        with pytest.raises(OSError, match=r"onnect"):
            asyncio.run(_version(server.dsn))
        server.resume()
        assert "PostgreSQL" in asyncio.run(_version(server.dsn))
    finally:
        server.stop()


def test_a_missing_installation_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A PG_BIN without initdb fails with an error naming the step that failed."""
    monkeypatch.setenv("PG_BIN", str(tmp_path))
    with pytest.raises(postgres.PostgresError, match="initdb"):
        postgres.start_postgres(tmp_path)
