"""`python -m sglang_crosspool.planner` (same as `python -m sglang_crosspool.plan`)."""

import sys

from sglang_crosspool.planner.cli import main

if sys.argv[1:2] == ["kv-split"]:  # KV per request by attention split (kv_split.py)
    from sglang_crosspool.planner.kv_split import main as kv_split

    sys.exit(kv_split(sys.argv[2:]))
sys.exit(main())
