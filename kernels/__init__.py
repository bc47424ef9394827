"""Triton kernels of rca_fast, installed as ``rca_fast.kernels`` (one file per op).

Nothing here is imported by ``import rca_fast``: ``rca_fast.ops`` loads a kernel module the first
time an op runs on the Triton backend.  Kernels import nothing of the model or the programs.
"""
