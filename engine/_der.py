"""The small subset of DER (X.690) that the request and certificate templates need.

Only definite lengths and single-byte tags occur in RFC 2986 and RFC 5280 structures, so the
reader refuses anything else. Every malformed input raises `MalformedDerError`.
"""

from __future__ import annotations

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


def read_header(data: bytes, offset: int) -> tuple[int, int, int]:
    """Read the tag and length at `offset`; return (tag, content start, content end)."""
    size = len(data)
    if offset + 2 > size:
        raise MalformedDerError("truncated element header", offset)
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise MalformedDerError("multi-byte tags do not occur in these structures", offset)
    first = data[offset + 1]
    start = offset + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4:
            raise MalformedDerError("indefinite or oversized length", offset)
        if start + count > size:
            raise MalformedDerError("truncated length", offset)
        length = int.from_bytes(data[start : start + count], "big")
        if length < 0x80 or data[start] == 0:
            raise MalformedDerError("length not in minimal form", offset)
        start += count
    end = start + length
    if end > size:
        raise MalformedDerError("element runs past the end of its container", offset)
    return tag, start, end


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


# The reference implementations stay reachable for the differential tests.
python_encode_tlv = encode_tlv
python_sequence_elements = sequence_elements

try:  # The C versions (engine/_derc.c), when the build could compile them.
    from engine._derc import encode_tlv, sequence_elements
except ImportError:  # pragma: no cover (a build without a C compiler)
    ACCELERATED = False
else:
    ACCELERATED = True
