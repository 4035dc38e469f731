"""`python -m fused_rlvr.train ARGS`: the same as `fused-rlvr train ARGS` (thread and OpenMP set-up, one-line
input errors)."""

import sys

from fused_rlvr.cli import main

sys.exit(main(["train", *sys.argv[1:]], reexec=True))
