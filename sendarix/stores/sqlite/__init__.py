"""The embedded backend: every store in one SQLite file (WAL, group commit)."""
