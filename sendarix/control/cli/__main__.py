"""``python -m sendarix.control.cli``: the ``sendarix`` command."""

import sys

from sendarix.control.cli.main import main

sys.exit(main())
