"""The small subset of DER (X.690) that the request and certificate templates need.

Only definite lengths and single-byte tags occur in RFC 2986 and RFC 5280 structures, so the
reader refuses anything else. Every malformed input raises `MalformedDerError`.
"""

from __future__ import annotations

from collections.abc import Callable

from engine.errors import MalformedDerError

SEQUENCE = 0x30
SET = 0x31
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
NULL = 0x05
OID = 0x06
UTF8_STRING = 0x0C
UTC_TIME = 0x17
GENERALIZED_TIME = 0x18
BOOLEAN = 0x01


def encode_length(length: int) -> bytes:
    """Encode a definite length (X.690 8.1.3): short form below 128, long form otherwise."""
    if length < 0x80:
        return bytes((length,))
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def encode_tlv(tag: int, content: bytes) -> bytes:
    """Encode one tag-length-value element (lengths up to 64 KiB inline: the hot path)."""
    length = len(content)
    if length < 0x80:
        return bytes((tag, length)) + content
    if length < 0x100:
        return bytes((tag, 0x81, length)) + content
    if length < 0x10000:
        return bytes((tag, 0x82, length >> 8, length & 0xFF)) + content
    return bytes((tag,)) + encode_length(length) + content


def encode_integer(value: int) -> bytes:
    """Encode a non-negative INTEGER in minimal two's complement (X.690 8.3)."""
    if value < 0:
        raise ValueError("only non-negative integers are encoded here")
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")
    return encode_tlv(INTEGER, body)


def encode_oid(dotted: str) -> bytes:
    """Encode an OBJECT IDENTIFIER from dotted form (X.690 8.19)."""
    arcs = [int(part) for part in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] >= 40):
        raise ValueError(f"not an object identifier: {dotted!r}")
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        rest = arc >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        body.extend(reversed(chunk))
    return encode_tlv(OID, bytes(body))


def read_header(data: bytes, offset: int, limit: int | None = None) -> tuple[int, int, int]:
    """Read the tag and length at `offset` of an element that must end by `limit` (the end of
    `data` when None); return (tag, content start, content end)."""
    if limit is None:
        limit = len(data)
    if limit - offset < 2:
        raise MalformedDerError("truncated element header", offset)
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise MalformedDerError("multi-byte tags do not occur in these structures", offset)
    length = data[offset + 1]
    start = offset + 2
    if length >= 0x80:
        count = length & 0x7F
        if count == 0 or count > 4:
            raise MalformedDerError("indefinite or oversized length", offset)
        if limit - start < count:
            raise MalformedDerError("truncated length", offset)
        length = int.from_bytes(data[start : start + count], "big")
        if length < 0x80 or data[start] == 0:
            raise MalformedDerError("length not in minimal form", offset)
        start += count
    if length > limit - start:
        raise MalformedDerError("element runs past the end of its container", offset)
    return tag, start, start + length


def expect(data: bytes, offset: int, tag: int, limit: int) -> tuple[int, int]:
    """Read an element that must carry `tag` and end by `limit`; return (content start, end)."""
    # Lengths below 64 KiB are decoded inline: every element of a request or an end-entity
    # certificate has one, and a call to read_header costs as much as the rest of this function.
    if offset + 4 <= limit <= len(data) and data[offset] == tag:
        first = data[offset + 1]
        if first < 0x80:
            start, end = offset + 2, offset + 2 + first
        elif first == 0x81 and data[offset + 2] >= 0x80:
            start, end = offset + 3, offset + 3 + data[offset + 2]
        elif first == 0x82 and data[offset + 2]:
            start = offset + 4
            end = start + (data[offset + 2] << 8 | data[offset + 3])
        else:
            start = end = limit + 1
        if end <= limit:
            return start, end
    found, start, end = read_header(data, offset)
    if found != tag:
        raise MalformedDerError(f"expected tag 0x{tag:02x}, found 0x{found:02x}", offset)
    if end > limit:
        raise MalformedDerError("element runs past the end of its container", offset)
    return start, end


def skip(data: bytes, offset: int, count: int, limit: int) -> int:
    """Step over `count` consecutive elements; return the offset after the last."""
    for _ in range(count):
        _, _, end = read_header(data, offset)
        if end > limit:
            raise MalformedDerError("element runs past the end of its container", offset)
        offset = end
    return offset


def sequence_elements(data: bytes, tag: int) -> list[bytes]:
    """The child elements (as DER) of the one element, carrying `tag`, that fills `data`."""
    start, end = read_whole(data, tag)
    children = []
    while start < end:
        _, _, stop = read_header(data, start)
        if stop > end:
            raise MalformedDerError("child runs past the end of its parent", start)
        children.append(data[start:stop])
        start = stop
    return children


def split_children(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """List the children of a constructed element as (tag, offset, content start, end)."""
    children = []
    offset = start
    while offset < end:
        tag, content, stop = read_header(data, offset)
        if stop > end:
            raise MalformedDerError("child runs past the end of its parent", offset)
        children.append((tag, offset, content, stop))
        offset = stop
    return children


def read_whole(data: bytes, tag: int) -> tuple[int, int]:
    """Read one element that must fill `data` exactly; return its content bounds."""
    start, end = expect(data, 0, tag, len(data))
    if end != len(data):
        raise MalformedDerError("trailing bytes after the outer element", end)
    return start, end


def decode_oid(body: bytes) -> str:
    """Decode the content bytes of an OBJECT IDENTIFIER to dotted form (X.690 8.19)."""
    if not body or body[-1] & 0x80:
        raise MalformedDerError("truncated object identifier")
    arcs: list[int] = []
    value = 0
    for byte in body:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in [first, arcs[0] - 40 * first, *arcs[1:]])


# ---- Strict DER (X.690 10, 11) for bytes that arrive from devices: the request walk ----
# engine/_derc.c has the same checks in C; both raise the same message at the same offset.

_PRINTABLE = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?"
)
_MAX_DEPTH = 16


def strict_expect(data: bytes, offset: int, tag: int, limit: int) -> tuple[int, int]:
    """Read an element that must carry `tag` and end by `limit`: (content start, end)."""
    found, start, end = read_header(data, offset, limit)
    if found != tag:
        raise MalformedDerError(f"expected tag 0x{tag:02x}, found 0x{found:02x}", offset)
    return start, end


def check_oid(data: bytes, offset: int, start: int, end: int) -> None:
    """OBJECT IDENTIFIER content (X.690 8.19): minimal subidentifiers, none cut short.

    Arcs below 2**128 and at most 63 content bytes: cryptography's limits, so a request we
    accept is one it accepts too.
    """
    if end == start:
        raise MalformedDerError("empty object identifier", offset)
    if end - start > 63:
        raise MalformedDerError("object identifier longer than 63 bytes", offset)
    # Each subidentifier is checked where it ends (a byte without bit 8): minimal means it does
    # not start with 0x80; below 2**128 means at most 19 bytes, the first of 19 at most 0x83.
    arc = start
    for index in range(start, end):
        if data[index] & 0x80:
            continue
        if data[arc] == 0x80:
            raise MalformedDerError("object identifier arc not minimal", offset)
        if index - arc > 18 or (index - arc == 18 and data[arc] > 0x83):
            raise MalformedDerError("object identifier arc too large", offset)
        arc = index + 1
    if data[end - 1] & 0x80:
        raise MalformedDerError("truncated object identifier", offset)


def _bad_boolean(data: bytes, start: int, end: int) -> str | None:
    return None if end - start == 1 and data[start] in (0x00, 0xFF) else "BOOLEAN is not DER"


def _bad_integer(data: bytes, start: int, end: int) -> str | None:
    # X.690 8.3.2: the first nine bits are neither all zero nor all one.
    length = end - start
    if length == 0 or (length > 1 and (data[start] << 1 | data[start + 1] >> 7) in (0, 0x1FF)):
        return "INTEGER is empty or not minimal"
    return None


def _bad_bit_string(data: bytes, start: int, end: int) -> str | None:
    # X.690 8.6.2, 11.2: an unused-bits count below 8, zero when empty, unused bits zero.
    unused = data[start] if end > start else 8
    if unused > 7 or (end - start == 1 and unused) or data[end - 1] & ((1 << unused) - 1):
        return "BIT STRING is not DER"
    return None


def _bad_null(_data: bytes, start: int, end: int) -> str | None:
    return "NULL has content" if end > start else None


def _bad_printable(data: bytes, start: int, end: int) -> str | None:
    return None if _PRINTABLE.issuperset(data[start:end]) else "not a PrintableString character"


def _width(width: int) -> Callable[[bytes, int, int], str | None]:
    def check(_data: bytes, start: int, end: int) -> str | None:
        return "string is not a whole number of characters" if (end - start) % width else None

    return check


# Checks on primitive values of the universal types that occur in requests (X.690 8, 10, 11);
# tag 0 is end-of-contents, never a value. OBJECT IDENTIFIER has its own function.
_PRIMITIVE_CHECKS: dict[int, Callable[[bytes, int, int], str | None]] = {
    0x00: lambda _data, _start, _end: "end-of-contents octets are not a value",
    BOOLEAN: _bad_boolean,
    INTEGER: _bad_integer,
    0x0A: _bad_integer,  # ENUMERATED
    BIT_STRING: _bad_bit_string,
    NULL: _bad_null,
    0x13: _bad_printable,  # PrintableString (X.680 41.4)
    0x1C: _width(4),  # UniversalString
    0x1E: _width(2),  # BMPString
}


def check_value(data: bytes, offset: int, limit: int, depth: int = 0) -> int:
    """Check any one DER element at `offset` (an ANY); return its end.

    Constructed elements are walked down to 16 levels; DER forbids the constructed form of
    primitive universal types (X.690 10.2).
    """
    tag, start, end = read_header(data, offset, limit)
    if tag & 0x20:
        if tag & 0xC0 == 0 and tag not in (SEQUENCE, SET):
            raise MalformedDerError("constructed encoding of a primitive type", offset)
        if depth >= _MAX_DEPTH:
            raise MalformedDerError("elements nested too deeply", offset)
        cursor = start
        while cursor < end:
            cursor = check_value(data, cursor, end, depth + 1)
    elif tag == OID:
        check_oid(data, offset, start, end)
    else:
        check = _PRIMITIVE_CHECKS.get(tag)
        problem = None if check is None else check(data, start, end)
        if problem is not None:
            raise MalformedDerError(problem, offset)
    return end


def check_order(data: bytes, previous: int, previous_end: int, current: int, end: int) -> None:
    """DER orders SET OF components by their encodings (X.690 11.6); equal ones may repeat."""
    if data[previous:previous_end] > data[current:end]:
        raise MalformedDerError("SET OF components not in DER order", current)


def take_oid(data: bytes, offset: int, limit: int) -> int:
    """Check the OBJECT IDENTIFIER element at `offset`; return its end."""
    start, end = strict_expect(data, offset, OID, limit)
    check_oid(data, offset, start, end)
    return end


# The reference implementations stay reachable for the differential tests.
python_encode_tlv = encode_tlv
python_sequence_elements = sequence_elements

try:  # The C versions (engine/_derc.c), when the build could compile them.
    from engine._derc import encode_tlv, sequence_elements
except ImportError:  # pragma: no cover (a build without a C compiler)
    ACCELERATED = False
else:
    ACCELERATED = True
