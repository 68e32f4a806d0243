import os
import stat

import pytest

from ravenp2p.identity import (
    IdentityError,
    NodeIdentity,
    address_of,
    create_identity,
    keccak256,
    key_path,
    load_identity,
    load_or_create_identity,
    public_key_of_peer,
    recover_signer,
)


def test_known_vector_private_key_one():
    identity = NodeIdentity.from_secret((1).to_bytes(32, "big"))
    assert identity.address == "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf"
    assert identity.peer_id.startswith("16Uiu2H")


def test_peer_id_and_address_derive_from_the_same_key():
    identity = NodeIdentity.generate()
    assert public_key_of_peer(identity.peer_id) == identity.public_key
    digest = keccak256(b"calculation result")
    signer = recover_signer(digest, identity.sign_digest(digest))
    assert address_of(signer) == identity.address


def test_key_file_is_private_and_reloads(tmp_path):
    created = create_identity(tmp_path / "node")
    path = key_path(tmp_path / "node")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_identity(tmp_path / "node").peer_id == created.peer_id
    again, was_created = load_or_create_identity(tmp_path / "node")
    assert not was_created and again.address == created.address


def test_refuses_to_overwrite_or_load_a_readable_key(tmp_path):
    create_identity(tmp_path)
    with pytest.raises(IdentityError, match="already exists"):
        create_identity(tmp_path)
    os.chmod(key_path(tmp_path), 0o644)
    with pytest.raises(IdentityError, match="readable by other users"):
        load_identity(tmp_path)


def test_malformed_key_file(tmp_path):
    path = key_path(tmp_path)
    path.write_text("not hex")
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError, match="hex"):
        load_identity(tmp_path)
    path.write_text("00" * 31)
    with pytest.raises(IdentityError, match="32 bytes"):
        load_identity(tmp_path)


def test_public_key_of_peer_rejects_garbage():
    with pytest.raises(ValueError, match="malformed peer id"):
        public_key_of_peer("not-a-peer-id")
