"""``python -m protogmm.cli ...``: the ``protogmm`` command (torchrun and the tests use it)."""

import sys

from protogmm.cli import main

if __name__ == "__main__":
    sys.exit(main())
