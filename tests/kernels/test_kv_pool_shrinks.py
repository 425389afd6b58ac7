"""Issue 17: the torch KV pool grew to slots x the largest session and never shrank, so one
long prompt (or a flood of sessions) pinned that memory for the life of the stage."""

from __future__ import annotations

import torch

from kernels.torch_backend.cache import KVCache


def fill(cache: KVCache, session: str, length: int) -> None:
    slot = cache.reserve(session, 0, length)
    marker = float(hash(session) % 1000)
    cache.k[:, slot, :, :length] = marker
    cache.v[:, slot, :, :length] = -marker


def test_kv_pool_returns_memory_when_a_long_session_and_a_flood_end():
    cache = KVCache(n_layers=2, n_kv_heads=2, head_dim=4, max_len=8192, slots=4, capacity=256)
    initial = cache.nbytes
    for i in range(16):                      # a flood of sessions: the pool doubles its slots
        fill(cache, f"s{i}", 10)
    fill(cache, "long", 5000)                # and one long prompt: every slot doubles its length
    grown = cache.nbytes
    assert grown >= 32 * initial
    fill(cache, "keep", 40)
    for i in range(16):
        cache.free(f"s{i}")
    cache.free("long")
    assert cache.nbytes <= initial           # one short session left: back to the initial pool
    slot = cache.slot_of["keep"]             # and its keys and values survived the re-pack
    marker = float(hash("keep") % 1000)
    assert cache.cache_len("keep") == 40
    assert torch.all(cache.k[:, slot, :, :40] == marker) and torch.all(cache.v[:, slot, :, :40] == -marker)
    cache.free("keep")
    assert cache.nbytes == initial and cache.slot_of == {}


def test_kv_pool_does_not_thrash_at_steady_use():
    cache = KVCache(n_layers=1, n_kv_heads=1, head_dim=2, max_len=4096, slots=4, capacity=256)
    for i in range(5):
        fill(cache, f"s{i}", 300)
    size = cache.nbytes                      # 8 slots x 512 positions
    pools = set()
    for i in range(5, 25):                   # sessions come and go around the doubling point
        cache.free(f"s{i - 1}")
        fill(cache, f"s{i}", 300)
        pools.add(id(cache.k))
    assert cache.nbytes == size and len(pools) == 1  # no re-allocation at all
    for i in range(21, 25):
        cache.free(f"s{i}")
    for i in range(4):
        cache.free(f"s{i}")
    assert cache.nbytes < size
