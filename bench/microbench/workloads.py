"""Fixed engine workloads for micro-benchmarks: the CA side of one enrollment and its raw bound.

A `CaWorkload` holds, built off the clock, an engine replica and a ring of ready-made requests
from distinct device keys. Its callables each do one unit of work:

- `ca_side`: what the servers do for one enrollment: parse and record the request's key
  (enterprise server), verify it and apply policy, issue, publish (CA), retrieve (connection
  service), and match the certificate's key with the stored one (enterprise server).
- `raw_bound`: the crypto that cannot be avoided: load the request's public key, verify its
  signature, one raw signature with the CA key over a certificate-sized message.
- `naive`: the same server-side work with cryptography's builders and parsers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding

from bench.run.corpus import load_keys
from engine.certificate import CertificateTemplate, build_certificate_with_builder
from engine.identity import User
from engine.keys import (
    KeyFamily,
    PrivateKey,
    Signer,
    SubjectKey,
    hash_algorithm,
    key_spec,
    load_private_key,
)
from engine.population import directory_entry, simulated_enrollee
from engine.request import (
    SAN_OID_DER,
    RequestContent,
    RequestTemplate,
    build_request_with_builder,
    parse_request,
)
from engine.system import CAMaterial, EngineConfig, EnrollmentSystem

RING = 64
CA_SEED = -1  # the runner's CA keys
DEVICE_SEED = -2  # apart from any profile's device keys


def run_ready(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Drive a coroutine that never suspends to completion, without an event loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("the coroutine suspended; this workload must not wait")


def corpus_keys(name: str, seed: int, count: int) -> list[PrivateKey]:
    """Workload keys from the key corpus (EC/Ed25519 derived, RSA made once and cached)."""
    return [load_private_key(der) for der in load_keys(name, seed, count)]


@dataclass(frozen=True, slots=True)
class _Prepared:
    """One ready request, with what the raw bound and naive path need from it."""

    device_id: str
    user: User
    der: bytes
    subject: bytes
    key: SubjectKey
    san: bytes | None
    info: bytes
    signature: bytes
    loaded: x509.CertificateSigningRequest


class CaWorkload:
    """An engine replica plus a ring of requests; see the module docstring."""

    def __init__(self, device_key: str = "p256", ca_key: str = "p256", hash_name: str = "sha256"):
        self.config = EngineConfig(device_key=device_key, ca_key=ca_key, hash_name=hash_name)
        self.material = CAMaterial.create(self.config, corpus_keys(ca_key, CA_SEED, 2))
        enrollees = [simulated_enrollee(i, 1) for i in range(RING)]
        self.system = EnrollmentSystem(
            self.config, self.material, [directory_entry(e, 1) for e in enrollees]
        )
        self.device_signers = [
            Signer(key, hash_name) for key in corpus_keys(device_key, DEVICE_SEED, RING)
        ]
        template = RequestTemplate(key_spec(device_key).family)
        self.prepared = [
            self._prepare(e.user, signer, template)
            for e, signer in zip(enrollees, self.device_signers, strict=True)
        ]
        self._ring = itertools.cycle(self.prepared)
        chain = self.material.chain()
        self._issuer = chain.issuing
        self._ca_signer = Signer(chain.private_issuing_key(), hash_name)
        self._tbs = self._sample_tbs()
        self._load_key, self._verify = _raw_primitives(device_key, hash_name)
        self._family = key_spec(device_key).family
        self._certificates = CertificateTemplate(
            self._issuer, self._ca_signer, self._family, 86_400
        )

    @staticmethod
    def _prepare(user: User, signer: Signer, template: RequestTemplate) -> _Prepared:
        der = template.build(signer, RequestContent(user.dn, user.email, user.upn))
        parsed = parse_request(der)
        san = parsed.extensions.get(SAN_OID_DER)
        return _Prepared(
            f"device-{user.user_id}",
            user,
            der,
            parsed.subject,
            parsed.key,
            None if san is None else san[1],
            parsed.info,
            parsed.signature,
            x509.load_der_x509_csr(der),
        )

    def _sample_tbs(self) -> bytes:
        """A real TBSCertificate, so the raw bound signs a message of the size the CA signs."""
        parsed = parse_request(self.prepared[0].der)
        certificate = CertificateTemplate(
            self._issuer, self._ca_signer, key_spec(self.config.device_key).family, 86_400
        ).issue(2**127, 1_790_000_000, parsed.subject, parsed.key, None)
        return x509.load_der_x509_certificate(certificate).tbs_certificate_bytes

    def ca_side(self) -> None:
        """One enrollment's server-side work through the engine."""
        run_ready(self._ca_side(next(self._ring)))

    async def _ca_side(self, item: _Prepared) -> None:
        system = self.system
        request = await system.enterprise.relay_request(item.device_id, item.der)
        issued = await system.authority.process(item.device_id, request, item.user, _ignore)
        certificate = await system.connection.retrieve(issued)
        await system.enterprise.check_certificate(item.device_id, certificate)

    def raw_bound(self) -> None:
        """Load the request's key, verify its signature, sign once with the CA key."""
        item = next(self._ring)
        self._verify(self._load_key(item.key.spki), item.signature, item.info)
        self._ca_signer.sign(self._tbs)

    def naive(self) -> None:
        """The same server-side work with cryptography's parsers and builders."""
        item = next(self._ring)
        request = x509.load_der_x509_csr(item.der)
        if not request.is_signature_valid:
            raise RuntimeError("request signature does not verify")
        certificate_der = build_certificate_with_builder(
            self._issuer,
            self._ca_signer,
            key_spec(self.config.device_key).family,
            86_400,
            x509.random_serial_number(),
            1_790_000_000,
            request,
        )
        certificate = x509.load_der_x509_certificate(certificate_der)
        stored = request.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        issued_key = certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if issued_key != stored:
            raise RuntimeError("key mismatch")

    def certificate_template(self) -> None:
        """Issue one certificate on the template path (request already parsed)."""
        item = next(self._ring)
        self._certificates.issue(2**127 + 1, 1_790_000_000, item.subject, item.key, item.san)

    def certificate_builder(self) -> None:
        """Issue the same certificate on the builder path (request already loaded)."""
        item = next(self._ring)
        build_certificate_with_builder(
            self._issuer,
            self._ca_signer,
            self._family,
            86_400,
            2**127 + 1,
            1_790_000_000,
            item.loaded,
        )

    def request_template(self) -> None:
        """Build one request on the template path."""
        item = next(self._ring)
        signer = self.device_signers[0]
        RequestTemplate(signer.algorithm.family).build(
            signer, RequestContent(item.user.dn, item.user.email, item.user.upn)
        )

    def request_builder(self) -> None:
        """Build one request on the builder path."""
        item = next(self._ring)
        build_request_with_builder(
            self.device_signers[0], RequestContent(item.user.dn, item.user.email, item.user.upn)
        )

    def close(self) -> None:
        self.system.close()


def _ignore(_status: str) -> None:
    """Status updates are not part of the CA-side work."""


def _raw_primitives(
    device_key: str, hash_name: str
) -> tuple[Callable[[bytes], Any], Callable[[Any, bytes, bytes], None]]:
    """The cheapest key loader and a verifier with ready parameters, for one key type.

    EC and Ed25519 keys load from the point at the end of the SPKI, as the engine does.
    """
    spec = key_spec(device_key)
    if spec.family is KeyFamily.EC:
        curve = ec.SECP256R1() if spec.bits == 256 else ec.SECP384R1()
        point = 1 + 2 * ((spec.bits + 7) // 8)
        ecdsa = ec.ECDSA(hash_algorithm(hash_name))
        return (
            lambda spki: ec.EllipticCurvePublicKey.from_encoded_point(curve, spki[-point:]),
            lambda key, signature, data: key.verify(signature, data, ecdsa),
        )
    if spec.family is KeyFamily.ED25519:
        return (
            lambda spki: ed25519.Ed25519PublicKey.from_public_bytes(spki[-32:]),
            lambda key, signature, data: key.verify(signature, data),
        )
    pkcs1, digest = padding.PKCS1v15(), hash_algorithm(hash_name)
    return (
        serialization.load_der_public_key,
        lambda key, signature, data: key.verify(signature, data, pkcs1, digest),
    )
