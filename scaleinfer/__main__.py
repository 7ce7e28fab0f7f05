"""`python -m scaleinfer`: the `scaleinfer` command."""

import sys

from scaleinfer.cli import main

sys.exit(main())
