"""The device corpus: keys and requests made once, before the clock, cached on disk, reused.

RSA key generation takes ~40 ms at the median with a heavy tail, so a fleet's keys are made
before the clock starts and kept. EC and Ed25519 keys are derived from the seed (the same seed
gives the same keys on any machine); RSA keys come from OpenSSL's generator and are reproducible
through the cache. Keys are stored and handed to shards as PKCS #8 DER.

Cache layout: one file per (key type, seed) under the cache directory, holding length-prefixed
DER keys; a request for more keys than the file holds extends it.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

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

_LENGTH = struct.Struct(">I")


def cache_directory() -> Path:
    """Where corpora live: $ENROLLBENCH_CACHE, else $XDG_CACHE_HOME/enrollbench, else ~/.cache."""
    explicit = os.environ.get("ENROLLBENCH_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "enrollbench"


def _secret(seed: int, index: int) -> bytes:
    """The derivation input of key `index` under `seed`."""
    return hashlib.sha256(f"enrollbench-key/{seed}/{index}".encode()).digest()


def make_key(name: str, seed: int, index: int) -> bytes:
    """Key `index` of a corpus as PKCS #8 DER (derived for EC/Ed25519, generated for RSA)."""
    spec = key_spec(name)
    if spec.family is KeyFamily.RSA:
        return private_key_to_der(generate_private_key(spec))
    return private_key_to_der(derive_private_key(spec, _secret(seed, index)))


def _make_range(name: str, seed: int, start: int, stop: int) -> list[bytes]:
    return [make_key(name, seed, index) for index in range(start, stop)]


def _read(path: Path) -> list[bytes]:
    keys: list[bytes] = []
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return keys
    offset = 0
    while offset + _LENGTH.size <= len(data):
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        if offset + length > len(data):
            break  # a torn tail from an interrupted write: regenerate from here
        keys.append(data[offset : offset + length])
        offset += length
    return keys


def _write(path: Path, keys: Sequence[bytes]) -> None:
    """Replace the cache file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    with temporary.open("wb") as handle:
        for key in keys:
            handle.write(_LENGTH.pack(len(key)))
            handle.write(key)
    os.replace(temporary, path)


def load_keys(
    name: str, seed: int, count: int, *, workers: int | None = None, cache: Path | None = None
) -> list[bytes]:
    """`count` keys of type `name` for `seed`, from the cache or made in parallel and cached."""
    key_spec(name)
    path = (cache or cache_directory()) / "keys" / f"{name}-seed{seed}.der"
    keys = _read(path)
    if len(keys) >= count:
        return keys[:count]
    missing = range(len(keys), count)
    processes = max(1, workers or os.cpu_count() or 1)
    if processes == 1 or len(missing) < 64:
        keys.extend(_make_range(name, seed, missing.start, missing.stop))
    else:
        step = -(-len(missing) // (processes * 4))
        bounds = [
            (s, min(s + step, missing.stop)) for s in range(missing.start, missing.stop, step)
        ]
        with ProcessPoolExecutor(processes) as pool:
            futures = [pool.submit(_make_range, name, seed, a, b) for a, b in bounds]
            for future in futures:
                keys.extend(future.result())
    _write(path, keys)
    return keys


def load_requests(
    name: str,
    hash_name: str,
    seed: int,
    keys: Sequence[bytes],
    *,
    cache: Path | None = None,
) -> list[bytes]:
    """Ready-made PKCS #10 requests, one per key, for users 0..n-1 of `seed`; cached on disk.

    The cache file is named by a digest of the keys, so a regenerated key corpus never meets
    stale requests.
    """
    digest = hashlib.sha256(b"".join(keys)).hexdigest()[:16]
    path = (cache or cache_directory()) / "requests" / f"{name}-{hash_name}-seed{seed}-{digest}.der"
    requests = _read(path)
    if len(requests) >= len(keys):
        return requests[: len(keys)]
    template = RequestTemplate(key_spec(name).family)
    for index in range(len(requests), len(keys)):
        user = simulated_enrollee(index, seed).user
        signer = Signer(load_private_key(keys[index]), hash_name)
        requests.append(template.build(signer, RequestContent(user.dn, user.email, user.upn)))
    _write(path, requests)
    return requests


def _protect_range(keys: Sequence[bytes], secrets: Sequence[bytes]) -> list[bytes]:
    return [
        encrypt_private_key(load_private_key(key), secret)
        for key, secret in zip(keys, secrets, strict=True)
    ]


def load_protected_keys(
    seed: int,
    keys: Sequence[bytes],
    *,
    workers: int | None = None,
    cache: Path | None = None,
) -> list[bytes]:
    """Each key encrypted as PKCS #8 under its device's secret (step 5, made ahead); cached.

    Encryption costs ~0.3 ms a key, so large corpora are made by several processes.
    """
    digest = hashlib.sha256(b"".join(keys)).hexdigest()[:16]
    path = (cache or cache_directory()) / "protected" / f"seed{seed}-{digest}.der"
    protected = _read(path)
    if len(protected) >= len(keys):
        return protected[: len(keys)]
    todo = list(range(len(protected), len(keys)))
    secrets = [simulated_enrollee(i, seed).device_secret for i in todo]
    pending = [keys[i] for i in todo]
    processes = max(1, workers or os.cpu_count() or 1)
    if processes == 1 or len(todo) < 256:
        protected.extend(_protect_range(pending, secrets))
    else:
        step = -(-len(todo) // (processes * 4))
        with ProcessPoolExecutor(processes) as pool:
            futures = [
                pool.submit(_protect_range, pending[i : i + step], secrets[i : i + step])
                for i in range(0, len(todo), step)
            ]
            for future in futures:
                protected.extend(future.result())
    _write(path, protected)
    return protected
