import sys

from fused_rlvr.train import main

sys.exit(main())
