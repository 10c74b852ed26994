"""The ``sendarix`` command (``main.py``) and the test sink (``sink.py``)."""
