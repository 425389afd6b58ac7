"""mesh: a verifiable, self-healing, peer-to-peer inference mesh for the devices in one home."""

__version__ = "0.1.0"
