"""OpenLDAP `slapd` on loopback, started without systemd, for tests and benchmarks.

A `slapd.conf` in a folder of the caller's (MDB database for dc=example,dc=com; core, cosine and
inetorgperson schemas plus one attribute, `userPrincipalName`), users loaded with `slapadd`
before the server starts (thousands per second, against ~1 ms per LDAP add), then
`slapd -d 0 -h ldap://127.0.0.1:PORT/` as our child process, stopped by pid (SIGTERM, wait).

Entries (what `engine.ldap_directory` reads): `uid=<user ID>,ou=people,dc=example,dc=com`,
objectClass inetOrgPerson + enrollbenchUser, `mail`, `userPrincipalName`, `seeAlso` = the DN the
user's certificates carry (RFC 4514 text; DN syntax, so slapd checks it), `userPassword` hashed
`{SSHA}` (slapd's core) or `{PBKDF2-SHA256}` (Debian `slapd-contrib`'s pw-pbkdf2 module).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import BenchError
from bench.services.postgres import free_port
from engine.population import Enrollee

SUFFIX = "dc=example,dc=com"
PEOPLE = f"ou=people,{SUFFIX}"
ADMIN_DN = f"cn=admin,{SUFFIX}"
SCHEMAS = Path("/etc/ldap/schema")
MODULES = Path("/usr/lib/ldap")
PBKDF2_ITERATIONS = 10_000  # pw-pbkdf2's own default

# userPrincipalName keeps Active Directory's OID (1.2.840.113556.1.4.656); the auxiliary class
# sits under OpenLDAP's experimental arc, as private test schemas do.
_SCHEMA = """attributetype ( 1.2.840.113556.1.4.656 NAME 'userPrincipalName'
  EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
objectclass ( 1.3.6.1.4.1.4203.666.11.1953.1 NAME 'enrollbenchUser' AUXILIARY
  MAY ( userPrincipalName ) )
"""


class SlapdError(BenchError):
    """slapd could not be configured, loaded, started or stopped."""


@dataclass(frozen=True, slots=True)
class SlapdConfig:
    """How to run one slapd: where, on which port, how passwords are hashed."""

    folder: Path
    admin_password: str = field(repr=False)
    port: int = 0  # 0: a free port
    password_scheme: str = "{SSHA}"  # noqa: S105 (a scheme name) or "{PBKDF2-SHA256}"
    pbkdf2_iterations: int = PBKDF2_ITERATIONS
    durable: bool = False  # False: dbnosync (no fsync per write; a benchmark's scratch data)


def hash_password(password: str, scheme: str, salt: bytes, iterations: int) -> str:
    """userPassword value in slapd's format: {SSHA} = b64(sha1(pw + salt) + salt); {PBKDF2-SHA256}
    = iterations$salt$key in pw-pbkdf2's adapted base64 ('.' for '+', no padding)."""
    if scheme == "{SSHA}":
        digest = hashlib.sha1(password.encode() + salt).digest()  # noqa: S324 (slapd's {SSHA})
        return "{SSHA}" + base64.b64encode(digest + salt).decode()
    if scheme == "{PBKDF2-SHA256}":
        key = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
        return f"{scheme}{iterations}${_ab64(salt)}${_ab64(key)}"
    raise SlapdError(f"unsupported password scheme {scheme!r}")


def _ab64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=").replace("+", ".")


def _ldif_value(name: str, value: str | bytes) -> str:
    """One LDIF line (RFC 2849): base64 when the value is bytes or not a safe string."""
    if isinstance(value, str) and _safe_string(value):
        return f"{name}: {value}\n"
    raw = value if isinstance(value, bytes) else value.encode()
    return f"{name}:: {base64.b64encode(raw).decode()}\n"


def _safe_string(value: str) -> bool:
    """RFC 2849 SAFE-STRING: printable ASCII, not starting with space, ':' or '<'."""
    return (
        value.isascii()
        and value.isprintable()
        and value[:1] not in (" ", ":", "<")
        and not value.endswith(" ")
    )


def user_ldif(enrollee: Enrollee, config: SlapdConfig) -> str:
    """The LDIF entry of one simulated user (the salt is derived from the user ID: repeatable)."""
    user = enrollee.user
    salt = hashlib.sha256(f"salt/{user.user_id}".encode()).digest()[:16]
    password = hash_password(
        enrollee.password, config.password_scheme, salt, config.pbkdf2_iterations
    )
    return "".join(
        [
            _ldif_value("dn", f"uid={user.user_id},{PEOPLE}"),
            "objectClass: inetOrgPerson\nobjectClass: enrollbenchUser\n",
            _ldif_value("uid", user.user_id),
            _ldif_value("cn", user.user_id),
            _ldif_value("sn", user.user_id),
            _ldif_value("mail", user.email),
            _ldif_value("userPrincipalName", user.upn),
            _ldif_value("seeAlso", user.dn.text),
            _ldif_value("userPassword", password),
            "\n",
        ]
    )


_BASE_LDIF = f"""dn: {SUFFIX}
objectClass: dcObject
objectClass: organization
dc: example
o: Example Corp

dn: {PEOPLE}
objectClass: organizationalUnit
ou: people

"""


class Slapd:
    """One slapd process of ours: configure and load once, then start/stop/restart by pid."""

    def __init__(self, config: SlapdConfig) -> None:
        self.config = config
        self.folder = config.folder
        self.port = config.port or free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self.pbkdf2 = (MODULES / "pw-pbkdf2.so").exists()
        if config.password_scheme == "{PBKDF2-SHA256}" and not self.pbkdf2:  # noqa: S105
            raise SlapdError("{PBKDF2-SHA256} needs Debian's slapd-contrib (pw-pbkdf2.so)")

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}/"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def configure(self, users: Iterable[Enrollee] = ()) -> None:
        """Write slapd.conf and load the base entries and `users` with slapadd (offline)."""
        for tool in ("slapd", "slapadd"):
            if _tool(tool) is None:
                raise SlapdError(f"{tool} not found (Debian packages slapd, ldap-utils)")
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        (self.folder / "enrollbench.schema").write_text(_SCHEMA)
        self.conf.write_text(self._conf_text())
        self.conf.chmod(0o600)  # it holds the admin's password hash
        ldif = self.folder / "users.ldif"
        with ldif.open("w") as out:
            out.write(_BASE_LDIF)
            for enrollee in users:
                out.write(user_ldif(enrollee, self.config))
        self._run([_require("slapadd"), "-q", "-f", str(self.conf), "-l", str(ldif)])
        ldif.unlink()

    @property
    def conf(self) -> Path:
        return self.folder / "slapd.conf"

    def _conf_text(self) -> str:
        admin_salt = os.urandom(8)
        rootpw = hash_password(self.config.admin_password, "{SSHA}", admin_salt, 0)
        modules = "moduleload back_mdb\n" + ("moduleload pw-pbkdf2\n" if self.pbkdf2 else "")
        schemas = "".join(
            f"include {SCHEMAS / name}.schema\n" for name in ("core", "cosine", "inetorgperson")
        )
        return (
            f"{schemas}include {self.folder / 'enrollbench.schema'}\n"
            f"pidfile {self.folder / 'slapd.pid'}\nargsfile {self.folder / 'slapd.args'}\n"
            f"modulepath {MODULES}\n{modules}"
            f"password-hash {self.config.password_scheme}\n"
            # Users bind (auth) and read their own entry; the rootdn bypasses ACLs (admin r/w).
            "access to attrs=userPassword by anonymous auth by self =w by * none\n"
            "access to * by self read by * none\n"
            f'database mdb\nmaxsize 1073741824\nsuffix "{SUFFIX}"\n'
            f'rootdn "{ADMIN_DN}"\nrootpw {rootpw}\n'
            f"directory {self.folder / 'data'}\n"
            "index objectClass eq\nindex uid eq\nindex seeAlso eq\n"
            + ("" if self.config.durable else "dbnosync\n")
        )

    def start(self, timeout: float = 10.0) -> None:
        """Start slapd in the foreground (-d 0) as our child and wait until it accepts."""
        if self._process is not None and self._process.poll() is None:
            return
        log = (self.folder / "slapd.log").open("ab")
        command = [_require("slapd"), "-d", "0", "-h", self.url, "-f", str(self.conf)]
        self._process = subprocess.Popen(command, stdout=log, stderr=log)  # noqa: S603 (our slapd)
        log.close()
        deadline = time.monotonic() + timeout
        while not _accepts(self.port):
            if self._process.poll() is not None:
                raise SlapdError(f"slapd exited with {self._process.returncode}: {self._log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise SlapdError(f"slapd did not accept on {self.url} in {timeout} s")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM our slapd and wait; SIGKILL if it does not exit in time."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def cpu_seconds(self) -> float:
        """User + system CPU slapd has used (/proc/<pid>/stat fields 14 and 15)."""
        if self.pid is None:
            raise SlapdError("slapd is not running")
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _run(self, command: list[str]) -> None:
        done = subprocess.run(command, capture_output=True, check=False)  # noqa: S603 (slapadd)
        if done.returncode:
            raise SlapdError(f"{Path(command[0]).name} failed: {done.stderr.decode()[-2000:]}")

    def _log(self) -> str:
        path = self.folder / "slapd.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""


def _tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name,) if p.exists()), None
    )


def _require(name: str) -> str:
    path = _tool(name)
    if path is None:
        raise SlapdError(f"{name} not found")
    return path


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
