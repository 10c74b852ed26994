"""``python -m sendarix.cli``: the ``sendarix`` command."""

import sys

from sendarix.cli.main import main

sys.exit(main())
