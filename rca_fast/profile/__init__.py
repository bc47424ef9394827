"""Throughput profiler of rca_fast: ``python -m rca_fast.profile ops|step ...``.

``ops`` times every op (forward and backward) on every backend against the device's ceilings
measured in the same run; ``step`` splits training steps into their parts under torch.profiler.
``main(argv)`` runs either in-process and returns the profile document.
"""


def main(argv=None):
    """Run the profiler with command-line arguments ``argv``; returns the profile document."""
    from .cli import main as _main
    return _main(argv)


__all__ = ["main"]
