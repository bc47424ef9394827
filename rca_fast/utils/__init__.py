"""Helpers of the programs: checkpoints, CAMs, metrics, colours, logging."""
