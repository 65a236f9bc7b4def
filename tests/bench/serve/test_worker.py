"""bench.serve.worker: what the CA asks of requests (EST csrattrs) per profile."""

from __future__ import annotations

import pytest

from bench.profile import load_profile
from bench.serve.worker import csr_attributes
from engine.service import SubjectPolicy
from engine.wire.est import CsrAttribute, decode_csrattrs, encode_csrattrs

SAN = CsrAttribute("1.2.840.113549.1.9.14", (bytes.fromhex("0603551d11"),))


@pytest.mark.parametrize(
    ("overrides", "policy", "expected"),
    [
        (
            ["device.key='p256'"],
            SubjectPolicy.MATCH,
            (
                CsrAttribute("1.2.840.10045.2.1", (bytes.fromhex("06082a8648ce3d030107"),)),
                CsrAttribute("1.2.840.10045.4.3.2"),
                SAN,
            ),
        ),
        (
            ["device.key='p384'", "ca.hash='sha384'"],
            SubjectPolicy.MATCH,
            (
                CsrAttribute("1.2.840.10045.2.1", (bytes.fromhex("06052b81040022"),)),
                CsrAttribute("1.2.840.10045.4.3.3"),
                SAN,
            ),
        ),
        (
            ["device.key='rsa2048'", "ca.hash='sha512'"],
            SubjectPolicy.DIRECTORY,
            (CsrAttribute("1.2.840.113549.1.1.1"), CsrAttribute("1.2.840.113549.1.1.13")),
        ),
        (["device.key='ed25519'"], SubjectPolicy.DIRECTORY, (CsrAttribute("1.3.101.112"),)),
    ],
)
def test_csr_attributes_follow_the_profile(
    overrides: list[str], policy: SubjectPolicy, expected: tuple[CsrAttribute, ...]
) -> None:
    """Key type (an EC key with its curve, RFC 7030 A.4), signature algorithm under the profile's
    hash, and extensionRequest subjectAltName only when the CA copies the requested SAN; the
    encoding decodes to the same."""
    found = csr_attributes(load_profile("smoke", overrides), policy)
    assert found == expected
    assert decode_csrattrs(encode_csrattrs(found)) == expected
