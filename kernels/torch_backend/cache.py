"""The KV cache of a torch stage: one preallocated slot pool shared by all sessions.

Keys and values live in ``k``/``v`` of shape ``(layers, slots, kv_heads, capacity, head_dim)``.
Each session owns a slot; its cached length is tracked here. The pool grows by
doubling (slots or capacity) only when a session needs more room, so a decode
step never allocates cache memory. When a session ends and the live sessions need less
than a quarter of the pool, it shrinks to their size (never below the initial one): one long
session must not pin slots x its length for the life of the stage. Batched decode reads the slots of a batch as
one padded ``(B, kv_heads, L, head_dim)`` tensor plus a mask of valid positions
(float32), or each session's own positions (quant mode: batch-invariant).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int,
                 slots: int = 4, capacity: int = 256):
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.max_len = max_len
        self.slot_of: dict[str, int] = {}
        self.length: dict[str, int] = {}
        self.min_slots, self.min_capacity = slots, min(capacity, max_len)
        self._alloc(slots, self.min_capacity)

    def _alloc(self, slots: int, capacity: int) -> None:
        shape = (self.n_layers, slots, self.n_kv_heads, capacity, self.head_dim)
        k, v = torch.zeros(shape), torch.zeros(shape)
        old = getattr(self, "k", None)
        if old is not None:
            s, c = old.shape[1], old.shape[3]
            k[:, :s, :, :c] = self.k
            v[:, :s, :, :c] = self.v
        self.k, self.v = k, v

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def _shrink_to_fit(self) -> None:
        """Re-pack the live sessions into the smallest power-of-two pool that holds them,
        when that is at most a quarter of the current one: a pool that just doubled for one
        more session must not shrink and grow again with every session that comes and goes."""
        slots = self.min_slots
        while slots < len(self.slot_of):
            slots *= 2
        longest = max(self.length.values(), default=0)
        capacity = self.min_capacity
        while capacity < longest:
            capacity *= 2
        capacity = min(capacity, max(self.max_len, longest))
        if 4 * slots * capacity > self.k.shape[1] * self.capacity:
            return
        shape = (self.n_layers, slots, self.n_kv_heads, capacity, self.head_dim)
        k, v = torch.zeros(shape), torch.zeros(shape)
        for new, (session, old) in enumerate(sorted(self.slot_of.items(), key=lambda kv: kv[1])):
            n = self.length.get(session, 0)
            k[:, new, :, :n] = self.k[:, old, :, :n]
            v[:, new, :, :n] = self.v[:, old, :, :n]
            self.slot_of[session] = new
        self.k, self.v = k, v

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def cache_len(self, session: str) -> int:
        return self.length.get(session, 0)

    def free(self, session: str) -> None:
        """Forget ``session`` and return memory the others do not need. Called between steps
        (on the compute thread), so no step holds a slot number across the re-pack."""
        if self.slot_of.pop(session, None) is None:
            return
        self.length.pop(session, None)
        self._shrink_to_fit()

    def reserve(self, session: str, start_pos: int, n_new: int) -> int:
        """Truncate the session to ``start_pos``, make room for ``n_new`` more; return its slot."""
        if session not in self.slot_of:
            used = set(self.slot_of.values())
            free = next((s for s in range(self.k.shape[1]) if s not in used), None)
            if free is None:
                free = self.k.shape[1]
                self._alloc(2 * free, self.capacity)
            self.slot_of[session] = free
        need = start_pos + n_new
        if need > self.capacity:
            cap = self.capacity
            while cap < need:
                cap *= 2
            self._alloc(self.k.shape[1], min(cap, max(self.max_len, need)))
        self.length[session] = need
        return self.slot_of[session]
