"""The ``sendarix`` command, one module per command group, and the test sink."""
