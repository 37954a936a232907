"""`python -m sglang_crosspool.planner` (same as `python -m sglang_crosspool.plan`)."""

import sys

from sglang_crosspool.planner.cli import main

sys.exit(main())
