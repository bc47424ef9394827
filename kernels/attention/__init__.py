"""Prototype attention: ``forward.py`` (kernel, launcher, custom ops, provider), ``backward.py``
(three launches), ``tiles.py`` (helpers both share)."""
