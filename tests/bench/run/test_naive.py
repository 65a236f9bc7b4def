"""The naive baseline does the whole server side, with the engine's stores."""

from __future__ import annotations

from bench.profile import load_profile
from bench.run.naive import NaiveServer, naive_rate


def test_naive_server_issues_and_publishes() -> None:
    """Each naive enrollment authenticates, issues, publishes and records the device key."""
    server = NaiveServer(load_profile("smoke"), 20)
    for index in range(20):
        server.enroll(index)
    server.system.database.flush()
    published = server.system.database.read_one("SELECT count(*) FROM published", ())
    keys = server.system.database.read_one("SELECT count(*) FROM device_keys", ())
    assert published == (20,) and keys == (20,)
    assert naive_rate(server, 0.05) > 0
    server.system.close()
