"""The model layer: memory bank and RCA network."""
from .memory_bank import MemoryBank

__all__ = ["MemoryBank"]
