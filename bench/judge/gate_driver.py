"""The gate's fixed, seeded workload, run against one source tree (PYTHONPATH picks the tree).

    python gate_driver.py count K      # set up, K enrollments, print the environment, exit
    python gate_driver.py serve        # set up, print the environment, then answer "run N"
                                       # with the ns N enrollments took

It imports only the engine of the tree under test, so the same driver measures a baseline git
ref and the current code alike. The workload is the full flow for precomputed P-256 devices,
auto-issue, no link latency: no coroutine ever waits, so each enrollment is driven without an
event loop and the instruction count is the same from run to run.

The environment line (JSON: python, prefix, cryptography, openssl, engine folder, DER path) is
read by the gate, which checks that the measured process ran in the gate's own environment and
names the versions in its verdict: a number is only meaningful with what produced it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any


def _only_the_tree_under_test() -> None:
    """Drop editable-install finders (`pip install -e`): they serve any engine module the tree
    lacks from the installed checkout, so a tree whose C DER path was not built ran another
    checkout's compiled module (seen: it failed to load, or timed foreign code)."""
    sys.meta_path[:] = [
        finder
        for finder in sys.meta_path
        if not str(getattr(finder, "__module__", "")).startswith("__editable__")
    ]


_only_the_tree_under_test()

from engine.keys import Signer, derive_private_key, key_spec, private_key_to_der  # noqa: E402
from engine.population import (  # noqa: E402
    device_identity,
    directory_entry,
    simulated_enrollee,
)
from engine.request import RequestContent, RequestTemplate  # noqa: E402
from engine.system import CAMaterial, EngineConfig, EnrollmentSystem  # noqa: E402

DEVICES = 64
SEED = 20261129


class NotIssuedError(RuntimeError):
    """A gate enrollment ended without a certificate: the workload is broken, not fast."""


# bench.microbench.workloads.run_ready does the same; the driver repeats it on purpose, because it
# must run against a baseline tree whose bench/ may differ: it imports nothing but the engine.
def _drive(coroutine: Coroutine[Any, Any, Any]) -> Any:
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the gate workload must not wait")


def _key(index: int) -> Any:
    secret = hashlib.sha256(f"gate/{SEED}/{index}".encode()).digest()
    return derive_private_key(key_spec("p256"), secret)


def build() -> tuple[EnrollmentSystem, list[Any]]:
    """The engine replica and the device identities, all derived from SEED."""
    config = EngineConfig(profile_id="gate", key_protection="none", seed=SEED)
    material = CAMaterial.create(config, [_key(-1), _key(-2)])
    enrollees = [simulated_enrollee(i, SEED) for i in range(DEVICES)]
    system = EnrollmentSystem(config, material, [directory_entry(e, SEED) for e in enrollees])
    template = RequestTemplate(key_spec("p256").family)
    identities = []
    for index, enrollee in enumerate(enrollees):
        key = _key(index)
        user = enrollee.user
        request = template.build(
            Signer(key, "sha256"), RequestContent(user.dn, user.email, user.upn)
        )
        der = private_key_to_der(key)
        identities.append(device_identity(enrollee, "gate", der, request, der))
    return system, identities


def run(system: Any, identities: list[Any], count: int, offset: int) -> None:
    """Enroll `count` devices; every one must be issued (a rejection or failure is no speed-up)."""
    for n in range(offset, offset + count):
        outcome = _drive(system.enroll(identities[n % len(identities)]))
        if outcome.serial is None:
            raise NotIssuedError(f"gate enrollment not issued: {outcome}")


def environment() -> dict[str, str]:
    """What this process measures with, as it sees it from inside."""
    import cryptography  # noqa: PLC0415 (reported, not used)
    from cryptography.hazmat.backends.openssl import backend  # noqa: PLC0415

    import engine  # noqa: PLC0415

    try:
        import engine._derc as derc  # noqa: PLC0415 (only whether the C DER path is there)
    except ImportError:
        der, der_path = "python", ""
    else:
        der, der_path = "c", str(Path(str(derc.__file__)).resolve())
    return {
        "python": platform.python_version(),
        "prefix": sys.prefix,
        "cryptography": cryptography.__version__,
        "cryptography_path": str(Path(cryptography.__file__).resolve().parent),
        "openssl": backend.openssl_version_text(),
        "engine": str(Path(engine.__file__).resolve().parent),
        "der": der,
        "der_path": der_path,
    }


def main(argv: list[str]) -> int:
    system, identities = build()
    if argv[1] == "count":
        run(system, identities, int(argv[2]), 0)
        print(json.dumps(environment()), flush=True)
        return 0
    print(json.dumps(environment()), flush=True)
    done = 0
    for line in sys.stdin:
        command, _, value = line.strip().partition(" ")
        if command != "run":
            break
        count = int(value)
        started = time.perf_counter_ns()
        run(system, identities, count, done)
        print(time.perf_counter_ns() - started, flush=True)
        done += count
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
