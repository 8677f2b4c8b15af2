"""``python -m benchmarks [SCENARIO ...] [--json-dir DIR]``: the benchmark suite."""

import sys

from benchmarks.suite import main

if __name__ == "__main__":
    sys.exit(main())
