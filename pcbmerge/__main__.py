"""`python -m pcbmerge` — the same as the `pcbmerge` command."""

import sys

from pcbmerge.cli import main

sys.exit(main())
