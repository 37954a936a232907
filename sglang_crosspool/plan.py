"""`python -m sglang_crosspool.plan ...`: the KV planner's command line (see
`sglang_crosspool.planner`). Kept to a forwarder so that importing it stays light."""

import sys

from sglang_crosspool.planner.cli import main

if __name__ == "__main__":
    sys.exit(main())
