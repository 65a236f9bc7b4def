"""`enrollbench services up|status|down`: OpenLDAP, PostgreSQL and a SoftHSM2 token on loopback
for users who have none, for profiles to point at (`components.*_url`, `ca` keys in a token).

`up` starts them in the state folder (0700; passwords and the PIN in 0600 files there, never
printed), loads the simulated users of a seed into the directory, writes `services.json` and
prints where each one is. `status` says whether each still answers; `down` stops them and
removes their data.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
from pathlib import Path
from typing import Any

from bench.errors import UsageError
from bench.serve.state import PRIVATE_DIR, PRIVATE_FILE

SERVICES = ("ldap", "postgresql", "softhsm")


def default_state() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "enrollbench" / "services"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["up", "status", "down"])
    parser.add_argument("--state", type=Path, help="state folder (default under XDG_STATE_HOME)")
    parser.add_argument("--devices", type=int, default=1000, help="up: simulated users to load")
    parser.add_argument("--seed", type=int, default=1, help="up: the users' seed (profiles: 1)")
    parser.add_argument(
        "--only", default=",".join(SERVICES), help=f"up: a comma-separated subset of {SERVICES}"
    )


def command(args: argparse.Namespace) -> int:
    state = args.state or default_state()
    if args.action == "up":
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = sorted(set(wanted) - set(SERVICES))
        if unknown:
            raise UsageError(
                f"--only: unknown service {unknown[0]!r} (known: {', '.join(SERVICES)})"
            )
        return up(state, wanted, args.devices, args.seed)
    if args.action == "status":
        return status(state)
    return down(state)


def _secret_file(folder: Path, name: str, value: str) -> Path:
    path = folder / name
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(value + "\n")
    return path


def _record(state: Path) -> Path:
    return state / "services.json"


def up(state: Path, wanted: list[str], devices: int, seed: int) -> int:
    if _record(state).exists():
        raise UsageError(f"services already up in {state} (enrollbench services down first)")
    state.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    os.chmod(state, PRIVATE_DIR)
    started: dict[str, Any] = {}
    try:
        if "ldap" in wanted:
            started["ldap"] = _ldap_up(state, devices, seed)
        if "postgresql" in wanted:
            started["postgresql"] = _postgresql_up(state)
        if "softhsm" in wanted:
            started["softhsm"] = _softhsm_up(state)
    except BaseException:
        _stop_all(started)
        raise
    _record(state).write_text(json.dumps(started, indent=1))
    for name, service in started.items():
        print(f"{name:11} {service['url']}  (secret: {service['secret_file']})")
    print(
        "profiles: --set components.ldap_url=\"'URL'\" --set components.ldap_password_env=\"'VAR'\""
        " (and postgresql_url, postgresql_password_env), with VAR holding the secret file's text"
    )
    return 0


def _ldap_up(state: Path, devices: int, seed: int) -> dict[str, Any]:
    from bench.services.slapd import Slapd, SlapdConfig  # noqa: PLC0415 (only when asked)
    from engine.population import simulated_enrollee  # noqa: PLC0415

    folder = state / "slapd"
    folder.mkdir(mode=PRIVATE_DIR, exist_ok=True)
    password = secrets.token_hex(16)
    slapd = Slapd(SlapdConfig(folder, password, durable=True))
    slapd.configure(simulated_enrollee(i, seed) for i in range(devices))
    slapd.start()
    return {
        "url": slapd.url,
        "pid": slapd.pid,
        "port": slapd.port,
        "admin_dn": "cn=admin,dc=example,dc=com",
        "secret_file": str(_secret_file(state, "ldap-admin-password", password)),
    }


def _postgresql_up(state: Path) -> dict[str, Any]:
    from bench.services.postgres import start_postgres  # noqa: PLC0415 (only when asked)

    server = start_postgres()  # in the temporary folder: its unprivileged user must reach it
    user, _, rest = server.dsn.removeprefix("postgresql://").partition("@")
    name, _, password = user.partition(":")
    return {
        "url": f"postgresql://{name}@{rest}",
        "folder": str(server.folder),
        "port": server.port,
        "secret_file": str(_secret_file(state, "postgresql-password", password)),
    }


def _softhsm_up(state: Path) -> dict[str, Any]:
    from bench.services.softhsm import create_token  # noqa: PLC0415 (only when asked)

    folder = state / "softhsm"
    folder.mkdir(mode=PRIVATE_DIR, exist_ok=True)
    pin = secrets.token_hex(8)
    token = create_token(folder, "enrollbench", pin, secrets.token_hex(8))
    return {
        "url": f"pkcs11:token={token.label}",
        "module": token.module,
        "conf": str(token.conf),
        "secret_file": str(_secret_file(state, "softhsm-pin", pin)),
    }


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def status(state: Path) -> int:
    """One line per service: up or down. Exit 0 when all are up, 1 otherwise."""
    if not _record(state).exists():
        print(f"no services up in {state}")
        return 1
    started: dict[str, Any] = json.loads(_record(state).read_text())
    all_up = True
    for name, service in started.items():
        if "port" in service:
            alive = _answers(int(service["port"]))
        else:
            alive = Path(service["conf"]).exists()
        all_up &= alive
        print(f"{name:11} {'up' if alive else 'DOWN'}  {service['url']}")
    return 0 if all_up else 1


def down(state: Path) -> int:
    if not _record(state).exists():
        print(f"no services up in {state}")
        return 0
    started: dict[str, Any] = json.loads(_record(state).read_text())
    _stop_all(started)
    _record(state).unlink()
    for name in ("ldap-admin-password", "postgresql-password", "softhsm-pin"):
        (state / name).unlink(missing_ok=True)
    shutil.rmtree(state / "slapd", ignore_errors=True)
    shutil.rmtree(state / "softhsm", ignore_errors=True)
    print(f"stopped: {', '.join(started) or 'nothing'}")
    return 0


def _stop_all(started: dict[str, Any]) -> None:
    ldap = started.get("ldap")
    if ldap is not None and ldap.get("pid"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(ldap["pid"]), signal.SIGTERM)
    postgresql = started.get("postgresql")
    if postgresql is not None:
        from bench.services.postgres import PostgresServer, _owner  # noqa: PLC0415

        password = Path(postgresql["secret_file"]).read_text().strip()
        server = PostgresServer(
            Path(postgresql["folder"]), int(postgresql["port"]), password, _owner()
        )
        server.running = True
        server.stop()
