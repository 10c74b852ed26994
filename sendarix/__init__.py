"""Sendarix: an SMTP relay for application mail, on Twisted."""

__version__ = "0.1.0"
