"""`python -m autojac` is the `autojac` command."""

import sys

from ._cli import main

sys.exit(main())
