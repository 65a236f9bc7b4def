"""The device corpus: reproducible, cached, extended, made in parallel, read per shard."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from bench.errors import BenchError
from bench.run import corpus
from engine.keys import load_private_key, private_key_to_der
from engine.population import simulated_enrollee
from engine.request import parse_request, verify_request


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


def test_parallel_build_matches_the_derivation(tmp_path: Path) -> None:
    """Keys made by worker processes equal the ones derived here, in order."""
    keys = corpus.load_keys("p256", 9, 200, cache=tmp_path)
    assert keys == [corpus.make_key("p256", 9, i) for i in range(200)]


def test_torn_cache_file_is_repaired(tmp_path: Path) -> None:
    """A cache cut short mid-entry keeps its whole entries and makes the rest again."""
    keys = corpus.load_keys("p256", 2, 4, cache=tmp_path)
    path = tmp_path / "keys" / "p256-seed2.der"
    path.write_bytes(path.read_bytes()[:-10])
    assert corpus.load_keys("p256", 2, 4, cache=tmp_path) == keys


def test_corpus_entries_fit_together(tmp_path: Path) -> None:
    """A shard's entries: the request is signed by the key for its user; the protected key
    decrypts with that device's secret."""
    spec = corpus.CorpusSpec("p256", "sha256", 4, 300)
    corpus.build_corpus(spec, tmp_path)
    entries = corpus.read_corpus(spec, [0, 7, 299], tmp_path)
    for index, (key, request, protected) in zip([0, 7, 299], entries, strict=True):
        parsed = parse_request(request)
        verify_request(parsed)
        public = (
            load_private_key(key)
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        assert parsed.key.spki == public
        assert parsed.subject == simulated_enrollee(index, 4).user.dn.der
        secret = simulated_enrollee(index, 4).device_secret
        opened = serialization.load_der_private_key(protected, secret)
        assert private_key_to_der(opened) == key  # type: ignore[arg-type]


def test_unprotected_corpus_hands_out_the_plain_key(tmp_path: Path) -> None:
    """Without key protection, step 5 stores the plain PKCS #8 key."""
    spec = corpus.CorpusSpec("ed25519", "sha256", 4, 10, protect=False)
    corpus.build_corpus(spec, tmp_path)
    key, _, protected = corpus.read_corpus(spec, [3], tmp_path)[0]
    assert protected == key


def test_new_keys_never_meet_old_requests(tmp_path: Path) -> None:
    """Regenerating the key file gives a new generation, so requests are made again."""
    spec = corpus.CorpusSpec("p256", "sha256", 8, 5)
    corpus.build_corpus(spec, tmp_path)
    (tmp_path / "keys" / "p256-seed8.der").unlink()
    corpus.build_corpus(spec, tmp_path)
    assert len(list((tmp_path / "requests").iterdir())) == 2


def test_reading_a_missing_corpus_is_an_error(tmp_path: Path) -> None:
    """A shard that finds no corpus fails with a BenchError, not a crash."""
    with pytest.raises(BenchError, match="no key corpus"):
        corpus.read_corpus(corpus.CorpusSpec("p256", "sha256", 1, 3), [0], tmp_path)


def test_cache_directory_honours_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """ENROLLBENCH_CACHE wins over XDG_CACHE_HOME."""
    monkeypatch.setenv("XDG_CACHE_HOME", "/x")
    monkeypatch.setenv("ENROLLBENCH_CACHE", "/y")
    assert corpus.cache_directory() == Path("/y")
    monkeypatch.delenv("ENROLLBENCH_CACHE")
    assert corpus.cache_directory() == Path("/x/enrollbench")
