"""``python -m rca_fast.train`` (and ``torchrun ... -m rca_fast.train``): see ``rca_fast.train``."""
from rca_fast.train import TrainingInterrupted, main
from rca_fast.utils.program import run_program

# 130: the shell's code for a run ended by SIGINT
run_program(main, [(TrainingInterrupted, 130, "stopped"), (FloatingPointError, 1, "error")])
