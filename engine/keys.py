"""Key types, signature algorithms, and the sign/verify calls the hot path makes.

Everything here is resolved once per profile: a `Signer` holds its key, the pre-encoded
AlgorithmIdentifier (RFC 5280 4.1.1.2) and a ready padding/hash object, so that signing in the hot
path is one call into OpenSSL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple, Protocol, cast

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from engine import _der
from engine.errors import (
    MalformedDerError,
    SignatureInvalidError,
    UnsupportedKeyError,
    WeakKeyError,
)

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

MINIMUM_RSA_BITS = 2048


class KeyFamily(StrEnum):
    """The three public-key families a CA profile may name."""

    RSA = "rsa"
    EC = "ec"
    ED25519 = "ed25519"


@dataclass(frozen=True, slots=True)
class KeySpec:
    """A key type as a CA profile names it: family plus size (RSA bits) or curve."""

    name: str
    family: KeyFamily
    bits: int


KEY_SPECS: dict[str, KeySpec] = {
    spec.name: spec
    for spec in (
        KeySpec("rsa2048", KeyFamily.RSA, 2048),
        KeySpec("rsa3072", KeyFamily.RSA, 3072),
        KeySpec("rsa4096", KeyFamily.RSA, 4096),
        KeySpec("p256", KeyFamily.EC, 256),
        KeySpec("p384", KeyFamily.EC, 384),
        KeySpec("ed25519", KeyFamily.ED25519, 256),
    )
}

_RSA_SPECS = {spec.bits: spec for spec in KEY_SPECS.values() if spec.family is KeyFamily.RSA}
_CURVES: dict[int, ec.EllipticCurve] = {256: ec.SECP256R1(), 384: ec.SECP384R1()}
SignatureHash = hashes.SHA256 | hashes.SHA384 | hashes.SHA512
_HASHES: dict[str, Callable[[], SignatureHash]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def hash_algorithm(hash_name: str | None) -> SignatureHash:
    """The hash object for a profile's hash name (sha256, sha384, sha512)."""
    try:
        return _HASHES[str(hash_name)]()
    except KeyError:
        raise UnsupportedKeyError(f"unsupported hash {hash_name!r}") from None


def key_spec(name: str) -> KeySpec:
    """Look up a key type by its profile name (`p256`, `rsa2048`, ...)."""
    try:
        return KEY_SPECS[name]
    except KeyError:
        raise UnsupportedKeyError(
            f"unknown key type {name!r}; known: {', '.join(KEY_SPECS)}"
        ) from None


@dataclass(frozen=True, slots=True)
class SignatureAlgorithm:
    """A signature algorithm with its DER AlgorithmIdentifier (RFC 5280 4.1.1.2, RFC 8410)."""

    family: KeyFamily
    hash_name: str | None
    identifier: bytes
    # Ready-made signing and verification parameters (ECDSA, or PKCS #1 padding and hash).
    ecdsa: ec.ECDSA | None = field(default=None, compare=False)
    pkcs1: tuple[padding.PKCS1v15, SignatureHash] | None = field(default=None, compare=False)


def _algorithm(family: KeyFamily, hash_name: str | None, oid: str) -> SignatureAlgorithm:
    # RFC 4055 2.1: PKCS #1 v1.5 identifiers carry NULL parameters; RFC 5758 3.2 and RFC 8410 3:
    # ECDSA and EdDSA identifiers carry none.
    params = _der.encode_tlv(_der.NULL, b"") if family is KeyFamily.RSA else b""
    identifier = _der.encode_tlv(_der.SEQUENCE, _der.encode_oid(oid) + params)
    if family is KeyFamily.EC:
        return SignatureAlgorithm(
            family, hash_name, identifier, ecdsa=ec.ECDSA(_HASHES[str(hash_name)]())
        )
    if family is KeyFamily.RSA:
        pkcs1 = (padding.PKCS1v15(), _HASHES[str(hash_name)]())
        return SignatureAlgorithm(family, hash_name, identifier, pkcs1=pkcs1)
    return SignatureAlgorithm(family, hash_name, identifier)


SIGNATURE_ALGORITHMS: tuple[SignatureAlgorithm, ...] = (
    _algorithm(KeyFamily.RSA, "sha256", "1.2.840.113549.1.1.11"),
    _algorithm(KeyFamily.RSA, "sha384", "1.2.840.113549.1.1.12"),
    _algorithm(KeyFamily.RSA, "sha512", "1.2.840.113549.1.1.13"),
    _algorithm(KeyFamily.EC, "sha256", "1.2.840.10045.4.3.2"),
    _algorithm(KeyFamily.EC, "sha384", "1.2.840.10045.4.3.3"),
    _algorithm(KeyFamily.EC, "sha512", "1.2.840.10045.4.3.4"),
    _algorithm(KeyFamily.ED25519, None, "1.3.101.112"),
)
_BY_IDENTIFIER = {alg.identifier: alg for alg in SIGNATURE_ALGORITHMS}


def signature_algorithm(family: KeyFamily, hash_name: str | None) -> SignatureAlgorithm:
    """The algorithm a key family signs with under a profile's hash (Ed25519 takes none)."""
    wanted = None if family is KeyFamily.ED25519 else hash_name
    for alg in SIGNATURE_ALGORITHMS:
        if alg.family is family and alg.hash_name == wanted:
            return alg
    raise UnsupportedKeyError(f"no {family} signature algorithm with hash {hash_name!r}")


def algorithm_from_identifier(identifier: bytes) -> SignatureAlgorithm:
    """Resolve a DER AlgorithmIdentifier found in a request or certificate."""
    try:
        return _BY_IDENTIFIER[identifier]
    except KeyError:
        raise UnsupportedKeyError(
            f"unsupported signature algorithm {_describe_identifier(identifier)}"
        ) from None


# SubjectPublicKeyInfo algorithm identifiers we accept (RFC 3279 2.3, RFC 5480 2.1, RFC 8410 3).
_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
_SPKI_ALGORITHMS: dict[bytes, KeySpec] = {
    _der.encode_tlv(
        _der.SEQUENCE, _der.encode_oid("1.2.840.113549.1.1.1") + _der.encode_tlv(_der.NULL, b"")
    ): KeySpec("rsa", KeyFamily.RSA, 0),
    _der.encode_tlv(
        _der.SEQUENCE, _der.encode_oid(_EC_PUBLIC_KEY) + _der.encode_oid("1.2.840.10045.3.1.7")
    ): KEY_SPECS["p256"],
    _der.encode_tlv(
        _der.SEQUENCE, _der.encode_oid(_EC_PUBLIC_KEY) + _der.encode_oid("1.3.132.0.34")
    ): KEY_SPECS["p384"],
    _der.encode_tlv(_der.SEQUENCE, _der.encode_oid("1.3.101.112")): KEY_SPECS["ed25519"],
}


def _describe_identifier(identifier: bytes) -> str:
    """Name an AlgorithmIdentifier by its OIDs, for error messages."""
    try:
        start, end = _der.read_whole(identifier, _der.SEQUENCE)
        oids = [
            _der.decode_oid(identifier[content:stop])
            for tag, _, content, stop in _der.split_children(identifier, start, end)
            if tag == _der.OID
        ]
    except MalformedDerError:
        return identifier.hex()
    return " ".join(oids) or identifier.hex()


class SubjectKey(NamedTuple):
    """A SubjectPublicKeyInfo (RFC 5280 4.1.2.7) split once: whole DER, algorithm, key bits."""

    spki: bytes
    algorithm: bytes
    bits: bytes  # the subjectPublicKey BIT STRING's value, without its unused-bits octet


def split_spki(spki: bytes, offset: int = 0, limit: int | None = None) -> SubjectKey:
    """Split the SubjectPublicKeyInfo at `offset` (ending by `limit`) into its parts."""
    start, end = _der.expect(spki, offset, _der.SEQUENCE, len(spki) if limit is None else limit)
    _, alg_end = _der.expect(spki, start, _der.SEQUENCE, end)
    bits_start, bits_end = _der.expect(spki, alg_end, _der.BIT_STRING, end)
    if bits_end != end or bits_start == bits_end or spki[bits_start] != 0:
        raise MalformedDerError("subjectPublicKey is not a whole-byte BIT STRING", alg_end)
    return SubjectKey(spki[offset:end], spki[start:alg_end], spki[bits_start + 1 : bits_end])


def load_public_key(subject_key: SubjectKey) -> tuple[PublicKey, KeySpec]:
    """Load a split SPKI and name its key type; refuse anything a profile cannot allow.

    EC and Ed25519 keys load straight from the key bits (OpenSSL still checks the point is on
    the curve); RSA keys go through the DER loader.
    """
    spec = _SPKI_ALGORITHMS.get(subject_key.algorithm)
    if spec is None:
        raise UnsupportedKeyError(
            f"unsupported key algorithm or curve {_describe_identifier(subject_key.algorithm)}"
        )
    try:
        if spec.family is KeyFamily.EC:
            curve = _CURVES[spec.bits]
            return ec.EllipticCurvePublicKey.from_encoded_point(curve, subject_key.bits), spec
        if spec.family is KeyFamily.ED25519:
            return ed25519.Ed25519PublicKey.from_public_bytes(subject_key.bits), spec
        key = serialization.load_der_public_key(subject_key.spki)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise MalformedDerError(f"public key does not load: {exc}") from exc
    rsa_key = cast(rsa.RSAPublicKey, key)  # the algorithm identifier said rsaEncryption
    bits = rsa_key.key_size
    if bits < MINIMUM_RSA_BITS:
        raise WeakKeyError(bits, MINIMUM_RSA_BITS)
    spec = _RSA_SPECS.get(bits)
    return rsa_key, KeySpec(f"rsa{bits}", KeyFamily.RSA, bits) if spec is None else spec


def verify_signature(
    key: PublicKey, spec: KeySpec, algorithm: SignatureAlgorithm, signature: bytes, data: bytes
) -> None:
    """Verify `signature` over `data` with a key `load_public_key` named `spec`.

    Dispatch is on the key's spec rather than `isinstance`, whose ABC checks cost more than
    the rest of this function.
    """
    if algorithm.family is not spec.family:
        raise UnsupportedKeyError(
            f"signature algorithm {algorithm.family}/{algorithm.hash_name} does not fit a "
            f"{spec.name} key"
        )
    try:
        if algorithm.ecdsa is not None:
            cast(ec.EllipticCurvePublicKey, key).verify(signature, data, algorithm.ecdsa)
        elif algorithm.pkcs1 is not None:
            cast(rsa.RSAPublicKey, key).verify(signature, data, *algorithm.pkcs1)
        else:
            cast(ed25519.Ed25519PublicKey, key).verify(signature, data)
    except InvalidSignature as exc:
        raise SignatureInvalidError("signature does not verify with the request's key") from exc


class CaSigner(Protocol):
    """What a CA signs with: a key in memory (`Signer`) or in a PKCS #11 token
    (`engine.hsm.HsmSigner`)."""

    @property
    def algorithm(self) -> SignatureAlgorithm: ...

    @property
    def spki(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes: ...

    def signed(self, content: bytes) -> bytes: ...


class Signer:
    """A private key bound to one signature algorithm; `sign` is a single OpenSSL call."""

    __slots__ = ("algorithm", "key", "sign", "spki")

    def __init__(self, key: PrivateKey, hash_name: str | None) -> None:
        self.key = key
        self.spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.algorithm = signature_algorithm(family_of(key), hash_name)
        self.sign = _signing_call(key, self.algorithm)

    def signed(self, content: bytes) -> bytes:
        """SEQUENCE { content, signatureAlgorithm, signature BIT STRING }: the signed wrapper
        shared by a CertificationRequest (RFC 2986 4.2) and a Certificate (RFC 5280 4.1)."""
        signature = _der.encode_tlv(_der.BIT_STRING, b"\x00" + self.sign(content))
        return _der.encode_tlv(_der.SEQUENCE, content + self.algorithm.identifier + signature)


def _signing_call(key: PrivateKey, algorithm: SignatureAlgorithm) -> Callable[[bytes], bytes]:
    """The one-argument signing function, with the algorithm's ready padding and hash objects."""
    ecdsa, pkcs1 = algorithm.ecdsa, algorithm.pkcs1
    if ecdsa is not None:
        ec_key = cast(ec.EllipticCurvePrivateKey, key)
        return lambda data: ec_key.sign(data, ecdsa)
    if pkcs1 is not None:
        rsa_key = cast(rsa.RSAPrivateKey, key)
        return lambda data: rsa_key.sign(data, *pkcs1)
    return cast(ed25519.Ed25519PrivateKey, key).sign


def family_of(key: PrivateKey | PublicKey) -> KeyFamily:
    """The family of a loaded key."""
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return KeyFamily.RSA
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return KeyFamily.EC
    return KeyFamily.ED25519


def generate_private_key(spec: KeySpec) -> PrivateKey:
    """Generate a fresh key of the given type (RSA: ~40 ms median with a heavy tail)."""
    if spec.family is KeyFamily.RSA:
        return rsa.generate_private_key(public_exponent=65537, key_size=spec.bits)
    if spec.family is KeyFamily.EC:
        return ec.generate_private_key(_CURVES[spec.bits])
    return ed25519.Ed25519PrivateKey.generate()


def derive_private_key(spec: KeySpec, secret: bytes) -> PrivateKey:
    """Derive a reproducible EC or Ed25519 key from 32+ secret bytes (seeded corpora).

    RSA has no such derivation in OpenSSL; RSA corpora are random and cached instead.
    """
    if spec.family is KeyFamily.EC:
        curve = _CURVES[spec.bits]
        order = _CURVE_ORDERS[spec.bits]
        scalar = int.from_bytes(secret, "big") % (order - 1) + 1
        return ec.derive_private_key(scalar, curve)
    if spec.family is KeyFamily.ED25519:
        return ed25519.Ed25519PrivateKey.from_private_bytes(secret[:32])
    raise UnsupportedKeyError("RSA keys cannot be derived from a seed")


_CURVE_ORDERS = {
    256: 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    384: int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
        16,
    ),
}


def private_key_to_der(key: PrivateKey) -> bytes:
    """Serialize a private key as unencrypted PKCS #8 DER (how keys cross processes)."""
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(der: bytes) -> PrivateKey:
    """Load a PKCS #8 DER private key the engine made itself, skipping RSA re-validation (37 ms)."""
    try:
        key = serialization.load_der_private_key(
            der, password=None, unsafe_skip_rsa_key_validation=True
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise MalformedDerError(f"private key does not load: {exc}") from exc
    if not isinstance(
        key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise UnsupportedKeyError(f"unsupported private key type {type(key).__name__}")
    return key


def encrypt_private_key(key: PrivateKey, secret: bytes) -> bytes:
    """Encrypt a key pair as PKCS #8 (PBES2, AES-256-CBC) under a per-device secret."""
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(secret),
    )
