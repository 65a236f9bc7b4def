"""CA signing keys held in a PKCS #11 token (SoftHSM2 as the embedded HSM; any token by module).

`HsmSigner` has `engine.keys.Signer`'s interface (`algorithm`, `spki`, `sign`, `signed`), so a
`CertificateTemplate` signs through it unchanged. The key is named by an RFC 7512 `pkcs11:` URI;
the PIN comes from the caller (read from an environment variable or a file), never from the URI,
and never appears in a repr, a message or a pickle's description.

Each process has its own PKCS #11 state: one session per (module, slot), opened lazily in the
process that signs. A signer pickles as its parameters (a spawned shard reopens the token itself),
and a forked child drops the parent's handles (`os.register_at_fork`) because PKCS #11 sessions do
not survive a fork. Signing is inline: SoftHSM2 runs inside the process, and DESIGN.md forbids
short crypto on a thread beside the event loop.

Library: python-pkcs11 (Cython) rather than PyKCS11 (SWIG): measured on SoftHSM2 2.6.1, CPU per
signature in interleaved blocks (two runs, 15 and 21 blocks), P-256 ECDSA 87-95 µs against
155-161 µs, RSA-2048 SHA-256 1,000-1,150 µs against 1,170-1,360 µs; it is also typed (py.typed).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import string
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from engine import _der
from engine.errors import FailedError
from engine.keys import KeyFamily, SignatureAlgorithm, signature_algorithm


class HsmError(FailedError):
    """A PKCS #11 token could not be used; the subclass says which part failed."""

    reason = "hsm-error"


class Pkcs11UriError(HsmError):
    """A `pkcs11:` URI that is not RFC 7512 or names something this signer cannot use."""

    reason = "pkcs11-uri-invalid"


class HsmModuleError(HsmError):
    """The PKCS #11 module (shared library) is missing or does not load."""

    reason = "hsm-module-unavailable"


class HsmTokenNotFoundError(HsmError):
    """No token (or more than one) matches the URI's token attributes."""

    reason = "hsm-token-not-found"


class HsmPinError(HsmError):
    """The token refused the user PIN (wrong, locked or of a length it does not accept)."""

    reason = "hsm-wrong-pin"


class HsmKeyNotFoundError(HsmError):
    """No private key (or more than one) matches the URI's object attributes."""

    reason = "hsm-key-not-found"


class HsmSigningError(HsmError):
    """The token failed to sign."""

    reason = "hsm-signing-failed"


# RFC 7512 2.3: pk11-pchar = unreserved / pk11-p-res-avail / pct-encoded (path values),
# pk11-qchar = unreserved / pk11-q-res-avail / pct-encoded (query values).
_UNRESERVED = string.ascii_letters + string.digits + "-._~"
_PATH_CHARS = frozenset(_UNRESERVED + ":[]@!$'()*+,=&")
_TEXT_ATTRIBUTES = ("token", "manufacturer", "serial", "model", "object")
_OBJECT_TYPES = ("public", "private", "cert", "secret-key", "data")


@dataclass(frozen=True, slots=True)
class Pkcs11Uri:
    """The parts of an RFC 7512 URI that select a private key: token attributes and object."""

    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    slot_id: int | None = None
    object: str | None = None
    id: bytes | None = None

    @classmethod
    def parse(cls, uri: str) -> Pkcs11Uri:
        """Parse strictly: known path attributes once each, valid percent-encoding, no query.

        RFC 7512 3.3: an unrecognized attribute must match nothing, so it is an error here
        rather than ignored. A query (pin-value, pin-source, module-path) is refused: the PIN
        and the module come from the caller.
        """
        scheme, colon, path = uri.partition(":")
        if not colon or scheme.lower() != "pkcs11":
            raise Pkcs11UriError("a PKCS #11 URI starts with 'pkcs11:' (RFC 7512)")
        if "?" in path:
            raise Pkcs11UriError(
                "query attributes (pin-value, pin-source, module-path, ...) are not accepted: "
                "the PIN and the module are given separately"
            )
        values = _path_attributes(path)
        kind = values.pop("type", "private")
        if kind not in _OBJECT_TYPES:
            raise Pkcs11UriError(f"type must be one of {', '.join(_OBJECT_TYPES)}")
        if kind != "private":
            raise Pkcs11UriError("the URI must name a private key (type=private)")
        parsed = cls(
            **{name: _text(values, name) for name in _TEXT_ATTRIBUTES},
            slot_id=_slot_id(values.get("slot-id")),
            id=None if "id" not in values else _unquote(values["id"], "id"),
        )
        if parsed.id == b"":
            raise Pkcs11UriError("attribute 'id' is empty")
        if parsed.object is None and parsed.id is None:
            raise Pkcs11UriError("the URI must name the key by object= or id=")
        if parsed.token is None and parsed.serial is None and parsed.slot_id is None:
            raise Pkcs11UriError("the URI must name the token by token=, serial= or slot-id=")
        return parsed

    def __str__(self) -> str:
        """The URI in RFC 7512 form (percent-encoding everything outside unreserved)."""
        parts = [
            f"{name}={quote(value, safe='')}"
            for name in ("token", "manufacturer", "serial", "model")
            if (value := getattr(self, name)) is not None
        ]
        if self.slot_id is not None:
            parts.append(f"slot-id={self.slot_id}")
        if self.object is not None:
            parts.append(f"object={quote(self.object, safe='')}")
        if self.id is not None:
            parts.append("id=" + "".join(f"%{byte:02x}" for byte in self.id))
        return "pkcs11:" + ";".join([*parts, "type=private"])


_KNOWN_ATTRIBUTES = frozenset((*_TEXT_ATTRIBUTES, "slot-id", "id", "type"))


def _path_attributes(path: str) -> dict[str, str]:
    """Split `name=value;...` into raw (still percent-encoded) values, each name once."""
    values: dict[str, str] = {}
    for part in path.split(";") if path else []:
        name, equals, value = part.partition("=")
        if not equals or not name:
            raise Pkcs11UriError(f"path attribute {name or part!r} has no '=value'")
        if name not in _KNOWN_ATTRIBUTES:
            raise Pkcs11UriError(f"unsupported path attribute {name!r}")
        if name in values:
            raise Pkcs11UriError(f"path attribute {name!r} appears twice (RFC 7512 2.3)")
        if not set(value) <= _PATH_CHARS | {"%"}:
            raise Pkcs11UriError(f"attribute {name!r} has characters that must be %-encoded")
        values[name] = value
    return values


def _unquote(value: str, name: str) -> bytes:
    """Percent-decode strictly: every '%' followed by two hex digits."""
    out = bytearray()
    index = 0
    while index < len(value):
        char = value[index]
        if char == "%":
            pair = value[index + 1 : index + 3]
            if len(pair) != 2 or not all(c in string.hexdigits for c in pair):
                raise Pkcs11UriError(f"attribute {name!r} has a malformed %-escape")
            out.append(int(pair, 16))
            index += 3
        else:
            out += char.encode("ascii")
            index += 1
    return bytes(out)


def _text(values: dict[str, str], name: str) -> str | None:
    """A textual attribute: percent-decoded UTF-8, never empty."""
    if name not in values:
        return None
    raw = _unquote(values[name], name)
    if not raw:
        raise Pkcs11UriError(f"attribute {name!r} is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Pkcs11UriError(f"attribute {name!r} is not UTF-8") from None


def _slot_id(value: str | None) -> int | None:
    """RFC 7512 2.3: slot-id = DIGIT+ (a decimal CK_SLOT_ID)."""
    if value is None:
        return None
    if not value.isascii() or not value.isdigit():
        raise Pkcs11UriError("slot-id must be a decimal number")
    return int(value)


@dataclass(frozen=True, slots=True)
class HsmParameters:
    """What a signer needs to (re)open its key in any process; the PIN never in a repr."""

    module: str
    uri: Pkcs11Uri
    pin: str = field(repr=False)
    hash_name: str


_RSA_MECHANISMS = {
    "sha256": Mechanism.SHA256_RSA_PKCS,
    "sha384": Mechanism.SHA384_RSA_PKCS,
    "sha512": Mechanism.SHA512_RSA_PKCS,
}
_CURVES: dict[bytes, ec.EllipticCurve] = {
    _der.encode_oid("1.2.840.10045.3.1.7"): ec.SECP256R1(),
    _der.encode_oid("1.3.132.0.34"): ec.SECP384R1(),
}


class _ProcessState:
    """This process's PKCS #11 sessions; `epoch` changes when they become unusable (fork)."""

    def __init__(self) -> None:
        # (module, slot ID) -> (session, SHA-256 of the PIN it logged in with)
        self.sessions: dict[tuple[str, int], tuple[Any, bytes]] = {}
        self.epoch = object()

    def forget(self) -> None:
        """Drop every handle (after a fork the child must initialize the module anew)."""
        self.sessions = {}
        self.epoch = object()

    def close(self) -> None:
        """Close every session (PKCS #11 logs the process out), then forget them."""
        for session, _ in self.sessions.values():
            with contextlib.suppress(pkcs11.PKCS11Error):
                session.close()
        self.forget()


_STATE = _ProcessState()
_FORKED: set[str] = set()  # modules whose library state was inherited through a fork


def _after_fork_in_child() -> None:
    _FORKED.update(_loaded_modules())
    _STATE.forget()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _loaded_modules() -> list[str]:
    loaded: dict[str, Any] = getattr(pkcs11, "_loaded", {})
    return list(loaded)


class HsmSigner:
    """A CA private key in a PKCS #11 token, bound to one signature algorithm."""

    __slots__ = ("_epoch", "_key", "_mechanism", "algorithm", "parameters", "spki")

    def __init__(self, parameters: HsmParameters, spki: bytes, family: KeyFamily) -> None:
        self.parameters = parameters
        self.spki = spki
        self.algorithm: SignatureAlgorithm = signature_algorithm(family, parameters.hash_name)
        self._mechanism = (
            Mechanism.ECDSA if family is KeyFamily.EC else _RSA_MECHANISMS[parameters.hash_name]
        )
        self._key: Any = None
        self._epoch: object = None

    @classmethod
    def open(cls, module: str, uri: str, pin: str, hash_name: str) -> HsmSigner:
        """Open the key now (errors surface at start) and read its public key from the token."""
        if hash_name not in _RSA_MECHANISMS:
            raise HsmError(f"unsupported hash {hash_name!r} for a PKCS #11 CA key")
        parameters = HsmParameters(module, Pkcs11Uri.parse(uri), pin, hash_name)
        session = _session(parameters)
        key = _private_key(session, parameters.uri)
        spki, family = _public_key(session, key, parameters.uri)
        signer = cls(parameters, spki, family)
        signer._key, signer._epoch = key, _STATE.epoch
        return signer

    def __repr__(self) -> str:
        return f"HsmSigner(module={self.parameters.module!r}, uri='{self.parameters.uri}')"

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle as parameters: the receiving process opens its own session on first use."""
        return (_restore, (self.parameters, self.spki, self.algorithm.family))

    def sign(self, data: bytes) -> bytes:
        """The raw signature: DER ECDSA-Sig-Value (RFC 3279 2.2.3) or PKCS #1 v1.5."""
        if self._epoch is not _STATE.epoch:
            self._reopen()
        try:
            if self._mechanism is Mechanism.ECDSA:
                digest = hashlib.new(self.parameters.hash_name, data).digest()
                return _ecdsa_der(self._key.sign(digest, mechanism=Mechanism.ECDSA))
            return bytes(self._key.sign(data, mechanism=self._mechanism))
        except pkcs11.PKCS11Error as exc:
            # A lost session or device: the next signature reopens instead of failing forever.
            _STATE.close()
            raise HsmSigningError(f"the token failed to sign: {type(exc).__name__}") from exc

    def signed(self, content: bytes) -> bytes:
        """SEQUENCE { content, signatureAlgorithm, signature BIT STRING } (RFC 5280 4.1)."""
        signature = _der.encode_tlv(_der.BIT_STRING, b"\x00" + self.sign(content))
        return _der.encode_tlv(_der.SEQUENCE, content + self.algorithm.identifier + signature)

    def _reopen(self) -> None:
        """Find the key through this process's session; it must be the key we were given."""
        session = _session(self.parameters)
        key = _private_key(session, self.parameters.uri)
        spki, _ = _public_key(session, key, self.parameters.uri)
        if spki != self.spki:
            raise HsmKeyNotFoundError(
                f"the key at '{self.parameters.uri}' is no longer the one this signer was made with"
            )
        self._key, self._epoch = key, _STATE.epoch


def _restore(parameters: HsmParameters, spki: bytes, family: KeyFamily) -> HsmSigner:
    return HsmSigner(parameters, spki, family)


def _ecdsa_der(raw: bytes) -> bytes:
    """PKCS #11 ECDSA gives r || s (each half); X.509 wants ECDSA-Sig-Value (RFC 3279 2.2.3)."""
    half = len(raw) // 2
    r = _der.encode_integer(int.from_bytes(raw[:half], "big"))
    s = _der.encode_integer(int.from_bytes(raw[half:], "big"))
    return _der.encode_tlv(_der.SEQUENCE, r + s)


def load_module(module: str) -> Any:
    """The PKCS #11 library, initialized in this process (again after a fork)."""
    if not os.path.isfile(module):
        raise HsmModuleError(f"PKCS #11 module {module!r} does not exist")
    try:
        library = pkcs11.lib(module)
        if module in _FORKED:
            # PKCS #11 2.40 6.7.7: a child must call C_Initialize; the copy says it already did.
            _FORKED.discard(module)
            with contextlib.suppress(pkcs11.PKCS11Error):  # SoftHSM2 noticed the fork itself
                library.finalize()
            library.initialize()
    except pkcs11.PKCS11Error as exc:
        raise HsmModuleError(f"PKCS #11 module {module!r} does not load: {exc}") from exc
    return library


def reinitialize_module(module: str) -> None:
    """Finalize and initialize the module (its configuration changed); every signer reopens."""
    if module in _loaded_modules():
        _STATE.forget()
        library = pkcs11.lib(module)
        try:
            library.reinitialize()
        except pkcs11.PKCS11Error as exc:
            raise HsmModuleError(f"PKCS #11 module {module!r} does not restart: {exc}") from exc


def find_token(library: Any, uri: Pkcs11Uri) -> Any:
    """The one token whose label, manufacturer, model, serial and slot match the URI."""
    wanted = {
        "label": uri.token,
        "manufacturer_id": uri.manufacturer,
        "model": uri.model,
    }
    matches = []
    try:
        for slot in library.get_slots(token_present=True):
            token = slot.get_token()
            if uri.slot_id is not None and slot.slot_id != uri.slot_id:
                continue
            if uri.serial is not None and _serial(token) != uri.serial:
                continue
            if all(v is None or getattr(token, k) == v for k, v in wanted.items()):
                matches.append(token)
    except pkcs11.PKCS11Error as exc:
        raise HsmTokenNotFoundError(f"listing tokens failed: {type(exc).__name__}") from exc
    if len(matches) != 1:
        what = "no token" if not matches else f"{len(matches)} tokens"
        raise HsmTokenNotFoundError(f"{what} match '{uri}'")
    return matches[0]


def _serial(token: Any) -> str:
    serial = token.serial
    return serial.decode("ascii", "replace").strip() if isinstance(serial, bytes) else str(serial)


def _session(parameters: HsmParameters) -> Any:
    """This process's session on the URI's token, logged in as the user (one per slot)."""
    library = load_module(parameters.module)
    token = find_token(library, parameters.uri)
    slot_key = (parameters.module, int(token.slot.slot_id))
    digest = hashlib.sha256(parameters.pin.encode()).digest()
    cached = _STATE.sessions.get(slot_key)
    if cached is None:
        session = _login(token, parameters)
        _STATE.sessions[slot_key] = (session, digest)
        return session
    session, logged_in_with = cached
    if not hmac.compare_digest(digest, logged_in_with):
        # A token has one user PIN: another one while this process is logged in is wrong.
        raise HsmPinError(f"token {token.label!r} refused the PIN (not the one in use)")
    return session


def reset_sessions() -> None:
    """Close this process's sessions (logging out); every signer reopens on its next use."""
    _STATE.close()


def _login(token: Any, parameters: HsmParameters) -> Any:
    """Open a session and log in; a login another session made in this process is shared."""
    try:
        return token.open(user_pin=parameters.pin)
    except (pkcs11.PinIncorrect, pkcs11.PinInvalid, pkcs11.PinLenRange) as exc:
        raise HsmPinError(f"token {token.label!r} refused the PIN") from exc
    except pkcs11.PinLocked as exc:
        raise HsmPinError(f"token {token.label!r} has locked the user PIN") from exc
    except pkcs11.UserAlreadyLoggedIn:
        # Login state is per token per process: a session outside this module logged in (with
        # the token's one user PIN), so this one is logged in too.
        return token.open()
    except pkcs11.PKCS11Error as exc:
        raise HsmError(f"opening a session on {token.label!r} failed: {exc!r}") from exc


def _private_key(session: Any, uri: Pkcs11Uri) -> Any:
    """The one private key the URI's object= and id= name."""
    attributes: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
    if uri.object is not None:
        attributes[Attribute.LABEL] = uri.object
    if uri.id is not None:
        attributes[Attribute.ID] = uri.id
    try:
        keys = list(session.get_objects(attributes))
    except pkcs11.PKCS11Error as exc:
        raise HsmKeyNotFoundError(f"searching for '{uri}' failed: {type(exc).__name__}") from exc
    if len(keys) != 1:
        what = "no private key" if not keys else f"{len(keys)} private keys"
        raise HsmKeyNotFoundError(f"{what} match '{uri}'")
    return keys[0]


def _public_key(session: Any, key: Any, uri: Pkcs11Uri) -> tuple[bytes, KeyFamily]:
    """The key's SubjectPublicKeyInfo: RSA from the private object, EC from its public twin."""
    try:
        key_type = key[Attribute.KEY_TYPE]
        if key_type == KeyType.RSA:
            numbers = rsa.RSAPublicNumbers(
                int.from_bytes(key[Attribute.PUBLIC_EXPONENT], "big"),
                int.from_bytes(key[Attribute.MODULUS], "big"),
            )
            return _spki(numbers.public_key()), KeyFamily.RSA
        if key_type == KeyType.EC:
            return _ec_spki(session, key), KeyFamily.EC
    except pkcs11.PKCS11Error as exc:
        raise HsmKeyNotFoundError(f"reading the key at '{uri}' failed: {exc!r}") from exc
    raise HsmError(f"the key at '{uri}' is {key_type!r}; a CA key here is RSA or EC")


def _ec_spki(session: Any, key: Any) -> bytes:
    """PKCS #11 EC private keys carry no point: read the public key object with the same ID."""
    lookup: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PUBLIC_KEY}
    lookup[Attribute.ID] = key[Attribute.ID]
    publics = list(session.get_objects(lookup))
    if len(publics) != 1:
        raise HsmKeyNotFoundError(
            f"{len(publics)} public key objects share the EC key's ID; one is needed for its point"
        )
    params = bytes(publics[0][Attribute.EC_PARAMS])
    curve = _CURVES.get(params)
    if curve is None:
        raise HsmError("the EC key's curve is not P-256 or P-384")
    point = bytes(publics[0][Attribute.EC_POINT])
    if point[:1] == bytes([_der.OCTET_STRING]):  # PKCS #11 2.40: DER OCTET STRING around it
        start, end = _der.read_whole(point, _der.OCTET_STRING)
        point = point[start:end]
    return _spki(ec.EllipticCurvePublicKey.from_encoded_point(curve, point))


def _spki(public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


__all__ = [
    "HsmError",
    "HsmKeyNotFoundError",
    "HsmModuleError",
    "HsmParameters",
    "HsmPinError",
    "HsmSigner",
    "HsmSigningError",
    "HsmTokenNotFoundError",
    "Pkcs11Uri",
    "Pkcs11UriError",
    "find_token",
    "load_module",
    "reinitialize_module",
    "reset_sessions",
]
