"""End-entity certificates from the TBSCertificate template."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given
from hypothesis import strategies as st
from pyasn1.codec.der import decoder, encoder
from pyasn1_modules import rfc5280

from engine.certificate import (
    CertificateTemplate,
    build_certificate_with_builder,
    certificate_spki,
    encode_time,
    key_identifier,
    python_certificate_spki,
)
from engine.errors import EmptySanError, MalformedDerError
from engine.identity import DistinguishedName, encode_alternative_names
from engine.keys import KeyFamily, Signer, split_spki
from engine.request import SAN_OID_DER, RequestContent, RequestTemplate, parse_request
from engine.system import EngineConfig
from tests.conftest import ca_material, vector_key

_CHAIN = ca_material(EngineConfig()).chain()
_TEMPLATE = CertificateTemplate(
    _CHAIN.issuing, Signer(_CHAIN.private_issuing_key(), "sha256"), KeyFamily.EC, 86_400
)
_DEVICE = Signer(vector_key("p256-5"), "sha256")
_DEVICE_KEY = split_spki(_DEVICE.spki)
_SUBJECT = x509.Name.from_rfc4514_string("CN=device,O=Example").public_bytes()
_NOW = 1_790_000_000


def _issue(serial: int = 12345, now: int = _NOW, san: bytes | None = None) -> x509.Certificate:
    der = _TEMPLATE.issue(serial, now, _SUBJECT, _DEVICE_KEY, san)
    return x509.load_der_x509_certificate(der)


@given(st.integers(min_value=1, max_value=2**128 - 1), st.integers(0, 4_000_000_000))
def test_template_round_trips_serial_and_validity(serial: int, now: int) -> None:
    """Any 128-bit serial and time come back from cryptography's parser unchanged."""
    certificate = _issue(serial, now)
    assert certificate.serial_number == serial
    assert certificate.not_valid_before_utc == datetime.fromtimestamp(now, UTC)
    assert certificate.not_valid_after_utc == datetime.fromtimestamp(now + 86_400, UTC)


def test_certificate_is_signed_by_the_issuing_ca() -> None:
    """The issuing CA's key verifies the template's signature; issuer is its subject."""
    certificate = _issue()
    certificate.verify_directly_issued_by(_CHAIN.issuing)
    assert certificate.issuer == _CHAIN.issuing.subject


def test_extensions_are_rfc5280_end_entity() -> None:
    """Basic constraints CA:FALSE, key usage, clientAuth EKU, SKI from the key, AKI of the CA."""
    certificate = _issue(san=encode_alternative_names("a@example.com", "a@corp.example.com"))
    extensions = certificate.extensions
    basic = extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and not basic.value.ca
    assert extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    eku = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ski = extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(certificate.public_key())
    aki = extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    issuer_ski = _CHAIN.issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert aki.key_identifier == issuer_ski.value.digest
    san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == ["a@example.com"]


@pytest.mark.parametrize("san", [b"\x30\x00", b""])
def test_template_never_emits_an_empty_san(san: bytes) -> None:
    """An empty SAN value raises EmptySanError instead of producing an empty extension."""
    with pytest.raises(EmptySanError):
        _TEMPLATE.issue(7, _NOW, _SUBJECT, _DEVICE_KEY, san)


def test_pyasn1_decodes_the_certificate() -> None:
    """pyasn1-modules rfc5280 decodes version v3, the subject and the SPKI we spliced."""
    der = _TEMPLATE.issue(7, _NOW, _SUBJECT, _DEVICE_KEY, None)
    decoded, rest = decoder.decode(der, asn1Spec=rfc5280.Certificate())
    tbs = decoded["tbsCertificate"]
    assert rest == b"" and int(tbs["version"]) == 2
    assert encoder.encode(tbs["subject"]) == _SUBJECT
    assert encoder.encode(tbs["subjectPublicKeyInfo"]) == _DEVICE.spki


def test_spki_is_sliced_from_the_certificate() -> None:
    """certificate_spki returns exactly the key the certificate was issued for."""
    der = _TEMPLATE.issue(7, _NOW, _SUBJECT, _DEVICE_KEY, None)
    assert certificate_spki(der) == _DEVICE.spki


def test_spki_of_garbage_is_malformed() -> None:
    """A truncated certificate raises MalformedDerError."""
    der = _TEMPLATE.issue(7, _NOW, _SUBJECT, _DEVICE_KEY, None)
    with pytest.raises(MalformedDerError):
        certificate_spki(der[:40])


def test_times_switch_to_generalized_after_2049() -> None:
    """RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050."""
    assert encode_time(2_524_607_999)[0] == 0x17
    assert encode_time(2_524_608_000)[0] == 0x18


def test_key_identifier_is_sha1_of_the_key_bits() -> None:
    """The SKI method 1 digest equals cryptography's."""
    expected = x509.SubjectKeyIdentifier.from_public_key(vector_key("p256-5").public_key()).digest
    assert key_identifier(_DEVICE_KEY) == expected


def test_builder_path_gives_the_same_certificate() -> None:
    """With a deterministic CA signature (Ed25519), template and builder are byte-identical."""
    chain = ca_material(EngineConfig(ca_key="ed25519")).chain()
    signer = Signer(chain.private_issuing_key(), None)
    template = CertificateTemplate(chain.issuing, signer, KeyFamily.EC, 86_400)
    user_signer = Signer(vector_key("p256-5"), "sha256")
    content = RequestContent(
        DistinguishedName.from_text("CN=u,O=Example"), "u@x.org", "u@corp.x.org"
    )
    request_der = RequestTemplate(KeyFamily.EC).build(user_signer, content)
    parsed = parse_request(request_der)
    san = parsed.extensions[SAN_OID_DER][1]
    fast = template.issue(99, _NOW, parsed.subject, parsed.key, san)
    reference = build_certificate_with_builder(
        chain.issuing, signer, KeyFamily.EC, 86_400, 99, _NOW, x509.load_der_x509_csr(request_der)
    )
    assert fast == reference


def _kind(call: Callable[[], bytes]) -> object:
    try:
        return call()
    except MalformedDerError:
        return "MalformedDerError"


@pytest.mark.skipif(certificate_spki is python_certificate_spki, reason="C slice not built")
@given(st.data())
def test_c_and_python_spki_slices_agree(data: st.DataObject) -> None:
    """On mutated and truncated certificates, the C and Python SPKI slices agree."""
    der = bytearray(_FIXED_CERTIFICATE)
    for _ in range(data.draw(st.integers(min_value=0, max_value=3))):
        index = data.draw(st.integers(min_value=0, max_value=len(der) - 1))
        der[index] = data.draw(st.integers(min_value=0, max_value=255))
    mutated = bytes(der[: data.draw(st.integers(min_value=0, max_value=len(der)))])
    assert _kind(lambda: certificate_spki(mutated)) == _kind(
        lambda: python_certificate_spki(mutated)
    )


_FIXED_CERTIFICATE = _TEMPLATE.issue(7, _NOW, _SUBJECT, _DEVICE_KEY, None)
