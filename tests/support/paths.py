"""Where the checkout's own files are, for tests that read ``etc/`` or run the package."""

import os

#: The repository root (the folder holding ``sendarix/``, ``tests/`` and ``etc/``).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
