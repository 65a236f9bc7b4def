"""CMS (RFC 5652) for SCEP: pyasn1-modules and openssl as oracles, mutation for the parsers."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyasn1.codec.der import decoder, encoder
from pyasn1_modules import rfc5652

from engine import _der
from engine.wire import cms
from tests.conftest import require_tool, vector_key

WIRE_VECTORS = Path(__file__).parent / "vectors"
_START = datetime(2026, 1, 1, tzinfo=UTC)
_TRANSACTION_ID = _der.encode_oid("2.16.840.1.113733.1.9.7")


@cache
def wire_key(name: str) -> rsa.RSAPrivateKey:
    """A fixed RSA-2048 key from tests/engine/wire/vectors."""
    key = serialization.load_pem_private_key((WIRE_VECTORS / f"{name}.pem").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@cache
def ca_certificate() -> x509.Certificate:
    """A self-signed P-256 CA from the fixed vectors."""
    key = vector_key("p256-1")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return (
        x509.CertificateBuilder()
        .subject_name(_name("Test SCEP CA"))
        .issuer_name(_name("Test SCEP CA"))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(_START)
        .not_valid_after(_START + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


@cache
def issued(key_name: str, common_name: str, serial: int) -> bytes:
    """A DER certificate for a fixed RSA key, issued by the test CA."""
    ca_key = vector_key("p256-1")
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_certificate().subject)
        .public_key(wire_key(key_name).public_key())
        .serial_number(serial)
        .not_valid_before(_START)
        .not_valid_after(_START + timedelta(days=3650))
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(wire_key(key_name).public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


def ra() -> bytes:
    return issued("rsa2048-ra", "Test SCEP RA", 2)


def device() -> bytes:
    return issued("rsa2048-device-1", "device 1", 3)


def ca_der() -> bytes:
    return ca_certificate().public_bytes(serialization.Encoding.DER)


def signed(content: bytes | None = b"content", hash_name: str = "sha256") -> bytes:
    signer = cms.CmsSigner(ra(), wire_key("rsa2048-ra"), hash_name)
    attribute = cms.encode_attribute(_TRANSACTION_ID, _der.encode_tlv(0x13, b"tid-1"))
    return cms.build_signed_data(content, signer, [attribute])


def enveloped(content: bytes = b"secret content", cipher: str = "aes128") -> bytes:
    return cms.build_enveloped_data(content, [cms.CmsRecipient(ra())], cipher)


def write_pem(directory: Path) -> tuple[Path, Path]:
    """The RA certificate and key as PEM files for openssl."""
    certificate = directory / "ra.pem"
    certificate.write_bytes(
        x509.load_der_x509_certificate(ra()).public_bytes(serialization.Encoding.PEM)
    )
    key = directory / "ra.key"
    key.write_bytes((WIRE_VECTORS / "rsa2048-ra.pem").read_bytes())
    return certificate, key


def openssl(*args: str, data: bytes = b"") -> bytes:
    """Run openssl with the legacy provider loaded (single DES lives there in OpenSSL 3)."""
    tool = require_tool("openssl")
    command, *rest = args
    providers = ("-provider", "legacy", "-provider", "default")
    result = subprocess.run(
        [tool, command, *providers, *rest], input=data, capture_output=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


# ---- pyasn1-modules rfc5652 as the oracle for what we build ----


def test_signed_data_decodes_with_pyasn1_as_der() -> None:
    """The SignedData we build is DER that rfc5652 decodes and re-encodes byte for byte."""
    message = signed()
    info, rest = decoder.decode(message, asn1Spec=rfc5652.ContentInfo())
    assert rest == b""
    assert encoder.encode(info) == message
    assert str(info["contentType"]) == "1.2.840.113549.1.7.2"
    data, _ = decoder.decode(info["content"], asn1Spec=rfc5652.SignedData())
    assert int(data["version"]) == 1
    assert bytes(data["encapContentInfo"]["eContent"]) == b"content"
    signer_info = data["signerInfos"][0]
    attributes = {str(a["attrType"]): a for a in signer_info["signedAttrs"]}
    digest = decoder.decode(
        bytes(attributes["1.2.840.113549.1.9.4"]["attrValues"][0]), asn1Spec=rfc5652.MessageDigest()
    )[0]
    assert bytes(digest) == hashlib.sha256(b"content").digest()
    assert str(signer_info["digestAlgorithm"]["algorithm"]) == "2.16.840.1.101.3.4.2.1"
    assert encoder.encode(data["certificates"][0]["certificate"]) == ra()


def test_signed_data_without_content_omits_econtent() -> None:
    """None as content gives an encapContentInfo with no eContent (SCEP FAILURE, PENDING)."""
    info, _ = decoder.decode(signed(None), asn1Spec=rfc5652.ContentInfo())
    data, _ = decoder.decode(info["content"], asn1Spec=rfc5652.SignedData())
    assert not data["encapContentInfo"]["eContent"].isValue
    parsed = cms.parse_signed_data(signed(None))
    assert parsed.content == b""
    assert cms.verify_signed_data(parsed) == ra()


def test_enveloped_data_decodes_with_pyasn1_as_der() -> None:
    """The EnvelopedData we build is DER with one KeyTransRecipientInfo naming the RA."""
    message = enveloped()
    info, rest = decoder.decode(message, asn1Spec=rfc5652.ContentInfo())
    assert rest == b""
    assert encoder.encode(info) == message
    data, _ = decoder.decode(info["content"], asn1Spec=rfc5652.EnvelopedData())
    recipient = data["recipientInfos"][0]["ktri"]
    assert int(recipient["version"]) == 0
    assert encoder.encode(recipient["rid"]["issuerAndSerialNumber"]) == cms.issuer_and_serial(ra())
    algorithm = data["encryptedContentInfo"]["contentEncryptionAlgorithm"]
    assert str(algorithm["algorithm"]) == "2.16.840.1.101.3.4.1.2"
    assert len(bytes(data["encryptedContentInfo"]["encryptedContent"])) == 16


def test_certificates_only_decodes_with_pyasn1() -> None:
    """A certs-only bundle: no signers, no content, the certificates in order."""
    message = cms.build_certificates_only([ca_der(), ra()])
    info, _ = decoder.decode(message, asn1Spec=rfc5652.ContentInfo())
    assert encoder.encode(info) == message
    data, _ = decoder.decode(info["content"], asn1Spec=rfc5652.SignedData())
    assert len(data["signerInfos"]) == 0
    assert [encoder.encode(c["certificate"]) for c in data["certificates"]] == [ca_der(), ra()]
    assert cms.parse_certificates_only(message) == (ca_der(), ra())


# ---- our own round trips ----


@pytest.mark.parametrize("cipher", ["aes128", "aes192", "aes256", "des3", "des"])
def test_enveloped_data_round_trip(cipher: str) -> None:
    """Each cipher decrypts back to the content and reports its name."""
    for content in (b"", b"x", b"y" * 16, b"z" * 1000):
        opened = cms.decrypt_enveloped_data(
            enveloped(content, cipher), ra(), wire_key("rsa2048-ra")
        )
        assert opened == cms.Decrypted(content, cipher)


@pytest.mark.parametrize("hash_name", ["sha1", "sha256", "sha384", "sha512"])
def test_signed_data_round_trip(hash_name: str) -> None:
    """Content and signed attributes come back; the signer is the RA."""
    parsed = cms.parse_signed_data(signed(b"abc", hash_name))
    assert parsed.content == b"abc"
    assert parsed.digest_name == hash_name
    assert parsed.attributes[_TRANSACTION_ID] == _der.encode_tlv(0x13, b"tid-1")
    assert cms.verify_signed_data(parsed) == ra()


def test_signer_must_be_trusted_when_included_certificates_are_ignored() -> None:
    """Without the included certificates, an unknown signer is a CmsSignatureError."""
    parsed = cms.parse_signed_data(signed())
    with pytest.raises(cms.CmsSignatureError, match="no certificate"):
        cms.verify_signed_data(parsed, [device()], use_included=False)
    assert cms.verify_signed_data(parsed, [device(), ra()], use_included=False) == ra()


def test_tampered_content_fails_the_digest() -> None:
    """Changed content no longer matches messageDigest."""
    message = signed(b"original")
    tampered = message.replace(b"original", b"0riginal")
    with pytest.raises(cms.CmsSignatureError, match="messageDigest"):
        cms.verify_signed_data(cms.parse_signed_data(tampered))


def test_tampered_signature_fails() -> None:
    """A flipped bit in the signature is a CmsSignatureError."""
    message = bytearray(signed())
    message[-5] ^= 1
    with pytest.raises(cms.CmsSignatureError, match="does not verify"):
        cms.verify_signed_data(cms.parse_signed_data(bytes(message)))


def test_enveloped_data_for_someone_else() -> None:
    """An envelope without a RecipientInfo for our certificate is a CmsDecryptError."""
    with pytest.raises(cms.CmsDecryptError, match="no KeyTransRecipientInfo"):
        cms.decrypt_enveloped_data(enveloped(), device(), wire_key("rsa2048-device-1"))


def test_enveloped_data_with_a_wrong_key() -> None:
    """The right identifier but another private key does not decrypt."""
    with pytest.raises(cms.CmsDecryptError):
        cms.decrypt_enveloped_data(enveloped(), ra(), wire_key("rsa2048-device-2"))


def _wrap(tag: int, content: bytes, indefinite: bool) -> bytes:
    return bytes((tag, 0x80)) + content + b"\0\0" if indefinite else _der.encode_tlv(tag, content)


def _reassemble(message: bytes, pieces: int, indefinite: bool) -> bytes:
    """Our EnvelopedData with its encryptedContent as a constructed [0] of `pieces` OCTET
    STRINGs (as micromdm sends it), the enclosing headers definite or indefinite (BER)."""
    info, _ = decoder.decode(message, asn1Spec=rfc5652.ContentInfo())
    data, _ = decoder.decode(info["content"], asn1Spec=rfc5652.EnvelopedData())
    content_info = data["encryptedContentInfo"]
    ciphertext = bytes(content_info["encryptedContent"])
    size = -(-len(ciphertext) // pieces)
    chunks = [ciphertext[i : i + size] for i in range(0, len(ciphertext), size)]
    encrypted = _wrap(
        0xA0, b"".join(_der.encode_tlv(_der.OCTET_STRING, c) for c in chunks), indefinite
    )
    inner = (
        encoder.encode(content_info["contentType"])
        + encoder.encode(content_info["contentEncryptionAlgorithm"])
        + encrypted
    )
    body = (
        encoder.encode(data["version"])
        + encoder.encode(data["recipientInfos"])
        + _wrap(_der.SEQUENCE, inner, indefinite)
    )
    envelope = _wrap(_der.SEQUENCE, body, indefinite)
    return _wrap(_der.SEQUENCE, cms.ENVELOPED_DATA + _wrap(0xA0, envelope, indefinite), indefinite)


@pytest.mark.parametrize(("pieces", "indefinite"), [(1, False), (3, False), (2, True)])
def test_constructed_encrypted_content_as_micromdm_sends_it(pieces: int, indefinite: bool) -> None:
    """encryptedContent as a constructed [0] of OCTET STRINGs, lengths definite or not (BER)."""
    message = _reassemble(enveloped(b"piecewise" * 5, "des"), pieces, indefinite)
    opened = cms.decrypt_enveloped_data(message, ra(), wire_key("rsa2048-ra"))
    assert opened == cms.Decrypted(b"piecewise" * 5, "des")


def test_unknown_cipher_is_unsupported() -> None:
    """A content cipher we do not implement (AES-128-GCM here) is a CmsUnsupportedError."""
    gcm = _der.encode_oid("2.16.840.1.101.3.4.1.6")
    message = enveloped().replace(cms.CIPHERS["aes128"].oid, gcm)
    with pytest.raises(cms.CmsUnsupportedError, match=r"2\.16\.840\.1\.101\.3\.4\.1\.6"):
        cms.decrypt_enveloped_data(message, ra(), wire_key("rsa2048-ra"))


def test_limits_on_depth_and_size() -> None:
    """Deep nesting and oversized input end in MalformedCmsError, never RecursionError."""
    deep = b"\x30\x80" * 5000 + b"\0\0" * 5000
    with pytest.raises(cms.MalformedCmsError, match="nested too deeply"):
        cms.parse_signed_data(deep)
    with pytest.raises(cms.MalformedCmsError, match="larger than"):
        cms.parse_signed_data(b"\x30" + bytes(cms.MAX_CMS_BYTES))
    with pytest.raises(cms.MalformedCmsError, match="not bytes"):
        cms.parse_signed_data("text")  # type: ignore[arg-type]


def test_enveloped_data_is_not_signed_data() -> None:
    """A ContentInfo of the wrong type is named in the error."""
    with pytest.raises(cms.MalformedCmsError, match="does not hold SignedData"):
        cms.parse_signed_data(enveloped())


# ---- openssl cms both ways ----


@pytest.mark.server
def test_openssl_verifies_our_signed_data(tmp_path: Path) -> None:
    """`openssl cms -verify -noverify` accepts what we sign and outputs the content."""
    path = tmp_path / "signed.der"
    path.write_bytes(signed(b"for openssl"))
    assert openssl("cms", "-verify", "-noverify", "-inform", "DER", "-in", str(path)) == (
        b"for openssl"
    )


@pytest.mark.server
@pytest.mark.parametrize(("digest", "stream"), [("sha1", False), ("sha512", True)])
def test_we_verify_openssl_signed_data(tmp_path: Path, digest: str, stream: bool) -> None:
    """What `openssl cms -sign` makes (DER, or streamed BER) verifies and yields the content."""
    certificate, key = write_pem(tmp_path)
    plain = tmp_path / "plain"
    plain.write_bytes(b"signed by openssl")
    message = openssl(
        "cms", "-sign", "-binary", "-nodetach", "-outform", "DER", "-md", digest,
        *(["-stream"] if stream else []),
        "-in", str(plain), "-signer", str(certificate), "-inkey", str(key),
    )  # fmt: skip
    assert message[1] == (0x80 if stream else 0x82)
    parsed = cms.parse_signed_data(message)
    assert (parsed.content, parsed.digest_name) == (b"signed by openssl", digest)
    assert cms.verify_signed_data(parsed, [ra()], use_included=False) == ra()


@pytest.mark.server
@pytest.mark.parametrize("cipher", ["aes128", "des3", "des"])
def test_openssl_decrypts_our_enveloped_data(tmp_path: Path, cipher: str) -> None:
    """`openssl cms -decrypt` opens our envelopes for each cipher we send."""
    certificate, key = write_pem(tmp_path)
    path = tmp_path / "enveloped.der"
    path.write_bytes(enveloped(b"for openssl " * 3, cipher))
    opened = openssl(
        "cms", "-decrypt", "-inform", "DER", "-in", str(path),
        "-recip", str(certificate), "-inkey", str(key),
    )  # fmt: skip
    assert opened == b"for openssl " * 3


@pytest.mark.server
@pytest.mark.parametrize(
    ("flag", "cipher"),
    [("-aes128", "aes128"), ("-aes192", "aes192"), ("-aes256", "aes256"), ("-des3", "des3"),
     ("-des", "des")],
)  # fmt: skip
def test_we_decrypt_openssl_enveloped_data(tmp_path: Path, flag: str, cipher: str) -> None:
    """`openssl cms -encrypt` envelopes open here, and name their cipher."""
    certificate, _ = write_pem(tmp_path)
    plain = tmp_path / "plain"
    plain.write_bytes(b"encrypted by openssl")
    message = openssl(
        "cms", "-encrypt", "-binary", "-outform", "DER", "-in", str(plain), flag, str(certificate)
    )
    opened = cms.decrypt_enveloped_data(message, ra(), wire_key("rsa2048-ra"))
    assert opened == cms.Decrypted(b"encrypted by openssl", cipher)


@pytest.mark.server
def test_openssl_reads_our_certificates_only(tmp_path: Path) -> None:
    """`openssl pkcs7 -print_certs` lists the bundle's certificates."""
    path = tmp_path / "bundle.der"
    path.write_bytes(cms.build_certificates_only([ca_der(), ra()]))
    listing = openssl("pkcs7", "-inform", "DER", "-in", str(path), "-print_certs", "-noout")
    assert b"subject=CN = Test SCEP CA" in listing
    assert b"subject=CN = Test SCEP RA" in listing


# ---- mutation: only the typed error or a correct parse ----


@st.composite
def mutated(draw: st.DrawFn, message: bytes) -> bytes:
    """`message` truncated, with a byte flipped, or with bytes inserted."""
    kind = draw(st.sampled_from(["truncate", "flip", "insert"]))
    at = draw(st.integers(0, len(message) - 1))
    if kind == "truncate":
        return message[:at]
    if kind == "flip":
        return message[:at] + bytes((message[at] ^ draw(st.integers(1, 255)),)) + message[at + 1 :]
    return message[:at] + draw(st.binary(min_size=1, max_size=4)) + message[at:]


_SIGNED = signed(b"mutate me")
_ENVELOPED = enveloped(b"mutate me", "aes128")
_BUNDLE = cms.build_certificates_only([ca_der(), ra()])
_SETTINGS = settings(
    max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@_SETTINGS
@given(mutated(_SIGNED))
def test_mutated_signed_data_raises_only_the_typed_error(message: bytes) -> None:
    """Parse and verify either succeed on the original content or raise MalformedCmsError."""
    try:
        parsed = cms.parse_signed_data(message)
        cms.verify_signed_data(parsed)
    except cms.MalformedCmsError:
        return
    assert parsed.content == b"mutate me"


@_SETTINGS
@given(mutated(_ENVELOPED))
def test_mutated_enveloped_data_raises_only_the_typed_error(message: bytes) -> None:
    """Decryption either succeeds or raises MalformedCmsError (a flipped block decrypts to
    other bytes: CBC has no integrity, the SignedData around it does)."""
    try:
        cms.decrypt_enveloped_data(message, ra(), wire_key("rsa2048-ra"))
    except cms.MalformedCmsError:
        return


@_SETTINGS
@given(mutated(_BUNDLE))
def test_mutated_certificates_only_raises_only_the_typed_error(message: bytes) -> None:
    """A damaged bundle parses to certificates or raises MalformedCmsError."""
    try:
        certificates = cms.parse_certificates_only(message)
    except cms.MalformedCmsError:
        return
    assert all(isinstance(c, bytes) for c in certificates)


@_SETTINGS
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_the_typed_error(message: bytes) -> None:
    """Arbitrary bytes never raise anything but MalformedCmsError."""
    for parse in (cms.parse_signed_data, cms.parse_certificates_only):
        with contextlib.suppress(cms.MalformedCmsError):
            parse(message)
    with contextlib.suppress(cms.MalformedCmsError):
        cms.decrypt_enveloped_data(message, ra(), wire_key("rsa2048-ra"))


def test_enveloped_data_for_two_recipients() -> None:
    """Enveloped to CA and RA at once (scepclient without -ca-fingerprint): each opens it."""
    message = cms.build_enveloped_data(
        b"both", [cms.CmsRecipient(device()), cms.CmsRecipient(ra())], "des3"
    )
    for certificate, key in ((device(), "rsa2048-device-1"), (ra(), "rsa2048-ra")):
        opened = cms.decrypt_enveloped_data(message, certificate, wire_key(key))
        assert opened == cms.Decrypted(b"both", "des3")


@pytest.mark.server
def test_signer_and_recipient_named_by_key_identifier(tmp_path: Path) -> None:
    """openssl's -keyid names signer and recipient by subjectKeyIdentifier ([0]): both work."""
    certificate, key = write_pem(tmp_path)
    plain = tmp_path / "plain"
    plain.write_bytes(b"by key id")
    signed_message = openssl(
        "cms", "-sign", "-binary", "-nodetach", "-keyid", "-outform", "DER",
        "-in", str(plain), "-signer", str(certificate), "-inkey", str(key),
    )  # fmt: skip
    parsed = cms.parse_signed_data(signed_message)
    assert parsed.signer_id.startswith(b"\x80")
    assert cms.verify_signed_data(parsed, [device(), ra()], use_included=False) == ra()
    enveloped_message = openssl(
        "cms", "-encrypt", "-binary", "-keyid", "-outform", "DER", "-aes128",
        "-in", str(plain), str(certificate),
    )  # fmt: skip
    opened = cms.decrypt_enveloped_data(enveloped_message, ra(), wire_key("rsa2048-ra"))
    assert opened.content == b"by key id"
