"""`python -m sglang_crosspool.plan ...`: the KV planner's command line (see
`sglang_crosspool.planner`). Kept to a forwarder so that importing it stays light."""

import sys

from sglang_crosspool.planner.cli import main

if __name__ == "__main__":
    if sys.argv[1:2] == ["kv-split"]:  # KV per request by attention split (planner/kv_split.py)
        from sglang_crosspool.planner.kv_split import main as kv_split

        sys.exit(kv_split(sys.argv[2:]))
    sys.exit(main())
