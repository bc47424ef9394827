"""Triton kernels of rca_fast, installed as ``rca_fast.kernels``: one folder per op (``map/``,
``nce/``, ``attention/``: forward, backward, tiles), shared launch and maths helpers beside them
(``launch_rule.py``, ``precise_math.py``, ``compile_specs.py``, ``offline_compile.py``).

Nothing here is imported by ``import rca_fast``: ``rca_fast.ops`` loads a kernel module the first
time an op runs on the Triton backend.  Kernels import nothing of the model or the programs.
"""
