"""Issue 17 part 4/6: secrets read from files. A world-readable or guessable secret file
was accepted, and the API key existed only on argv (where `ps` shows it)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from mesh.cli import build_parser
from mesh.commands.join import config_from_args
from mesh.commands.secret import write_secret
from mesh.secret_files import SecretFileError, read_secret_file


def secret_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def join_args(*argv: str):
    return build_parser().parse_args(["join", *argv])


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_secret_file_others_can_read_is_refused(tmp_path, mode):
    path = secret_file(tmp_path / "secret", secrets.token_hex(32), mode)
    with pytest.raises(SecretFileError) as err:
        config_from_args(join_args("--secret-file", str(path)))
    assert f"chmod 600 {path}" in str(err.value) and f"{mode:04o}" in str(err.value)


@pytest.mark.parametrize("weak", ["password1234567890", "correct-horse-battery-staple", "abcd" * 16,
                                  "0" * 64, "short-but-random-ish"])
def test_a_guessable_secret_is_refused(tmp_path, weak):
    path = secret_file(tmp_path / "secret", weak)
    with pytest.raises(SecretFileError) as err:
        config_from_args(join_args("--secret-file", str(path)))
    assert "too guessable" in str(err.value) and "mesh secret new" in str(err.value)


@pytest.mark.parametrize("phrase", [
    "correct horse battery staple, my kitchen has seven blue chairs and a cat",
    "The quick brown fox jumps over the lazy dog while the neighbour plays trumpet at 3am",
])
def test_a_long_english_passphrase_is_accepted(tmp_path, phrase):
    # the estimate must not refuse what a person would reasonably type as a passphrase
    path = secret_file(tmp_path / "secret", phrase)
    assert config_from_args(join_args("--secret-file", str(path))).secret == phrase.encode()


def test_mesh_secret_new_writes_a_secret_that_is_accepted(tmp_path):
    path = tmp_path / "dir" / "secret"
    write_secret(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert config_from_args(join_args("--secret-file", str(path))).secret == path.read_bytes().strip()


def test_the_api_key_comes_from_a_file_or_the_environment_not_only_argv(tmp_path, monkeypatch):
    key = secrets.token_hex(32)
    path = secret_file(tmp_path / "api-key", key)
    monkeypatch.delenv("MESH_API_KEY", raising=False)
    assert config_from_args(join_args("--api-key-file", str(path))).api_key == key
    monkeypatch.setenv("MESH_API_KEY", "from-the-environment")
    assert config_from_args(join_args()).api_key == "from-the-environment"
    assert config_from_args(join_args("--api-key-file", str(path))).api_key == key  # the file wins
    path.chmod(0o644)
    with pytest.raises(SecretFileError, match="chmod 600"):
        config_from_args(join_args("--api-key-file", str(path)))
    monkeypatch.delenv("MESH_API_KEY")
    assert config_from_args(join_args()).api_key is None


def test_join_passes_the_api_policy(tmp_path):
    cfg = config_from_args(join_args("--api-allow-host", "mesh.lan", "--api-allow-origin", "http://localhost:3000",
                                     "--api-max-generations", "3"))
    assert cfg.api_policy.allow_hosts == ["mesh.lan"]
    assert cfg.api_policy.allow_origins == ["http://localhost:3000"]
    assert (cfg.api_policy.max_generations, cfg.api_policy.max_queue) == (3, 12)


def test_a_secret_file_that_is_a_directory_or_missing_is_one_clear_error(tmp_path):
    with pytest.raises(SecretFileError, match="cannot read"):
        read_secret_file(tmp_path / "missing", flag="--secret-file")
    (tmp_path / "d").mkdir(mode=0o700)
    with pytest.raises(SecretFileError):
        read_secret_file(tmp_path / "d", flag="--secret-file")
