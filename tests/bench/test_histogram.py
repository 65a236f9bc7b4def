"""Log-linear histograms: precision, percentiles, merging, encoding."""

from __future__ import annotations

import base64
import contextlib
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.errors import ResultError
from bench.histogram import HIGHEST, SIZE, Histogram, bucket_index, bucket_upper, merged


@given(st.lists(st.integers(min_value=1, max_value=HIGHEST), min_size=1, max_size=200))
def test_buckets_hold_their_values_within_a_thousandth(values: list[int]) -> None:
    """Each value lies in its bucket, whose upper edge is within 0.1% (3 significant digits)."""
    array = np.array(values, dtype=np.int64)
    upper = bucket_upper(bucket_index(array))
    assert np.all(upper >= array)
    assert np.all((upper - array) <= np.maximum(array // 1000, 0) + 1)


def test_small_values_are_exact() -> None:
    """Below 2048 µs every value is its own bucket."""
    values = np.arange(0, 2048, dtype=np.int64)
    assert np.array_equal(bucket_upper(bucket_index(values)), values)


@given(st.lists(st.integers(min_value=1, max_value=10**8), min_size=1, max_size=300))
def test_percentiles_never_exceed_the_max(values: list[int]) -> None:
    """No percentile is above the largest value recorded, nor below the smallest."""
    histogram = Histogram()
    histogram.record_many(values)
    for percent in (0.0, 50.0, 90.0, 99.0, 99.9, 100.0):
        assert min(values) <= histogram.percentile(percent) <= max(values)
    summary = histogram.summary()
    assert summary.max == max(values) and summary.min == min(values)
    assert summary.count == len(values)


def test_percentiles_match_numpy_within_precision() -> None:
    """p50/p99 agree with numpy's on lognormal data to 3 significant digits."""
    data = np.random.default_rng(3).lognormal(8, 1.5, 50_000).astype(np.int64) + 1
    histogram = Histogram()
    histogram.record_many(data)
    for percent in (50, 99):
        exact = float(np.percentile(data, percent, method="inverted_cdf"))
        assert histogram.percentile(percent) == pytest.approx(exact, rel=1e-3, abs=1)


def test_merging_equals_recording_together() -> None:
    """Two shards' histograms merge into the histogram of all their values."""
    first, second, both = Histogram(), Histogram(), Histogram()
    first.record_many([5, 5000, 70_000])
    second.record_many([9, 123_456_789])
    both.record_many([5, 5000, 70_000, 9, 123_456_789])
    combined = merged([first, second])
    assert np.array_equal(combined.counts, both.counts)
    assert combined.summary() == both.summary()


def test_encoding_round_trips() -> None:
    """A decoded histogram equals the original."""
    histogram = Histogram()
    histogram.record_many(np.random.default_rng(1).integers(1, 10**7, 5000))
    decoded = Histogram.decode(histogram.encode())
    assert np.array_equal(decoded.counts, histogram.counts)
    assert decoded.summary() == histogram.summary()


@pytest.mark.parametrize("text", ["", "llh1:1:2", "xxx:1:2:3:AAAA", "llh1:1:2:3:not-base64!"])
def test_corrupt_encodings_raise_result_error(text: str) -> None:
    """Garbage in a result's histogram field is a ResultError, not a crash."""
    with pytest.raises(ResultError):
        Histogram.decode(text)


def test_empty_histogram_summarizes_to_zero() -> None:
    """An empty histogram reports zero counts and values."""
    assert Histogram().summary().count == 0
    assert Histogram().percentile(99) == 0


def test_a_payload_larger_than_any_histogram_is_refused() -> None:
    """A compressed payload inflating past every bucket is corrupt, not decoded into memory."""
    payload = base64.b64encode(zlib.compress(bytes(16 * SIZE + 16))).decode("ascii")
    with pytest.raises(ResultError, match="corrupt histogram"):
        Histogram.decode(f"llh1:0:0:0:{payload}")


def test_a_cut_payload_is_refused() -> None:
    """A payload cut short (no zlib end) is corrupt."""
    histogram = Histogram()
    histogram.record_many([5, 70, 3000])
    head, payload = histogram.encode().rsplit(":", 1)
    cut = base64.b64encode(base64.b64decode(payload)[:-4]).decode("ascii")
    with pytest.raises(ResultError, match="corrupt histogram"):
        Histogram.decode(f"{head}:{cut}")


def _encoded_pairs(indices: list[int], counts: list[int], head: str = "llh1:1:9:20") -> str:
    pairs = np.array([indices, counts], dtype="<i8").tobytes()
    return f"{head}:" + base64.b64encode(zlib.compress(pairs)).decode("ascii")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (_encoded_pairs([SIZE], [1]), "out of range"),
        (_encoded_pairs([-1], [1]), "out of range"),
        (_encoded_pairs([9, 3], [1, 1]), "out of order"),
        (_encoded_pairs([3, 9], [1, -2]), "negative count"),
        (_encoded_pairs([3], [1], "llh1:9:1:20"), "min above max"),
        (_encoded_pairs([3], [1], "llh1:1:9:-5"), "out of range"),
        (_encoded_pairs([3], [1], "llh1:1:x:20"), "corrupt histogram"),
    ],
)
def test_encodings_encode_could_not_write_are_refused(text: str, problem: str) -> None:
    """Buckets out of range or order, negative counts, impossible bounds: ResultError."""
    with pytest.raises(ResultError, match=problem):
        Histogram.decode(text)


@given(st.one_of(st.text(max_size=60), st.binary(max_size=60).map(lambda b: b.hex())))
def test_any_text_decodes_or_raises_result_error(text: str) -> None:
    """Whatever the string, decoding gives a histogram or a ResultError, nothing else."""
    for candidate in (text, f"llh1:{text}", f"llh1:1:2:3:{text}"):
        with contextlib.suppress(ResultError):
            Histogram.decode(candidate)
