"""The fault soak (``python -m tests.soak``): not part of the normal suite."""
