"""The HTTP API: sending and managing over JSON (``/v1``), beside the operations
endpoints (``/metrics``, ``/healthz``, ``/readyz``), on twisted.web with Klein routes.

``site`` is the server (size limits, the error envelope), ``auth`` turns an API key
into a principal (credential, tenant, scopes), ``app`` holds the routes, which call the
same functions as the command line; ``openapi.yaml`` describes them all.
"""
