"""`python benchmarks/run.py [bench options]`: the `autojac bench` command, from a checkout."""

import sys

from autojac._cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
