"""``python -m triopool``: see `triopool._cli`."""

import sys

from ._cli import main

sys.exit(main())
