"""The device key corpus: reproducible, cached, extended, made in parallel."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import corpus
from engine.keys import load_private_key, private_key_to_der


def test_derived_keys_are_reproducible_without_cache(tmp_path: Path) -> None:
    """Two empty caches give the same P-256 keys for the same seed, others for another seed."""
    first = corpus.load_keys("p256", 5, 10, cache=tmp_path / "a")
    assert first == corpus.load_keys("p256", 5, 10, cache=tmp_path / "b")
    assert first != corpus.load_keys("p256", 6, 10, cache=tmp_path / "c")
    assert len(set(first)) == 10


def test_cache_is_reused_and_extended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second load reads the file; a larger one makes only the missing keys."""
    corpus.load_keys("ed25519", 1, 5, cache=tmp_path)
    made: list[int] = []
    original = corpus.make_key

    def counting(name: str, seed: int, index: int) -> bytes:
        made.append(index)
        return original(name, seed, index)

    monkeypatch.setattr(corpus, "make_key", counting)
    assert len(corpus.load_keys("ed25519", 1, 5, cache=tmp_path)) == 5
    assert made == []
    keys = corpus.load_keys("ed25519", 1, 8, cache=tmp_path)
    assert (len(keys), made) == (8, [5, 6, 7])


def test_parallel_build_matches_serial(tmp_path: Path) -> None:
    """Keys made by two worker processes equal the ones made in this process, in order."""
    parallel = corpus.load_keys("p256", 9, 200, workers=2, cache=tmp_path / "p")
    serial = corpus.load_keys("p256", 9, 200, workers=1, cache=tmp_path / "s")
    assert parallel == serial


def test_torn_cache_file_is_repaired(tmp_path: Path) -> None:
    """A cache cut short mid-key keeps its whole keys and makes the rest again."""
    keys = corpus.load_keys("p256", 2, 4, cache=tmp_path)
    path = tmp_path / "keys" / "p256-seed2.der"
    path.write_bytes(path.read_bytes()[:-10])
    assert corpus.load_keys("p256", 2, 4, cache=tmp_path) == keys


def test_keys_load_as_the_engine_loads_them(tmp_path: Path) -> None:
    """Corpus keys are PKCS #8 DER the engine loads and re-serializes unchanged."""
    der = corpus.load_keys("p384", 3, 1, cache=tmp_path)[0]
    assert private_key_to_der(load_private_key(der)) == der


def test_cache_directory_honours_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """ENROLLBENCH_CACHE wins over XDG_CACHE_HOME."""
    monkeypatch.setenv("XDG_CACHE_HOME", "/x")
    monkeypatch.setenv("ENROLLBENCH_CACHE", "/y")
    assert corpus.cache_directory() == Path("/y")
    monkeypatch.delenv("ENROLLBENCH_CACHE")
    assert corpus.cache_directory() == Path("/x/enrollbench")
