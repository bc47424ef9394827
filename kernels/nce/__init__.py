"""Bank NCE with region mixup: ``forward.py`` (kernels, launcher, custom ops, provider),
``backward.py`` (d loss / d query), ``tiles.py`` (similarity tiles and launch-size helpers)."""
