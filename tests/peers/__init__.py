"""Test peers: local stand-ins for sink destinations and launchers of real servers (not shipped in the wheel)."""
