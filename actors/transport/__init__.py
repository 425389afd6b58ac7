"""Transports behind one interface: `TcpTransport` and the in-memory `MemoryNetwork`."""

from .base import Address, Listener, Stream, StreamHandler, Transport
from .memory import MemoryNetwork, MemoryTransport
from .tcp import TcpTransport

__all__ = ["Address", "Listener", "MemoryNetwork", "MemoryTransport", "Stream", "StreamHandler", "TcpTransport", "Transport"]
