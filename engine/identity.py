"""Users, their distinguished names, and the subject alternative names they may hold.

A user's DN is looked up as text (RFC 4514) and carried with its DER encoding (RFC 5280 4.1.2.4),
computed once when the directory is seeded, so the hot path compares bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography import x509

from engine import _der
from engine.errors import MalformedDerError

# Microsoft's user principal name otherName (used by Windows enterprise CAs for smart-card logon).
UPN_OID = "1.3.6.1.4.1.311.20.2.3"
_UPN_OID_DER = _der.encode_oid(UPN_OID)

# GeneralName CHOICE tags (RFC 5280 4.2.1.6): otherName [0] constructed, rfc822Name [1] primitive.
_OTHER_NAME = 0xA0
_RFC822_NAME = 0x81
_EXPLICIT_0 = 0xA0


@dataclass(frozen=True, slots=True)
class DistinguishedName:
    """A DN as text (RFC 4514) and as the DER Name that requests and certificates carry."""

    text: str
    der: bytes

    @classmethod
    def from_text(cls, text: str) -> DistinguishedName:
        """Parse an RFC 4514 string and encode it once."""
        try:
            name = x509.Name.from_rfc4514_string(text)
        except ValueError as exc:
            raise MalformedDerError(f"not an RFC 4514 distinguished name: {text!r}") from exc
        return cls(name.rfc4514_string(), name.public_bytes())


@dataclass(frozen=True, slots=True)
class User:
    """A directory user: who may enroll, under which DN, with which alternative names.

    `general_names` holds the DER GeneralName of each name the user may have in a certificate;
    DER is canonical, so policy checks compare bytes.
    """

    user_id: str
    dn: DistinguishedName
    email: str
    upn: str
    alternative_names: bytes = field(default=b"", repr=False, compare=False)
    general_names: frozenset[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # `alternative_names` is the SAN extnValue a directory stored; made here when absent.
        names = self.alternative_names or encode_alternative_names(self.email, self.upn)
        object.__setattr__(self, "alternative_names", names)
        object.__setattr__(self, "general_names", frozenset(general_name_elements(names)))


@dataclass(frozen=True, slots=True)
class AlternativeNames:
    """The subject alternative names found in a request, by kind."""

    emails: tuple[str, ...]
    upns: tuple[str, ...]
    other_kinds: tuple[int, ...]


def encode_alternative_names(email: str, upn: str) -> bytes:
    """Encode GeneralNames {rfc822Name, otherName UPN} as a SAN extnValue (RFC 5280 4.2.1.6)."""
    upn_value = _der.encode_tlv(_EXPLICIT_0, _der.encode_tlv(_der.UTF8_STRING, upn.encode()))
    names = _der.encode_tlv(_RFC822_NAME, email.encode("ascii")) + _der.encode_tlv(
        _OTHER_NAME, _UPN_OID_DER + upn_value
    )
    return _der.encode_tlv(_der.SEQUENCE, names)


def general_name_elements(value: bytes) -> list[bytes]:
    """Split a SAN extnValue (GeneralNames) into the DER of each GeneralName."""
    return _der.sequence_elements(value, _der.SEQUENCE)


def decode_alternative_names(value: bytes) -> AlternativeNames:
    """Decode a SAN extnValue into e-mail addresses, UPNs and the tags of any other names."""
    start, end = _der.read_whole(value, _der.SEQUENCE)
    emails: list[str] = []
    upns: list[str] = []
    others: list[int] = []
    for tag, _, content, stop in _der.split_children(value, start, end):
        if tag == _RFC822_NAME:
            emails.append(_text(value[content:stop], "ascii"))
        elif tag == _OTHER_NAME and value[content:stop].startswith(_UPN_OID_DER):
            upns.append(_decode_upn(value, content + len(_UPN_OID_DER), stop))
        else:
            others.append(tag)
    return AlternativeNames(tuple(emails), tuple(upns), tuple(others))


def _decode_upn(data: bytes, offset: int, limit: int) -> str:
    """Read `[0] EXPLICIT UTF8String` of a UPN otherName."""
    start, end = _der.expect(data, offset, _EXPLICIT_0, limit)
    if end != limit:
        raise MalformedDerError("trailing bytes in otherName", end)
    inner_start, inner_end = _der.expect(data, start, _der.UTF8_STRING, end)
    return _text(data[inner_start:inner_end], "utf-8")


def _text(raw: bytes, encoding: str) -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise MalformedDerError(f"name is not valid {encoding}") from exc


_ATTRIBUTE_NAMES = {
    "2.5.4.3": "CN",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.1": "UID",
    "1.2.840.113549.1.9.1": "E",
}


def describe_name(der: bytes) -> str:
    """Render a DER Name as RFC 4514-like text for messages; hex when it does not parse."""
    try:
        start, end = _der.read_whole(der, _der.SEQUENCE)
        parts = []
        for _, _, rdn_start, rdn_end in _der.split_children(der, start, end):
            for _, _, atv_start, atv_end in _der.split_children(der, rdn_start, rdn_end):
                oid_start, oid_end = _der.expect(der, atv_start, _der.OID, atv_end)
                _, value_start, value_end = _der.read_header(der, oid_end)
                oid = _der.decode_oid(der[oid_start:oid_end])
                value = der[value_start:value_end].decode("utf-8", "replace")
                parts.append(f"{_ATTRIBUTE_NAMES.get(oid, oid)}={value}")
        return ",".join(reversed(parts))
    except MalformedDerError:
        return der.hex()
