"""Webhooks: each tenant's outcome events POSTed to its endpoints, signed the Standard
Webhooks way, from a durable outbox in the stores (docs/webhooks.md).

``signature.py`` (secrets and signing), ``schedule.py`` (when to retry, when to give
up) and the address check of ``ssrf.py`` are pure; ``sink.py`` puts events into the
outbox and ``dispatcher.py`` sends them.
"""
