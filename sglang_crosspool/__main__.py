"""`python -m sglang_crosspool`: the same as `python -m sglang_crosspool.launch`."""

import sys

from sglang_crosspool.launch import main

if __name__ == "__main__":
    sys.exit(main())
