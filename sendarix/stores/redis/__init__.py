"""Shared state in Redis for several nodes: the connection (``connection``), credentials,
suppression lists, the delivery log and the outbound throttle.

The spool itself is :mod:`sendarix.stores.redis.spool`.  Every store here takes the same
:class:`~sendarix.stores.redis.connection.RedisClient` (one txredisapi connection pool per
process) and keeps its keys under its own part of the key prefix.
"""
