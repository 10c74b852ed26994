"""``python -m sendarix.control.cli.sink``: the sink as its own process."""

import sys

from sendarix.control.cli.sink.command import main

sys.exit(main())
