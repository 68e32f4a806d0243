"""`python -m ravenp2p.cli`: the same as the `ravenp2p` console script."""

import sys

from ravenp2p.cli import main

sys.exit(main())
