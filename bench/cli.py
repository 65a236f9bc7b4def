"""The `enrollbench` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from collections.abc import Sequence

from bench.corpus import load_keys
from engine.keys import key_spec, load_private_key
from engine.population import device_identity, directory_entry, simulated_enrollee
from engine.system import CAMaterial, EngineConfig, EnrollmentSystem


def _enroll(args: argparse.Namespace) -> int:
    """Enroll a batch of simulated devices through the engine, in this process."""
    config = EngineConfig(device_key=args.key, ca_key=args.key, hash_name="sha256")
    ca_keys = [load_private_key(der) for der in load_keys(args.key, -1, 2)]
    material = CAMaterial.create(config, ca_keys)
    enrollees = [simulated_enrollee(i, args.seed) for i in range(args.devices)]
    device_keys = load_keys(args.key, args.seed, args.devices) if args.corpus else None
    system = EnrollmentSystem(config, material, [directory_entry(e, args.seed) for e in enrollees])
    identities = [
        device_identity(e, config.profile_id, None if device_keys is None else device_keys[i])
        for i, e in enumerate(enrollees)
    ]

    async def batch() -> Counter[str]:
        outcomes = await asyncio.gather(*(system.enroll(i) for i in identities))
        return Counter(o.status.value for o in outcomes)

    started = time.perf_counter()
    counts = asyncio.run(batch())
    elapsed = time.perf_counter() - started
    system.close()
    print(
        f"{args.devices} devices ({args.key}, keys {'from corpus' if args.corpus else 'live'}): "
        f"{dict(counts)} in {elapsed:.2f} s, {args.devices / elapsed:,.0f} enrollments/s"
    )
    return 0 if counts.get("issued", 0) == args.devices else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="enrollbench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    enroll = commands.add_parser("enroll", help="enroll a batch of devices through the engine")
    enroll.add_argument("--devices", type=int, default=2000)
    enroll.add_argument("--key", default="p256", type=lambda name: key_spec(name).name)
    enroll.add_argument("--seed", type=int, default=1)
    enroll.add_argument("--corpus", action="store_true", help="take device keys from the corpus")
    args = parser.parse_args(argv)
    return _enroll(args)


if __name__ == "__main__":
    sys.exit(main())
