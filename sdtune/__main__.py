"""`python -m sdtune`: the `sdtune` command."""

import sys

from sdtune.cli import main

sys.exit(main())
