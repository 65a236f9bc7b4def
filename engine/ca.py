"""The certification authority: its hierarchy, its issuance policy, and issuance itself.

A CA hierarchy (root, optional intermediates, issuing CA) is built once, off the clock, with
cryptography's builders; end-entity issuance then runs from a `CertificateTemplate` with one raw
signature per certificate.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from engine import _der
from engine.approval import AdministratorPool
from engine.certificate import CertificateTemplate
from engine.errors import (
    DuplicateSanError,
    DuplicateSerialError,
    EmptySanError,
    SanNotAllowedError,
    SubjectMismatchError,
    UnsupportedKeyError,
)
from engine.identity import (
    User,
    decode_alternative_names,
    describe_name,
    general_name_elements,
)
from engine.keys import (
    CaSigner,
    KeyFamily,
    KeySpec,
    PrivateKey,
    PublicKey,
    Signer,
    family_of,
    hash_algorithm,
)
from engine.request import SAN_OID_DER, ParsedRequest, verify_request
from engine.stores import Directory


@dataclass(frozen=True, slots=True)
class IssuancePolicy:
    """What a CA profile allows: key types (RSA below 2048 bits never)."""

    allowed_keys: frozenset[str]


@dataclass(frozen=True, slots=True)
class CAChain:
    """A CA hierarchy: certificates root first, issuing CA last, and the issuing CA's key."""

    certificates: tuple[x509.Certificate, ...]
    issuing_key: PrivateKey | None = field(repr=False)  # None: held in a token (a CaSigner)

    @property
    def issuing(self) -> x509.Certificate:
        return self.certificates[-1]

    def private_issuing_key(self) -> PrivateKey:
        """The issuing key in memory; ValueError when it is held in a token."""
        if self.issuing_key is None:
            raise ValueError("the issuing CA's key is in a token: sign through its signer")
        return self.issuing_key

    def pkcs7(self) -> bytes:
        """The chain as a PKCS #7 certs-only bundle, DER (RFC 2315; what step 8 sends)."""
        return pkcs7.serialize_certificates(list(self.certificates), serialization.Encoding.DER)


def build_hierarchy(
    profile_id: str,
    keys: Sequence[PrivateKey],
    hash_name: str | None,
    now: datetime,
    issuing_public: PublicKey | None = None,
) -> CAChain:
    """Build root, intermediates and issuing CA from `keys` (root first; at least two keys).

    `issuing_public`: the issuing CA's key is in a token; `keys` are then the root and the
    intermediates only, and the chain holds no issuing private key."""
    publics: list[PublicKey] = [key.public_key() for key in keys]
    if issuing_public is not None:
        publics.append(issuing_public)
    if len(publics) < 2:
        raise ValueError("a CA hierarchy needs a root key and an issuing key")
    certificates: list[x509.Certificate] = []
    for depth, public in enumerate(publics):
        last = len(publics) - 1
        role = "Root" if depth == 0 else ("Issuing" if depth == last else "Intermediate")
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "enrollbench"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{profile_id} {role} CA {depth}"),
            ]
        )
        parent_key = keys[depth - 1] if depth else keys[0]
        issuer = certificates[-1].subject if certificates else name
        path_length = last - depth  # CA certificates that may follow (RFC 5280 4.2.1.9)
        certificates.append(
            _sign_ca_certificate(name, issuer, public, parent_key, path_length, hash_name, now)
        )
    return CAChain(tuple(certificates), None if issuing_public is not None else keys[-1])


def _sign_ca_certificate(
    name: x509.Name,
    issuer: x509.Name,
    public: PublicKey,
    parent_key: PrivateKey,
    path_length: int,
    hash_name: str | None,
    now: datetime,
) -> x509.Certificate:
    """One CA certificate (RFC 5280 4.2.1.9 basic constraints, 4.2.1.3 keyCertSign)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(parent_key.public_key()),
            critical=False,
        )
    )
    digest = hash_algorithm(hash_name) if family_of(parent_key) is not KeyFamily.ED25519 else None
    return builder.sign(parent_key, digest)


# Draws of a serial per enrollment before a duplicate fails it (a second draw colliding too
# would mean the random source is broken).
_SERIAL_DRAWS = 3


class Issued(NamedTuple):
    """A certificate the CA issued and published: what step 11's notification carries.

    A NamedTuple: immutable, and cheap to make on the hot path.
    """

    serial: int
    dn: str
    certificate: bytes


class CertificationAuthority:
    """One CA profile's issuing CA: checks requests, waits for approval if asked, issues."""

    def __init__(
        self,
        profile_id: str,
        chain: CAChain,
        hash_name: str | None,
        device_family: KeyFamily,
        policy: IssuancePolicy,
        validity_seconds: int,
        directory: Directory,
        wall_clock: Callable[[], float],
        approvals: AdministratorPool | None = None,
        signer: CaSigner | None = None,
    ) -> None:
        """`signer`: the issuing CA's key where it is not in memory (a PKCS #11 token); it
        must hold the key of the chain's issuing certificate."""
        self.profile_id = profile_id
        self.directory = directory
        self.chain = chain
        self.chain_der = chain.pkcs7()
        self.policy = policy
        self.approvals = approvals
        self._wall_clock = wall_clock
        if signer is None:
            signer = Signer(chain.private_issuing_key(), hash_name)
        issuing_spki = chain.issuing.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if signer.spki != issuing_spki:
            raise ValueError("the CA signer's key is not the issuing certificate's key")
        self._template = CertificateTemplate(chain.issuing, signer, device_family, validity_seconds)
        self.issued = 0

    async def process(
        self, device_id: str, request: ParsedRequest, user: User, notify: Callable[[str], None]
    ) -> Issued:
        """Step 11: check, wait for an administrator if the profile says so, issue, publish."""
        self.check(request, user)
        if self.approvals is not None:
            notify("pending-approval")
            await self.approvals.review(device_id)
        issued = self.issue(request, user)
        try:  # a try block costs nothing on the path that does not raise (CPython 3.11)
            await self.directory.publish(issued.dn, issued.serial, issued.certificate)
        except DuplicateSerialError:
            issued = await self._redraw(request, user)
        notify("issued")
        return issued

    async def _redraw(self, request: ParsedRequest, user: User) -> Issued:
        """Issue under fresh serials until the directory takes one (RFC 5280 4.1.2.2).

        Serials stay unique through the directory's unique serial, not a set kept in this
        process. A duplicate on the last draw fails the enrollment.
        """
        for _ in range(_SERIAL_DRAWS - 2):
            issued = self.issue(request, user)
            try:
                await self.directory.publish(issued.dn, issued.serial, issued.certificate)
            except DuplicateSerialError:
                continue
            return issued
        issued = self.issue(request, user)
        await self.directory.publish(issued.dn, issued.serial, issued.certificate)
        return issued

    async def fetch_chain(self) -> bytes:
        """The chain as the connection service fetches it on a cache miss."""
        return self.chain_der

    def check(self, request: ParsedRequest, user: User) -> KeySpec:
        """Proof of possession, then policy: key type, subject, alternative names."""
        _, spec = verify_request(request)
        if spec.name not in self.policy.allowed_keys:
            raise UnsupportedKeyError(
                f"key type {spec.name} is not allowed by CA profile {self.profile_id!r}"
            )
        if request.subject != user.dn.der:
            raise SubjectMismatchError(user.dn.text, describe_name(request.subject))
        self._check_alternative_names(request, user)
        return spec

    def _check_alternative_names(self, request: ParsedRequest, user: User) -> None:
        """A requested SAN holds at least one name, each once, each one of the user's own.

        RFC 5280 4.2.1.6: GeneralNames is SIZE (1..MAX), so an empty SAN is never issued; a
        name listed twice is refused rather than silently merged.
        """
        entry = request.extensions.get(SAN_OID_DER)
        if entry is None:
            return
        names = general_name_elements(entry[1])
        count = len(names)
        if not count:
            raise EmptySanError(f"the subjectAltName requested for {user.user_id!r} is empty")
        # Two names (e-mail and UPN) is the usual request: one comparison, not a set (~100 ns).
        if (names[0] == names[1]) if count == 2 else (count > 2 and len(set(names)) != count):
            raise DuplicateSanError(
                f"the subjectAltName requested for {user.user_id!r} lists a name twice"
            )
        for name in names:
            if name not in user.general_names:
                raise SanNotAllowedError(
                    f"alternative name {_describe_general_name(name)} is not allowed for "
                    f"{user.user_id!r}"
                )

    def issue(self, request: ParsedRequest, user: User) -> Issued:
        """Issue a certificate with a fresh positive 128-bit random serial (RFC 5280 4.1.2.2).

        Nothing is remembered here, so memory stays flat however long the run: 128 random bits
        collide with probability about n**2 / 2**129 (1e-21 after a billion certificates), and
        the directory's unique serial refuses a collision at publish, and `process` draws again.
        """
        serial = 0
        while not serial:  # serials are positive
            serial = int.from_bytes(os.urandom(16), "big")
        san = request.extensions.get(SAN_OID_DER)
        certificate = self._template.issue(
            serial,
            int(self._wall_clock()),
            request.subject,
            request.key,
            None if san is None else san[1],
        )
        self.issued += 1
        return Issued(serial, user.dn.text, certificate)


def _describe_general_name(name: bytes) -> str:
    """Render one GeneralName for an error message."""
    names = decode_alternative_names(_der.encode_tlv(_der.SEQUENCE, name))
    if names.emails or names.upns:
        return repr((names.emails + names.upns)[0])
    return f"of kind [{names.other_kinds[0] & 0x1F}]"
