"""``python -m rca_fast.profile ops|step ...`` (see ``rca_fast.profile.cli``)."""
from rca_fast.profile.cli import main
from rca_fast.utils.program import run_program

run_program(main)   # bad flags or shapes, missing data: one line, exit 2
