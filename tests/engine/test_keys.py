"""Key types, signature algorithms and key loading."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization

from engine.errors import (
    MalformedDerError,
    SignatureInvalidError,
    UnsupportedKeyError,
    WeakKeyError,
)
from engine.keys import (
    KEY_SPECS,
    KeyFamily,
    KeySpec,
    PublicKey,
    Signer,
    derive_private_key,
    encrypt_private_key,
    key_spec,
    load_private_key,
    load_public_key,
    private_key_to_der,
    signature_algorithm,
    split_spki,
    verify_signature,
)
from tests.conftest import vector_key

_VECTOR_OF = {
    "rsa2048": "rsa2048-4",
    "rsa3072": "rsa3072-1",
    "rsa4096": "rsa4096-1",
    "p256": "p256-4",
    "p384": "p384-1",
    "ed25519": "ed25519-1",
}


def load_spki(spki: bytes) -> tuple[PublicKey, KeySpec]:
    """Split and load, as the request parser and the CA do in turn."""
    return load_public_key(split_spki(spki))


def _spki(name: str) -> bytes:
    return (
        vector_key(name)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


@pytest.mark.parametrize("spec_name", list(KEY_SPECS))
def test_public_key_is_named_by_its_spec(spec_name: str) -> None:
    """Every supported key type loads from its SPKI and is named correctly."""
    _, spec = load_spki(_spki(_VECTOR_OF[spec_name]))
    assert spec == KEY_SPECS[spec_name]


@pytest.mark.parametrize(
    ("spec_name", "hash_name"),
    [
        ("p256", "sha256"),
        ("p384", "sha384"),
        ("rsa2048", "sha256"),
        ("rsa3072", "sha512"),
        ("ed25519", None),
    ],
)
def test_signer_signature_verifies(spec_name: str, hash_name: str | None) -> None:
    """A Signer's signature verifies under its own algorithm."""
    signer = Signer(vector_key(_VECTOR_OF[spec_name]), hash_name)
    key, spec = load_spki(signer.spki)
    verify_signature(key, spec, signer.algorithm, signer.sign(b"data"), b"data")


def test_tampered_signature_raises() -> None:
    """A signature over other data raises SignatureInvalidError."""
    signer = Signer(vector_key("p256-4"), "sha256")
    key, spec = load_spki(signer.spki)
    with pytest.raises(SignatureInvalidError):
        verify_signature(key, spec, signer.algorithm, signer.sign(b"data"), b"other")


def test_algorithm_of_other_family_is_refused() -> None:
    """An RSA algorithm with an EC key is an unsupported combination, not a crash."""
    key, spec = load_spki(_spki("p256-4"))
    with pytest.raises(UnsupportedKeyError):
        verify_signature(key, spec, signature_algorithm(KeyFamily.RSA, "sha256"), b"x", b"y")


def test_rsa_below_2048_is_weak() -> None:
    """RSA-1024 raises WeakKeyError with the size."""
    with pytest.raises(WeakKeyError) as info:
        load_spki(_spki("rsa1024-1"))
    assert info.value.bits == 1024


@pytest.mark.parametrize("name", ["secp256k1-1", "p521-1"])
def test_unsupported_curves_are_refused(name: str) -> None:
    """Curves no profile can name raise UnsupportedKeyError naming the curve OID."""
    with pytest.raises(UnsupportedKeyError, match=r"1\.3\.132\.0\.(10|35)"):
        load_spki(_spki(name))


def test_garbage_spki_is_malformed() -> None:
    """Truncated SPKI bytes raise MalformedDerError."""
    with pytest.raises(MalformedDerError):
        load_spki(_spki("p256-4")[:-5])


def test_private_key_round_trips_as_der() -> None:
    """Keys cross processes as PKCS #8 DER and come back equal."""
    key = vector_key("rsa2048-4")
    assert private_key_to_der(load_private_key(private_key_to_der(key))) == private_key_to_der(key)


def test_garbage_private_key_is_malformed() -> None:
    """Bytes that are not a key raise MalformedDerError."""
    with pytest.raises(MalformedDerError):
        load_private_key(b"\x30\x03\x02\x01\x00")


def test_encrypted_key_needs_the_secret() -> None:
    """The protected key decrypts with the device secret and not without it."""
    key = vector_key("p256-4")
    protected = encrypt_private_key(key, b"s" * 32)
    loaded = serialization.load_der_private_key(protected, b"s" * 32)
    assert private_key_to_der(loaded) == private_key_to_der(key)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        serialization.load_der_private_key(protected, None)


@pytest.mark.parametrize("name", ["p256", "p384", "ed25519"])
def test_derived_keys_are_reproducible(name: str) -> None:
    """The same secret derives the same key; another secret another key."""
    spec = key_spec(name)
    first = private_key_to_der(derive_private_key(spec, b"a" * 32))
    assert first == private_key_to_der(derive_private_key(spec, b"a" * 32))
    assert first != private_key_to_der(derive_private_key(spec, b"b" * 32))


def test_unknown_key_name_lists_the_known_ones() -> None:
    """An unknown key type names the supported ones."""
    with pytest.raises(UnsupportedKeyError, match="p256"):
        key_spec("dsa1024")
