"""The model layer: memory bank and RCA network."""
from .memory_bank import MemoryBank
from .losses import rca_loss
from .rca import RCAModel, RCAOutput

__all__ = ["MemoryBank", "RCAModel", "RCAOutput", "rca_loss"]
