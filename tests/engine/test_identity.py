"""Distinguished names and subject alternative names."""

from __future__ import annotations

import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from engine.errors import MalformedDerError
from engine.identity import (
    UPN_OID,
    DistinguishedName,
    decode_alternative_names,
    describe_name,
    encode_alternative_names,
)

_LOCAL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-_", min_size=1, max_size=40)


def _cryptography_san(email: str, upn: str) -> bytes:
    upn_value = b"\x0c" + bytes([len(upn.encode())]) + upn.encode()
    return x509.SubjectAlternativeName(
        [x509.RFC822Name(email), x509.OtherName(x509.ObjectIdentifier(UPN_OID), upn_value)]
    ).public_bytes()


@given(_LOCAL, _LOCAL)
def test_san_encoding_matches_cryptography(local: str, upn_local: str) -> None:
    """Our GeneralNames bytes equal cryptography's for the same names."""
    email, upn = f"{local}@example.com", f"{upn_local}@corp.example.com"
    assert encode_alternative_names(email, upn) == _cryptography_san(email, upn)


@given(_LOCAL, st.text(min_size=1, max_size=60))
def test_san_round_trips(local: str, upn: str) -> None:
    """Encoded alternative names decode to the same e-mail and UPN."""
    names = decode_alternative_names(encode_alternative_names(f"{local}@x.org", upn))
    assert (names.emails, names.upns, names.other_kinds) == ((f"{local}@x.org",), (upn,), ())


def test_other_san_kinds_are_reported() -> None:
    """A dNSName is reported by its tag, not silently accepted."""
    value = x509.SubjectAlternativeName([x509.DNSName("evil.example")]).public_bytes()
    assert decode_alternative_names(value).other_kinds == (0x82,)


def test_garbage_san_raises_malformed() -> None:
    """Bytes that are not GeneralNames raise MalformedDerError."""
    with pytest.raises(MalformedDerError):
        decode_alternative_names(b"\x30\x03\x81\x05a")


def test_dn_der_matches_cryptography() -> None:
    """A DN's DER is what cryptography encodes for the same RFC 4514 text."""
    text = "CN=alice,OU=Devices,O=Example Corp,DC=example,DC=com"
    dn = DistinguishedName.from_text(text)
    assert dn.der == x509.Name.from_rfc4514_string(text).public_bytes()
    assert describe_name(dn.der) == dn.text


def test_bad_dn_text_raises_malformed() -> None:
    """Text that is not RFC 4514 is refused with a typed error."""
    with pytest.raises(MalformedDerError):
        DistinguishedName.from_text("not a dn")
