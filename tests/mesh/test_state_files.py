"""Issue 17 part 6: the state dir. A loopback node used a fixed, public secret; the node key
was read through symlinks and a group-readable one was accepted (chmod-ed quietly); the
election state's temporary file was opened with O_TRUNC, following a planted link."""

from __future__ import annotations

import os
import stat

import pytest

from actors import NodeIdentity
from actors.statefiles import StateFileError
from mesh.cluster.errors import CorruptClusterState
from mesh.cluster.persistence import FileStorage, HardState
from mesh.secret_files import estimated_bits, loopback_secret


def test_a_symlinked_node_key_is_refused(tmp_path):
    attacker = tmp_path / "attacker.key"
    attacker.write_bytes(b"k" * 32)
    attacker.chmod(0o600)
    state = tmp_path / "state"
    state.mkdir()
    (state / "node.key").symlink_to(attacker)
    with pytest.raises(StateFileError, match="symlink"):
        NodeIdentity.load_or_create(state)


def test_a_node_key_others_can_read_is_refused(tmp_path):
    NodeIdentity.load_or_create(tmp_path)
    (tmp_path / "node.key").chmod(0o644)
    with pytest.raises(StateFileError, match="chmod 600"):
        NodeIdentity.load_or_create(tmp_path)


def test_a_dangling_symlink_is_not_followed_to_create_the_key(tmp_path):
    target = tmp_path / "elsewhere" / "written-through-the-link"
    target.parent.mkdir()
    (tmp_path / "node.key").symlink_to(target)
    with pytest.raises(StateFileError):
        NodeIdentity.load_or_create(tmp_path)
    assert not target.exists()


def test_saving_the_election_state_does_not_follow_a_planted_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "election.tmp").symlink_to(victim)
    storage = FileStorage(tmp_path)
    storage.save(HardState(term=3, voted_for="a"))
    assert victim.read_text() == "precious"
    assert storage.load().term == 3
    assert stat.S_IMODE(os.stat(tmp_path / "election.json").st_mode) == 0o600


def test_a_symlinked_election_state_is_refused(tmp_path):
    elsewhere = tmp_path / "other.json"
    FileStorage(tmp_path / "x").save(HardState(term=9))
    os.replace(tmp_path / "x" / "election.json", elsewhere)
    (tmp_path / "election.json").symlink_to(elsewhere)
    with pytest.raises(CorruptClusterState, match="symlink"):
        FileStorage(tmp_path).load()


def test_no_fixed_loopback_secret_one_random_secret_per_state_dir(tmp_path):
    a, path_a, created = loopback_secret(tmp_path / "a")
    assert created and stat.S_IMODE(os.stat(path_a).st_mode) == 0o600
    again, _, created = loopback_secret(tmp_path / "a")
    assert again == a and not created
    b, _, _ = loopback_secret(tmp_path / "b")
    assert a != b and estimated_bits(a) > 200
    path_a.chmod(0o644)
    with pytest.raises(StateFileError, match="chmod 600"):
        loopback_secret(tmp_path / "a")
