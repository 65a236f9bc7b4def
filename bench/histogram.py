"""Log-linear latency histograms in numpy: 1 µs to 10 min at better than 3 significant digits.

Values are whole microseconds. Below 2048 µs every value has its own bucket; above, each power
of two is split into 1024 equal buckets, so a bucket is at most 1/1024 (0.1%) of its value wide:
the same layout as an HDR histogram with 3 significant digits. Histograms merge by adding
counts, and encode to a compact, versioned string for result files. The exact minimum and
maximum are kept beside the buckets, and no reported percentile exceeds the maximum.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from bench.errors import ResultError

LINEAR_LIMIT = 2048  # values below this are exact
SUB_BUCKETS = 1024  # buckets per power of two above it
HIGHEST = 600_000_000  # 10 minutes in microseconds
_FIRST_EXPONENT = 11  # 2**11 == LINEAR_LIMIT
_LAST_EXPONENT = int(np.floor(np.log2(HIGHEST)))
SIZE = LINEAR_LIMIT + (_LAST_EXPONENT - _FIRST_EXPONENT + 1) * SUB_BUCKETS
_ENCODING = "llh1"


def bucket_index(values: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The bucket of each value (values are clipped to [0, HIGHEST])."""
    clipped = np.clip(values, 0, HIGHEST)
    exponent = np.floor(np.log2(np.maximum(clipped, 1))).astype(np.int64)
    exponent = np.maximum(exponent, _FIRST_EXPONENT)
    sub = (clipped >> (exponent - 10)) - SUB_BUCKETS  # the 10 bits below the leading one
    log_index = LINEAR_LIMIT + (exponent - _FIRST_EXPONENT) * SUB_BUCKETS + sub
    return np.where(clipped < LINEAR_LIMIT, clipped, log_index)


def bucket_upper(indices: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The highest value each bucket holds."""
    linear = indices < LINEAR_LIMIT
    offset = np.maximum(indices - LINEAR_LIMIT, 0)
    exponent = offset // SUB_BUCKETS + _FIRST_EXPONENT
    sub = offset % SUB_BUCKETS
    low = (SUB_BUCKETS + sub) << (exponent - 10)
    high = low + (np.int64(1) << (exponent - 10)) - 1
    return np.where(linear, indices, high)


@dataclass(frozen=True, slots=True)
class Summary:
    """What a result file reports of one histogram, in microseconds."""

    count: int
    min: int
    mean: float
    p50: int
    p90: int
    p99: int
    p999: int
    max: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "count": self.count,
            "min_us": self.min,
            "mean_us": round(self.mean, 1),
            "p50_us": self.p50,
            "p90_us": self.p90,
            "p99_us": self.p99,
            "p99_9_us": self.p999,
            "max_us": self.max,
        }


class Histogram:
    """Counts per bucket plus the exact min, max and sum."""

    __slots__ = ("counts", "max", "min", "total")

    def __init__(self) -> None:
        self.counts = np.zeros(SIZE, dtype=np.int64)
        self.min = HIGHEST
        self.max = 0
        self.total = 0

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def record_many(self, values: Sequence[int] | npt.NDArray[np.int64]) -> None:
        """Record values in microseconds (vectorized: the hot path only appends to a list)."""
        array = np.asarray(values, dtype=np.int64)
        if array.size == 0:
            return
        array = np.clip(array, 0, HIGHEST)
        self.counts += np.bincount(bucket_index(array), minlength=SIZE)
        self.min = min(self.min, int(array.min()))
        self.max = max(self.max, int(array.max()))
        self.total += int(array.sum())

    def merge(self, other: Histogram) -> None:
        self.counts += other.counts
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.total += other.total

    def percentile(self, percent: float) -> int:
        """The value at `percent` (0-100): its bucket's upper edge, never above the maximum."""
        count = self.count
        if count == 0:
            return 0
        rank = max(1, int(np.ceil(percent / 100.0 * count)))
        index = int(np.searchsorted(np.cumsum(self.counts), rank))
        upper = int(bucket_upper(np.array([index], dtype=np.int64))[0])
        return max(self.min, min(upper, self.max))

    def summary(self) -> Summary:
        count = self.count
        if count == 0:
            return Summary(0, 0, 0.0, 0, 0, 0, 0, 0)
        return Summary(
            count,
            self.min,
            self.total / count,
            self.percentile(50),
            self.percentile(90),
            self.percentile(99),
            self.percentile(99.9),
            self.max,
        )

    def cdf(self) -> tuple[list[int], list[float]]:
        """Upper bucket edges and cumulative fractions of the non-empty buckets (for plots)."""
        nonzero = np.nonzero(self.counts)[0]
        if nonzero.size == 0:
            return [], []
        fractions = np.cumsum(self.counts[nonzero]) / self.counts.sum()
        edges = np.minimum(bucket_upper(nonzero), self.max)
        return [int(v) for v in edges], [float(f) for f in fractions]

    def encode(self) -> str:
        """A compact string: sparse (index, count) pairs, zlib, base64, with min/max/sum."""
        nonzero = np.nonzero(self.counts)[0].astype(np.int64)
        pairs = np.stack([nonzero, self.counts[nonzero]]).astype("<i8").tobytes()
        head = f"{_ENCODING}:{self.min}:{self.max}:{self.total}:"
        return head + base64.b64encode(zlib.compress(pairs, 6)).decode("ascii")

    @classmethod
    def decode(cls, text: str) -> Histogram:
        """Read `encode`'s string back; refuse anything it could not have written."""
        if not isinstance(text, str):
            raise ResultError(f"corrupt histogram: expected a string, got {type(text).__name__}")
        try:
            tag, low, high, total, payload = text.split(":", 4)
            if tag != _ENCODING:
                raise ResultError(f"unknown histogram encoding {tag[:20]!r}")
            bounds = int(low), int(high), int(total)
            raw = np.frombuffer(_inflate(base64.b64decode(payload, validate=True)), dtype="<i8")
            indices, counts = raw.reshape(2, -1)
        except (ValueError, zlib.error) as exc:
            raise ResultError(f"corrupt histogram: {str(exc)[:80]}") from exc
        _check_decoded(indices, counts, *bounds)
        histogram = cls()
        histogram.counts[indices] = counts
        histogram.min, histogram.max, histogram.total = bounds
        return histogram


def _inflate(data: bytes) -> bytes:
    """zlib-decompress at most what `encode` can write (every bucket once), never more."""
    limit = 2 * 8 * SIZE
    inflater = zlib.decompressobj()
    raw = inflater.decompress(data, limit)
    if inflater.unconsumed_tail or not inflater.eof:
        raise ValueError("payload longer than any histogram, or cut short")
    return raw


def _check_decoded(
    indices: npt.NDArray[np.int64], counts: npt.NDArray[np.int64], low: int, high: int, total: int
) -> None:
    """What `encode` guarantees: buckets in range and increasing, counts and bounds sane."""
    if indices.size and (indices[0] < 0 or indices[-1] >= SIZE or np.any(np.diff(indices) <= 0)):
        raise ResultError("corrupt histogram: bucket indices out of range or out of order")
    if np.any(counts < 0):
        raise ResultError("corrupt histogram: a negative count")
    if min(high, total) < 0 or not 0 <= low <= HIGHEST or high > HIGHEST:
        raise ResultError("corrupt histogram: min, max or sum out of range")
    if indices.size and low > high:
        raise ResultError("corrupt histogram: min above max")
    if int(counts.sum()) < 0:  # int64 wrapped around: no run records that many values
        raise ResultError("corrupt histogram: counts overflow")


def merged(histograms: Iterable[Histogram]) -> Histogram:
    result = Histogram()
    for histogram in histograms:
        result.merge(histogram)
    return result
