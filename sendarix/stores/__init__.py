"""Durable state: the spool and every other store, with one SQLite and one Redis
backend; ``sendarix.stores.backends`` picks the backend once for the whole node."""
