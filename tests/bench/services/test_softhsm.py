"""bench.services.softhsm: a SoftHSM2 token in a folder, and CA keys imported into it."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pkcs11
import pytest
from pkcs11 import Attribute, ObjectClass

from bench.services.softhsm import (
    CONF_ENV,
    SoftHsmError,
    Token,
    create_token,
    find_module,
    import_key,
)
from engine.hsm import HsmSigner, reinitialize_module, reset_sessions
from engine.keys import Signer
from tests.conftest import require_tool, vector_key

PIN = "1234-user"


@pytest.fixture
def token(tmp_path: Path) -> Iterator[Token]:
    """A fresh token in tmp_path; SOFTHSM2_CONF is restored afterwards."""
    require_tool("softhsm2-util")
    previous = os.environ.get(CONF_ENV)
    made = create_token(tmp_path, "bench-ca", PIN, "5678-so")
    yield made
    reset_sessions()
    if previous is None:
        os.environ.pop(CONF_ENV, None)
    else:
        os.environ[CONF_ENV] = previous
    reinitialize_module(made.module)


@pytest.mark.server
def test_token_lives_in_the_folder(token: Token, tmp_path: Path) -> None:
    """The configuration and token directory are inside the folder, and the env points there."""
    assert os.environ[CONF_ENV] == str(tmp_path / "softhsm2.conf")
    assert f"directories.tokendir = {tmp_path / 'tokens'}" in token.conf.read_text()
    assert any((tmp_path / "tokens").iterdir())


@pytest.mark.server
def test_child_processes_see_the_token(token: Token) -> None:
    """softhsm2-util run as a child (inheriting SOFTHSM2_CONF) lists the new token."""
    done = subprocess.run(
        ["softhsm2-util", "--show-slots"], capture_output=True, text=True, check=True, timeout=30
    )
    assert f"Label:            {token.label}" in done.stdout


@pytest.mark.server
def test_repr_hides_the_pins(token: Token) -> None:
    """Token's repr carries neither PIN."""
    assert PIN not in repr(token)
    assert "5678-so" not in repr(token)


@pytest.mark.server
@pytest.mark.parametrize("name", ["p256-1", "p384-1", "rsa2048-1", "rsa3072-1"])
def test_imported_key_signs_like_the_key_in_memory(token: Token, name: str) -> None:
    """A key imported by import_key opens as an HsmSigner with the in-memory key's spki."""
    uri = import_key(token, vector_key(name), name, b"\x07")
    assert uri == f"pkcs11:token=bench-ca;object={name};id=%07;type=private"
    hash_name = "sha384" if name.startswith("p384") else "sha256"
    signer = HsmSigner.open(token.module, uri, PIN, hash_name)
    assert signer.spki == Signer(vector_key(name), hash_name).spki


@pytest.mark.server
def test_imported_private_key_is_not_extractable(token: Token) -> None:
    """The private key object is sensitive: its value cannot be read back from the token."""
    import_key(token, vector_key("p256-2"), "ca", b"\x01")
    session = pkcs11.lib(token.module).get_token(token_label=token.label).open(user_pin=PIN)
    try:
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="ca")
        with pytest.raises(pkcs11.AttributeSensitive):
            key[Attribute.VALUE]
    finally:
        session.close()


@pytest.mark.server
def test_ed25519_key_is_refused(token: Token) -> None:
    """Only RSA, P-256 and P-384 CA keys are imported."""
    with pytest.raises(SoftHsmError, match="Ed25519"):
        import_key(token, vector_key("ed25519-1"), "ed", b"\x02")


def test_find_module_honours_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SOFTHSM2_MODULE names the module; a path that does not exist is an error."""
    module = tmp_path / "libsofthsm2.so"
    monkeypatch.setenv("SOFTHSM2_MODULE", str(module))
    with pytest.raises(SoftHsmError, match="does not exist"):
        find_module()
    module.write_bytes(b"")
    assert find_module() == str(module)
