"""kernels.gguf (the gguf library's reader, wrapped) on synthetic and real files."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from kernels.config import load_config
from kernels.gguf import GGUFError, GGUFFile, UnsupportedTensorType, _Reader, _reader_class

Q = gguf.GGMLQuantizationType

# the types the library can also quantize (the K types it only dequantizes: test_blocks.py)
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def _write(path: Path, tensors: dict[str, tuple[np.ndarray, str]]) -> dict[str, np.ndarray]:
    """Write a GGUF with each tensor quantized to its type; return the reference dequantization."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("test.answer", 42)
    w.add_array("test.list", ["a", "bc"])
    ref = {}
    for name, (data, tname) in tensors.items():
        qtype = Q[tname]
        if tname == "F32":
            w.add_tensor(name, data.astype(np.float32))
            ref[name] = data.astype(np.float32)
            continue
        if tname == "F16":
            q = data.astype(np.float16)
            w.add_tensor(name, q)
            ref[name] = q.astype(np.float32)
            continue
        q = gguf.quants.quantize(data, qtype)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
        ref[name] = gguf.quants.dequantize(q, qtype).reshape(data.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


@pytest.fixture
def synthetic(tmp_path: Path):
    rng = np.random.default_rng(0)
    tensors = {f"t_{t}": (rng.standard_normal((8, 64)).astype(np.float32), t) for t in TYPES}
    path = tmp_path / "synthetic.gguf"
    return path, _write(path, tensors)


def test_dequantize_matches_gguf_package(synthetic):
    path, ref = synthetic
    f = GGUFFile(path)
    assert f.metadata["test.answer"] == 42
    assert f.metadata["test.list"] == ["a", "bc"]
    for name, expected in ref.items():
        got = f.dequantize(name)
        assert got.dtype == np.float32 and got.shape == (8, 64)
        np.testing.assert_array_equal(got, expected, err_msg=name)


@pytest.mark.slow
def test_real_model_tensors_match_gguf_package(model_path: Path):
    f = GGUFFile(model_path)
    r = gguf.GGUFReader(str(model_path))
    assert f.version == 3 and len(f.tensors) == len(r.tensors)
    picked = {"token_embd.weight", "blk.3.attn_q.weight", "blk.3.ffn_down.weight", "blk.3.attn_norm.weight"}
    for t in r.tensors:
        if t.name not in picked:
            continue
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(f.tensors[t.name].shape)
        np.testing.assert_array_equal(f.dequantize(t.name), ref, err_msg=t.name)


def _same_parse(path: Path) -> None:
    """Our faster reader gives the library's fields (names, types, every part's dtype, shape
    and bytes, the data indices) and tensors (name, type, offset, shape, bytes)."""
    ours, lib = _Reader(path), gguf.GGUFReader(path)
    assert list(ours.fields) == list(lib.fields)
    for name, f in lib.fields.items():
        g = ours.fields[name]
        assert (g.offset, g.data, g.types) == (f.offset, f.data, f.types), name
        assert len(g.parts) == len(f.parts), name
        for a, b in zip(g.parts, f.parts):
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
    assert ours.data_offset == lib.data_offset and ours.alignment == lib.alignment
    assert [(t.name, t.tensor_type, t.data_offset, t.n_bytes, t.shape.tolist()) for t in ours.tensors] == \
        [(t.name, t.tensor_type, t.data_offset, t.n_bytes, t.shape.tolist()) for t in lib.tensors]
    for a, b in zip(ours.tensors, lib.tensors):
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
        assert np.shares_memory(a.data, ours.data)  # a view of the mapping, not a copy
    assert np.array_equal(ours.tensors[0].data, lib.tensors[0].data)
    assert np.array_equal(ours.tensors[-1].data, lib.tensors[-1].data)


def test_fast_reader_parses_exactly_what_the_library_parses(model_path: Path, synthetic):
    assert _reader_class() is _Reader  # the library's primitive is still the one replaced
    _same_parse(synthetic[0])
    _same_parse(model_path)


def test_config_from_real_model(model_path: Path):
    c = load_config(model_path)
    assert (c.arch, c.n_layers, c.hidden, c.intermediate) == ("llama", 30, 576, 1536)
    assert (c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.rope_theta == 100000.0 and abs(c.rms_eps - 1e-5) < 1e-9
    assert c.tie_embeddings and not c.qkv_bias and c.eos_token_ids == (2,)


def test_truncated_file_gives_typed_error(model_path: Path, tmp_path: Path):
    data = model_path.read_bytes()
    for cut in (3, 100, 2_000_000, len(data) - 1000):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(GGUFError) as err:
            GGUFFile(bad)
        assert "\n" not in str(err.value)


def test_bad_magic_and_version_give_typed_error(tmp_path: Path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 60)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFFile(bad)
    bad.write_bytes(b"GGUF" + (7).to_bytes(4, "little") + b"\0" * 60)
    with pytest.raises(GGUFError, match="version 7"):
        GGUFFile(bad)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFError):
        GGUFFile(empty)


def test_corrupt_metadata_gives_typed_error(tmp_path: Path, synthetic):
    path, _ = synthetic
    data = bytearray(path.read_bytes())
    # first KV's key length (after magic, version, n_tensors, n_kv) -> absurd
    data[24:32] = (1 << 40).to_bytes(8, "little")
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFError):
        GGUFFile(bad)


def _write_raw(path: Path, name: str, raw: np.ndarray, qtype) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_type_the_library_cannot_dequantize_gives_typed_error(tmp_path: Path):
    path = tmp_path / "q8k.gguf"
    _write_raw(path, "t_q8k", np.zeros((4, 292), dtype=np.uint8), Q.Q8_K)  # 4 rows of one Q8_K block
    f = GGUFFile(path)
    assert f.tensors["t_q8k"].shape == (4, 256)
    with pytest.raises(UnsupportedTensorType, match="Q8_K") as err:
        f.dequantize("t_q8k")
    assert "\n" not in str(err.value) and "Q4_K" in str(err.value)  # names a type to use instead


def test_unknown_type_id_gives_typed_error(tmp_path: Path):
    path = tmp_path / "q4_2.gguf"
    rng = np.random.default_rng(1)
    _write(path, {"t_unknown": (rng.standard_normal((4, 64)).astype(np.float32), "Q4_0")})
    data = bytearray(path.read_bytes())
    # tensor info: name, n_dims (u32), dims (2 x u64), type (u32), offset (u64)
    at = data.index(b"t_unknown") + len("t_unknown") + 4 + 16
    assert int.from_bytes(data[at:at + 4], "little") == int(Q.Q4_0)
    data[at:at + 4] = (4).to_bytes(4, "little")  # Q4_2, removed from ggml long ago
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedTensorType, match="type id 4") as err:
        GGUFFile(path)
    assert "\n" not in str(err.value)


def test_supported_types_cover_the_issue_list():
    from kernels.gguf import supported_types

    need = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16", "F32"}
    assert need <= set(supported_types())
    assert "Q8_K" not in supported_types()
