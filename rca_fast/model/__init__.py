"""The model layer: memory bank and RCA network."""
from .losses import rca_loss
from .memory_bank import MemoryBank
from .rca import RCAModel, RCAOutput

__all__ = ["MemoryBank", "RCAModel", "RCAOutput", "rca_loss"]
