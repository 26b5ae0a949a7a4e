"""``python -m r4b_fast.compile_check``: see the package docstring."""

import sys

from r4b_fast.compile_check.cli import main

sys.exit(main())
