"""The device corpus: keys, requests and protected keys made once, before the clock, on disk.

RSA key generation takes ~40 ms at the median with a heavy tail, and protecting a key (PKCS #8
encryption) ~0.3 ms, so a fleet's device crypto is made ahead by several processes and kept.
EC and Ed25519 keys are derived from the seed (the same seed gives the same keys anywhere); RSA
keys come from OpenSSL's generator and are reproducible through the cache.

Cache layout (under `cache_directory()`), one file per kind, each a header then length-prefixed
DER entries, extended in place when a run needs more devices:

- `keys/<key>-seed<seed>.der`: PKCS #8 keys; the header carries a generation id, new whenever the
  file is made from scratch;
- `requests/<key>-<hash>-seed<seed>-<generation>.der`: one PKCS #10 request per key, for the
  simulated user of the same index;
- `protected/<key>-seed<seed>-<generation>.der`: each key encrypted under its device's secret.

Requests and protected keys name the key file's generation, so they never outlive their keys.
The runner builds the files in a child process; each shard then reads only its own entries.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.errors import BenchError
from engine.keys import (
    KeyFamily,
    Signer,
    derive_private_key,
    encrypt_private_key,
    generate_private_key,
    key_spec,
    load_private_key,
    private_key_to_der,
)
from engine.population import simulated_enrollee
from engine.request import RequestContent, RequestTemplate

_MAGIC = b"EBC1"
_GENERATION = 16
_LENGTH = struct.Struct(">I")


def cache_directory() -> Path:
    """Where corpora live: $ENROLLBENCH_CACHE, else $XDG_CACHE_HOME/enrollbench, else ~/.cache."""
    explicit = os.environ.get("ENROLLBENCH_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "enrollbench"


@dataclass(frozen=True, slots=True)
class CorpusSpec:
    """Which corpus: device key type, signature hash, seed, size, and whether keys are protected."""

    key: str
    hash_name: str
    seed: int
    devices: int
    protect: bool = True


# ---- one file: a generation id, then length-prefixed entries ----


def _read(path: Path, wanted: Sequence[int] | None = None) -> tuple[bytes, list[bytes]]:
    """The file's generation id and its entries (only those at `wanted` indices, if given).

    A torn tail (an interrupted write) is dropped: later calls make those entries again.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return b"", []
    head = len(_MAGIC) + _GENERATION
    if len(data) < head or not data.startswith(_MAGIC):
        return b"", []
    generation = data[len(_MAGIC) : head]
    keep = None if wanted is None else set(wanted)
    entries: list[bytes] = []
    offset, index = head, 0
    while offset + _LENGTH.size <= len(data):
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        if offset + length > len(data):
            break
        if keep is None or index in keep:
            entries.append(data[offset : offset + length])
        offset += length
        index += 1
    if keep is not None and len(entries) < len(keep):
        raise BenchError(f"{path}: holds {index} entries, a shard needs index {max(keep)}")
    return generation, entries


def _write(path: Path, generation: bytes, entries: Sequence[bytes]) -> None:
    """Replace the file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    with temporary.open("wb") as handle:
        handle.write(_MAGIC + generation)
        for entry in entries:
            handle.write(_LENGTH.pack(len(entry)))
            handle.write(entry)
    os.replace(temporary, path)


Maker = Callable[[int, int], list[bytes]]


def _parallel(part: Callable[[int, int], Maker], start: int, stop: int) -> list[bytes]:
    """Entries start..stop-1; `part(a, b)` gives a picklable maker of entries a..b-1.

    Enough entries are made by one process per core, in chunks.
    """
    processes = os.cpu_count() or 1
    if processes == 1 or stop - start < 64:
        return part(start, stop)(start, stop)
    step = -(-(stop - start) // (processes * 4))
    with ProcessPoolExecutor(processes) as pool:
        bounds = [(a, min(a + step, stop)) for a in range(start, stop, step)]
        futures = [pool.submit(part(a, b), a, b) for a, b in bounds]
        return [entry for future in futures for entry in future.result()]


# ---- keys ----


def _secret(seed: int, index: int) -> bytes:
    return hashlib.sha256(f"enrollbench-key/{seed}/{index}".encode()).digest()


def make_key(name: str, seed: int, index: int) -> bytes:
    """Key `index` of a corpus as PKCS #8 DER (derived for EC/Ed25519, generated for RSA)."""
    spec = key_spec(name)
    if spec.family is KeyFamily.RSA:
        return private_key_to_der(generate_private_key(spec))
    return private_key_to_der(derive_private_key(spec, _secret(seed, index)))


@dataclass(frozen=True, slots=True)
class _KeyMaker:
    name: str
    seed: int

    def __call__(self, start: int, stop: int) -> list[bytes]:
        return [make_key(self.name, self.seed, index) for index in range(start, stop)]


def _key_path(cache: Path, name: str, seed: int) -> Path:
    return cache / "keys" / f"{name}-seed{seed}.der"


def load_keys(name: str, seed: int, count: int, *, cache: Path | None = None) -> list[bytes]:
    """`count` keys of type `name` for `seed`, from the cache or made in parallel and cached."""
    return _load_keys(name, seed, count, cache or cache_directory())[1]


def _load_keys(name: str, seed: int, count: int, cache: Path) -> tuple[bytes, list[bytes]]:
    key_spec(name)
    path = _key_path(cache, name, seed)
    generation, keys = _read(path)
    if len(keys) >= count:
        return generation, keys[:count]
    generation = generation or os.urandom(_GENERATION)
    maker = _KeyMaker(name, seed)
    keys += _parallel(lambda _a, _b: maker, len(keys), count)
    _write(path, generation, keys)
    return generation, keys


# ---- requests and protected keys ----


@dataclass(frozen=True, slots=True)
class _RequestMaker:
    name: str
    hash_name: str
    seed: int
    keys: Sequence[bytes]

    def __call__(self, start: int, stop: int) -> list[bytes]:
        template = RequestTemplate(key_spec(self.name).family)
        requests = []
        for index in range(start, stop):
            user = simulated_enrollee(index, self.seed).user
            signer = Signer(load_private_key(self.keys[index - start]), self.hash_name)
            requests.append(template.build(signer, RequestContent(user.dn, user.email, user.upn)))
        return requests


@dataclass(frozen=True, slots=True)
class _Protector:
    seed: int
    keys: Sequence[bytes]

    def __call__(self, start: int, stop: int) -> list[bytes]:
        return [
            encrypt_private_key(
                load_private_key(self.keys[index - start]),
                simulated_enrollee(index, self.seed).device_secret,
            )
            for index in range(start, stop)
        ]


def _paths(cache: Path, spec: CorpusSpec, generation: bytes) -> tuple[Path, Path]:
    tag = generation.hex()
    return (
        cache / "requests" / f"{spec.key}-{spec.hash_name}-seed{spec.seed}-{tag}.der",
        cache / "protected" / f"{spec.key}-seed{spec.seed}-{tag}.der",
    )


def _extend(
    path: Path, generation: bytes, keys: Sequence[bytes], part: Callable[[int, int], Maker]
) -> None:
    """Make the entries the file lacks, one per key."""
    _, entries = _read(path)
    if len(entries) < len(keys):
        _write(path, generation, entries + _parallel(part, len(entries), len(keys)))


def build_corpus(spec: CorpusSpec, cache: Path | None = None) -> None:
    """Make sure the cache holds keys, requests and (if asked) protected keys for `spec`."""
    folder = cache or cache_directory()
    generation, keys = _load_keys(spec.key, spec.seed, spec.devices, folder)
    requests, protected = _paths(folder, spec, generation)
    _extend(
        requests,
        generation,
        keys,
        lambda a, b: _RequestMaker(spec.key, spec.hash_name, spec.seed, keys[a:b]),
    )
    if spec.protect:
        _extend(protected, generation, keys, lambda a, b: _Protector(spec.seed, keys[a:b]))


def read_corpus(
    spec: CorpusSpec, indices: Sequence[int], cache: Path | None = None
) -> list[tuple[bytes, bytes, bytes]]:
    """(key, request, protected key) for each device index, from a corpus `build_corpus` made.

    Without protection the protected key is the plain PKCS #8 key, as step 5 would store it.
    """
    folder = cache or cache_directory()
    generation, keys = _read(_key_path(folder, spec.key, spec.seed), indices)
    if not generation:
        raise BenchError(f"no key corpus for {spec.key} seed {spec.seed}: build it first")
    requests_path, protected_path = _paths(folder, spec, generation)
    _, requests = _read(requests_path, indices)
    protected = _read(protected_path, indices)[1] if spec.protect else keys
    return list(zip(keys, requests, protected, strict=True))
