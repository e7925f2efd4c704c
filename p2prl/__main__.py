"""`python -m p2prl COMMAND ...`: the same as the `p2prl` command (p2prl.cli)."""
import sys

from p2prl.cli import main

if __name__ == "__main__":
    sys.exit(main())
