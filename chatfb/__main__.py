"""`python -m chatfb ...` (see chatfb.cli)."""

import sys

from chatfb.cli import main

sys.exit(main())
