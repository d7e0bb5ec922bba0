"""``python -m graphslim.cli``: the same as the ``graphslim`` command."""

import sys

from graphslim.cli.main import main

sys.exit(main())
