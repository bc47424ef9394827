"""Masked average pooling: ``forward.py`` (kernel, launcher, custom ops, provider), ``backward.py``,
``tiles.py`` (helpers both share)."""
