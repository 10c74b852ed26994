"""The ``sendarix`` command: ``main.py`` parses and dispatches, one module per command
group adds its commands (``config``, ``credentials``, ``domains``, ``suppressions``,
``queue``, ``log``, ``webhooks``), ``common.py`` holds what they share; ``sink/`` is
the test sink."""
