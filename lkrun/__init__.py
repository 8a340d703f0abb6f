"""lkrun: host many LiveKit agents from one manifest, one subprocess per job."""

__version__ = "0.1.0"
