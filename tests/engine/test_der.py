"""The DER primitives: encoders round-trip through the reader; bad bytes raise typed errors."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import _der
from engine.errors import MalformedDerError


@given(st.binary(max_size=70_000), st.sampled_from([0x04, 0x30, 0x31, 0x0C]))
def test_tlv_round_trips(content: bytes, tag: int) -> None:
    """Any content encoded as a TLV reads back with the same tag and bounds."""
    encoded = _der.encode_tlv(tag, content)
    found, start, end = _der.read_header(encoded, 0)
    assert (found, encoded[start:end], end) == (tag, content, len(encoded))


@given(st.integers(min_value=0, max_value=2**160))
def test_integer_is_minimal_and_positive(value: int) -> None:
    """INTEGERs decode to the same value, never negative, never with a redundant leading byte."""
    encoded = _der.encode_integer(value)
    _, start, end = _der.read_header(encoded, 0)
    body = encoded[start:end]
    assert int.from_bytes(body, "big", signed=True) == value
    assert len(body) == 1 or not (body[0] == 0 and body[1] < 0x80)


@given(
    st.integers(min_value=0, max_value=2),
    st.integers(min_value=0, max_value=39),
    st.lists(st.integers(min_value=0, max_value=2**64), max_size=8),
)
def test_oid_round_trips(first: int, second: int, rest: list[int]) -> None:
    """Dotted OIDs survive encode then decode."""
    dotted = ".".join(str(arc) for arc in [first, second, *rest])
    encoded = _der.encode_oid(dotted)
    _, start, end = _der.read_header(encoded, 0)
    assert _der.decode_oid(encoded[start:end]) == dotted


def test_oid_matches_known_encoding() -> None:
    """ecdsa-with-SHA256 encodes to its well-known bytes."""
    assert _der.encode_oid("1.2.840.10045.4.3.2").hex() == "06082a8648ce3d040302"


@pytest.mark.parametrize(
    "data",
    [b"", b"\x30", b"\x30\x05\x01", b"\x30\x80\x00\x00", b"\x30\x81\x05abcde", b"\x1f\x01\x00"],
)
def test_bad_headers_raise_malformed(data: bytes) -> None:
    """Truncated, indefinite, non-minimal and multi-byte-tag headers are refused."""
    with pytest.raises(MalformedDerError):
        _der.read_whole(data, 0x30)


def test_trailing_bytes_are_refused() -> None:
    """An outer element followed by junk is not a valid encoding."""
    with pytest.raises(MalformedDerError, match="trailing"):
        _der.read_whole(b"\x30\x00\x00", 0x30)


def test_wrong_tag_is_named() -> None:
    """`expect` names the tag it wanted and the one it found."""
    with pytest.raises(MalformedDerError, match="expected tag 0x30, found 0x31"):
        _der.expect(b"\x31\x00", 0, 0x30, 2)


def _outcome(call: Callable[[], object]) -> object:
    """A call's result, or its MalformedDerError's message: what the two versions must share."""
    try:
        return call()
    except MalformedDerError as exc:
        return ("MalformedDerError", str(exc))


needs_c = pytest.mark.skipif(
    not _der.ACCELERATED and not os.environ.get("CI"), reason="C primitives not built"
)


def test_c_primitives_are_built_in_ci() -> None:
    """CI builds the C primitives; a silent fallback to Python would change every figure."""
    if os.environ.get("CI"):
        assert _der.ACCELERATED


_DER_SOUP = st.lists(
    st.sampled_from([b"\x30", b"\x02", b"\x81", b"\x82", b"\x80", b"\x00", b"\x7f", b"\x01\x00"])
    | st.binary(max_size=3),
    max_size=40,
).map(b"".join)


@needs_c
@given(st.integers(min_value=0, max_value=255), st.binary(max_size=70_000))
def test_c_and_python_encoders_agree(tag: int, content: bytes) -> None:
    """encode_tlv writes the same bytes in C and in Python."""
    assert _der.encode_tlv(tag, content) == _der.python_encode_tlv(tag, content)


@needs_c
@given(_DER_SOUP, st.sampled_from([0x30, 0x31]))
def test_c_and_python_sequence_elements_agree(data: bytes, tag: int) -> None:
    """sequence_elements splits alike, or fails alike, in C and in Python."""
    assert _outcome(lambda: _der.sequence_elements(data, tag)) == _outcome(
        lambda: _der.python_sequence_elements(data, tag)
    )
