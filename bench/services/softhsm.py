"""A SoftHSM2 token in a folder: the embedded HSM for CA keys (issue 9).

`create_token` writes `softhsm2.conf` in the folder (its token directory inside it), points
SOFTHSM2_CONF at it for this process and its children, and initializes a token with
`softhsm2-util --init-token --free`. `import_key` puts a CA key into the token through the
PKCS #11 library itself (no key file on disk, no PIN on a command line).

softhsm2-util reads PINs only from its arguments or a terminal, so `--init-token` carries the
new token's PINs in its argv for the command's lifetime: these tokens are for benchmarks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, KeyType, ObjectClass

from bench.errors import BenchError
from engine import _der
from engine.hsm import Pkcs11Uri, find_token, load_module, reinitialize_module
from engine.keys import PrivateKey

CONF_ENV = "SOFTHSM2_CONF"
# Debian/Ubuntu install the module under the multiarch directory with a compatibility link;
# other distributions use lib64 or /usr/local (a source build).
MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
_CURVE_OIDS = {"secp256r1": "1.2.840.10045.3.1.7", "secp384r1": "1.3.132.0.34"}


class SoftHsmError(BenchError):
    """SoftHSM2 is missing, or a token could not be made or filled."""


@dataclass(frozen=True, slots=True)
class Token:
    """An initialized SoftHSM2 token: its folder, label, module and PINs (never in a repr)."""

    folder: Path
    label: str
    module: str
    pin: str = field(repr=False)
    so_pin: str = field(repr=False)

    @property
    def conf(self) -> Path:
        return self.folder / "softhsm2.conf"

    def uri(self, label: str | None = None, key_id: bytes | None = None) -> str:
        """The RFC 7512 URI of a private key in this token."""
        return str(Pkcs11Uri(token=self.label, object=label, id=key_id))


def find_module() -> str:
    """The SoftHSM2 PKCS #11 module: $SOFTHSM2_MODULE, the usual paths, or dpkg's file list."""
    explicit = os.environ.get("SOFTHSM2_MODULE")
    if explicit:
        if not os.path.isfile(explicit):
            raise SoftHsmError(f"SOFTHSM2_MODULE={explicit!r} does not exist")
        return explicit
    for candidate in MODULE_CANDIDATES:
        if os.path.isfile(candidate):
            return candidate
    raise SoftHsmError(
        "libsofthsm2.so not found (Debian: apt-get install softhsm2; or set SOFTHSM2_MODULE)"
    )


def create_token(folder: Path, label: str, pin: str, so_pin: str) -> Token:
    """Initialize a new token in `folder` and make this process (and its children) use it."""
    tool = shutil.which("softhsm2-util")
    if tool is None:
        raise SoftHsmError("softhsm2-util not found (Debian: apt-get install softhsm2)")
    module = find_module()
    tokens = folder / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = folder / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n",
        encoding="utf-8",
    )
    os.environ[CONF_ENV] = str(conf)
    done = subprocess.run(  # noqa: S603 (a fixed tool; PINs see the module docstring)
        [tool, "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin],
        capture_output=True, text=True, check=False, timeout=60,
        env={**os.environ, CONF_ENV: str(conf)},
    )  # fmt: skip
    if done.returncode != 0:
        raise SoftHsmError(f"softhsm2-util --init-token failed: {done.stderr.strip()[-300:]}")
    # A module initialized earlier in this process read another configuration.
    reinitialize_module(module)
    return Token(folder, label, module, pin, so_pin)


def import_key(token: Token, key: PrivateKey, label: str, key_id: bytes) -> str:
    """Store `key` (private and public objects, same label and ID) in the token; its URI."""
    templates = _key_templates(key, label, key_id)
    library = load_module(token.module)
    found = find_token(library, Pkcs11Uri(token=token.label, object=label))
    session = _rw_session(found, token.pin)
    try:
        for template in templates:
            session.create_object(template)
    except pkcs11.PKCS11Error as exc:
        raise SoftHsmError(f"importing {label!r} into {token.label!r} failed: {exc!r}") from exc
    finally:
        session.close()
    return token.uri(label, key_id)


def _rw_session(token: Any, pin: str) -> Any:
    try:
        return token.open(rw=True, user_pin=pin)
    except pkcs11.UserAlreadyLoggedIn:
        return token.open(rw=True)  # another session of this process logged in already


def _key_templates(key: PrivateKey, label: str, key_id: bytes) -> list[dict[Attribute, Any]]:
    """PKCS #11 object templates for the private key and its public twin (EC needs the point)."""
    common: dict[Attribute, Any] = {
        Attribute.TOKEN: True,
        Attribute.LABEL: label,
        Attribute.ID: key_id,
    }
    private: dict[Attribute, Any] = {
        **common,
        Attribute.CLASS: ObjectClass.PRIVATE_KEY,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True,
    }
    public: dict[Attribute, Any] = {
        **common,
        Attribute.CLASS: ObjectClass.PUBLIC_KEY,
        Attribute.VERIFY: True,
    }
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.private_numbers()
        modulus, exponent = _octets(numbers.public_numbers.n), _octets(numbers.public_numbers.e)
        private |= {
            Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.MODULUS: modulus,
            Attribute.PUBLIC_EXPONENT: exponent,
            Attribute.PRIVATE_EXPONENT: _octets(numbers.d),
            Attribute.PRIME_1: _octets(numbers.p),
            Attribute.PRIME_2: _octets(numbers.q),
            Attribute.EXPONENT_1: _octets(numbers.dmp1),
            Attribute.EXPONENT_2: _octets(numbers.dmq1),
            Attribute.COEFFICIENT: _octets(numbers.iqmp),
        }
        public |= {
            Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.MODULUS: modulus,
            Attribute.PUBLIC_EXPONENT: exponent,
        }
        return [private, public]
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _CURVE_OIDS:
        params = _der.encode_oid(_CURVE_OIDS[key.curve.name])
        size = (key.curve.key_size + 7) // 8
        point = key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        private |= {
            Attribute.KEY_TYPE: KeyType.EC,
            Attribute.EC_PARAMS: params,
            Attribute.VALUE: key.private_numbers().private_value.to_bytes(size, "big"),
        }
        # PKCS #11 2.40 2.3.3: CKA_EC_POINT is the DER OCTET STRING of the X9.62 point.
        public |= {
            Attribute.KEY_TYPE: KeyType.EC,
            Attribute.EC_PARAMS: params,
            Attribute.EC_POINT: _der.encode_tlv(_der.OCTET_STRING, point),
        }
        return [private, public]
    raise SoftHsmError(
        f"only RSA, P-256 and P-384 keys go into the token, not {type(key).__name__}"
    )


def _octets(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")
