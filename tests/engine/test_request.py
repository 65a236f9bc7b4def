"""PKCS #10 requests: the template path equals the builder path, and real peers accept both."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyasn1.codec.der import decoder, encoder
from pyasn1_modules import rfc2986, rfc5280

from engine._der import encode_oid, encode_tlv
from engine.errors import EnrollmentError, MalformedDerError, SignatureInvalidError
from engine.identity import DistinguishedName
from engine.keys import Signer
from engine.request import (
    EXTENSION_REQUEST_OID,
    RequestContent,
    RequestTemplate,
    build_request_with_builder,
    parse_request,
    python_split_request,
    split_request,
    verify_request,
)
from tests.conftest import require_tool, vector_key

CONTENT = RequestContent(
    DistinguishedName.from_text("CN=user0000001,OU=Devices,O=Example Corp,DC=example,DC=com"),
    "user0000001@example.com",
    "user0000001@corp.example.com",
)
CASES = [("p256-4", "sha256"), ("p384-1", "sha384"), ("ed25519-1", None), ("rsa2048-4", "sha256")]


def _both(key_name: str, hash_name: str | None) -> tuple[bytes, bytes]:
    signer = Signer(vector_key(key_name), hash_name)
    template = RequestTemplate(signer.algorithm.family).build(signer, CONTENT)
    return template, build_request_with_builder(signer, CONTENT)


def _fields(der: bytes) -> dict[str, bytes]:
    """Decode with pyasn1-modules rfc2986 and re-encode each field except the signature."""
    request, rest = decoder.decode(der, asn1Spec=rfc2986.CertificationRequest())
    assert rest == b""
    info = request["certificationRequestInfo"]
    return {
        "version": encoder.encode(info["version"]),
        "subject": encoder.encode(info["subject"]),
        "spki": encoder.encode(info["subjectPKInfo"]),
        "attributes": encoder.encode(info["attributes"]),
        "algorithm": encoder.encode(request["signatureAlgorithm"]),
    }


@pytest.mark.parametrize(("key_name", "hash_name"), CASES)
def test_template_and_builder_decode_to_same_fields(key_name: str, hash_name: str | None) -> None:
    """pyasn1-modules decodes both paths to identical fields."""
    template, builder = _both(key_name, hash_name)
    assert _fields(template) == _fields(builder)


@pytest.mark.parametrize(("key_name", "hash_name"), [("ed25519-1", None), ("rsa2048-4", "sha256")])
def test_deterministic_signatures_give_identical_bytes(
    key_name: str, hash_name: str | None
) -> None:
    """With deterministic signatures (Ed25519, PKCS #1 v1.5) both paths are byte-identical."""
    template, builder = _both(key_name, hash_name)
    assert template == builder


def test_extension_request_carries_san_and_key_usage() -> None:
    """The request asks for the user's e-mail and UPN and a critical key usage."""
    template, _ = _both("p256-4", "sha256")
    request = x509.load_der_x509_csr(template)
    san = request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == [CONTENT.email]
    usage = request.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert request.is_signature_valid


@pytest.mark.parametrize(("key_name", "hash_name"), CASES)
def test_openssl_verifies_both_paths(key_name: str, hash_name: str | None, tmp_path: Path) -> None:
    """`openssl req -verify` accepts the template and the builder requests."""
    openssl = require_tool("openssl")
    for label, der in zip(("template", "builder"), _both(key_name, hash_name), strict=True):
        path = tmp_path / f"{label}.der"
        path.write_bytes(der)
        result = subprocess.run(
            [openssl, "req", "-verify", "-noout", "-inform", "DER", "-in", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, (label, result.stderr)
        assert "verify OK" in result.stdout + result.stderr


def test_parser_slices_match_pyasn1() -> None:
    """The fast parser's subject and SPKI equal pyasn1's decoding of the same request."""
    template, _ = _both("p384-1", "sha384")
    parsed = parse_request(template)
    fields = _fields(template)
    assert parsed.subject == fields["subject"]
    assert parsed.key.spki == fields["spki"]
    assert parsed.algorithm.identifier == fields["algorithm"]
    assert set(parsed.extensions) == {encode_oid("2.5.29.17"), encode_oid("2.5.29.15")}
    verify_request(parsed)


def test_pyasn1_sees_the_extension_request() -> None:
    """pyasn1-modules finds one extensionRequest attribute holding two extensions."""
    request, _ = decoder.decode(
        _both("p256-4", "sha256")[0], asn1Spec=rfc2986.CertificationRequest()
    )
    attributes = request["certificationRequestInfo"]["attributes"]
    assert [str(a["type"]) for a in attributes] == [EXTENSION_REQUEST_OID]
    extensions, _ = decoder.decode(attributes[0]["values"][0], asn1Spec=rfc5280.Extensions())
    assert sorted(str(e["extnID"]) for e in extensions) == ["2.5.29.15", "2.5.29.17"]


def test_flipped_signature_does_not_verify() -> None:
    """A request whose signature was altered raises SignatureInvalidError."""
    template = bytearray(_both("p256-4", "sha256")[0])
    template[-3] ^= 0x01
    with pytest.raises(SignatureInvalidError):
        verify_request(parse_request(bytes(template)))


@pytest.mark.parametrize("cut", [1, 10, 50, 100])
def test_truncated_request_is_malformed(cut: int) -> None:
    """Every truncation raises MalformedDerError."""
    with pytest.raises(MalformedDerError):
        parse_request(_both("p256-4", "sha256")[0][:-cut])


_FIXED_REQUEST = _both("p256-4", "sha256")[0]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_requests_raise_only_typed_errors(data: st.DataObject) -> None:
    """Random byte edits either still parse or raise an EnrollmentError: never anything else."""
    der = bytearray(_FIXED_REQUEST)
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        index = data.draw(st.integers(min_value=0, max_value=len(der) - 1))
        der[index] = data.draw(st.integers(min_value=0, max_value=255))
    with contextlib.suppress(EnrollmentError):
        verify_request(parse_request(bytes(der)))


@given(st.binary(max_size=300))
def test_garbage_raises_only_typed_errors(garbage: bytes) -> None:
    """Arbitrary bytes never escape as anything but an EnrollmentError."""
    with contextlib.suppress(EnrollmentError):
        parse_request(garbage)


def _split_outcome(split: Callable[[bytes], object], der: bytes) -> object:
    """The slices, or the error's type, message and offset: all must agree between walks."""
    try:
        return split(der)
    except MalformedDerError as exc:
        return (type(exc).__name__, exc.detail, exc.offset)


@pytest.mark.skipif(split_request is python_split_request, reason="C walk not built")
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_c_and_python_request_walks_agree(data: st.DataObject) -> None:
    """On mutated and truncated requests, the C and Python walks agree, offsets included."""
    der = bytearray(_FIXED_REQUEST)
    for _ in range(data.draw(st.integers(min_value=0, max_value=4))):
        index = data.draw(st.integers(min_value=0, max_value=len(der) - 1))
        der[index] = data.draw(st.integers(min_value=0, max_value=255))
    cut = data.draw(st.integers(min_value=0, max_value=len(der)))
    mutated = bytes(der[:cut] if data.draw(st.booleans()) else der)
    assert _split_outcome(split_request, mutated) == _split_outcome(python_split_request, mutated)


def test_duplicate_extensions_are_refused() -> None:
    """A request asking for the same extension twice is malformed (RFC 5280 4.2)."""
    signer = Signer(vector_key("ed25519-1"), None)
    extension = _der_extension()
    info = encode_tlv(
        0x30,
        b"\x02\x01\x00"
        + CONTENT.subject.der
        + signer.spki
        + encode_tlv(
            0xA0,
            encode_tlv(
                0x30,
                encode_oid(EXTENSION_REQUEST_OID)
                + encode_tlv(0x31, encode_tlv(0x30, extension + extension)),
            ),
        ),
    )
    with pytest.raises(MalformedDerError, match="twice"):
        parse_request(signer.signed(info))


def _der_extension() -> bytes:
    value = encode_tlv(0x04, b"\x03\x02\x07\x80")
    return encode_tlv(0x30, encode_oid("2.5.29.15") + value)
