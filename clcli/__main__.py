"""``python -m clcli``: the command-line tool, the same as the ``clcli`` script.

Under torchrun this is the module to launch: ``torchrun --nproc-per-node 2 -m clcli pretrain ...``.
"""

from __future__ import annotations

import sys

from clcli.cli import main

if __name__ == "__main__":
    sys.exit(main())
