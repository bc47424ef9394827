"""``python -m rca_fast.profile ops|step ...`` (see ``rca_fast.profile.cli``)."""
from rca_fast.profile.cli import main

main()
