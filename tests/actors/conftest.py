"""Helpers for the actors tests: systems on either transport."""

from __future__ import annotations

from typing import AsyncIterator, Callable

import pytest

from actors import ActorSystem, MemoryNetwork, NodeIdentity, TcpTransport

from actor_kit import SECRET


@pytest.fixture(params=["tcp", "memory"])
async def make_system(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., ActorSystem]]:
    """A factory of started systems on the parametrized transport; stops them all after."""
    net = MemoryNetwork()
    systems: list[ActorSystem] = []
    names = iter(f"n{i}" for i in range(100))

    async def make(secret: bytes = SECRET, **kw) -> ActorSystem:
        name = next(names)
        transport = TcpTransport() if request.param == "tcp" else net.transport(name)
        system = ActorSystem(NodeIdentity.generate(), secret, transport=transport, **kw)
        await system.start("127.0.0.1", 0)
        systems.append(system)
        return system

    make.kind = request.param  # type: ignore[attr-defined]
    make.net = net  # type: ignore[attr-defined]
    yield make
    for s in systems:
        await s.stop()
