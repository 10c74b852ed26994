"""The operator dashboard: server-rendered pages at ``/`` of the API endpoint.

Behind a login with an admin API key (a server-side session in a cookie), it shows
queue depth, throughput and outcome charts, destination, endpoint and egress-source
health, the delivery log with its search and each message's timeline, and offers the
operator's actions (retry or delete a queued message, remove a suppression, suspend or
resume a destination) as forms guarded by a per-session token.
"""
