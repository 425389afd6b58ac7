"""Commitment digests and the audit tolerance comparison."""

from __future__ import annotations

import numpy as np

from kernels.digest import Tolerance, compare, tensor_digest


def test_digest_covers_bytes_dtype_and_shape():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert tensor_digest(a) == tensor_digest(a.copy())
    assert len(tensor_digest(a)) == 32
    assert tensor_digest(a) != tensor_digest(a.reshape(4, 3))
    assert tensor_digest(a) != tensor_digest(a.view(np.int32))
    b = a.copy()
    b[1, 2] = np.nextafter(b[1, 2], np.float32(100))
    assert tensor_digest(a) != tensor_digest(b)
    # non-contiguous and big-endian views hash as their logical little-endian content
    assert tensor_digest(a.T) == tensor_digest(np.ascontiguousarray(a.T))
    assert tensor_digest(a.astype(">f4")) == tensor_digest(a)


def test_compare_accepts_noise_and_rejects_tampering():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 576)).astype(np.float32)
    noisy = ref + rng.standard_normal(ref.shape).astype(np.float32) * 1e-4
    c = compare(noisy, ref)
    assert c.ok and c.max_row_rel_l2 < 1e-3 and c.outside_share == 0.0
    bad = ref.copy()
    bad[2] *= 1.5  # one row scaled: a cheap "wrong layer" forgery
    c = compare(bad, ref)
    assert not c.ok and c.max_row_rel_l2 > 0.4
    assert not compare(ref[:3], ref).ok
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert not compare(nan, ref).ok
    assert compare(bad, ref, Tolerance(max_row_rel_l2=1.0, max_outside_share=1.0)).ok
