"""`python -m p2prl.bench [options]`: see p2prl.bench.runs."""
import sys

from p2prl.bench.runs import main

if __name__ == "__main__":
    sys.exit(main())
