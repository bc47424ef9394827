"""``python -m rca_fast.profile ops|step ...`` (see ``rca_fast.profile.cli``)."""
import sys

from rca_fast.profile.cli import main

try:
    main()
except (ValueError, FileNotFoundError) as exc:  # bad flags or shapes, missing data: no traceback
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
