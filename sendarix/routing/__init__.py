"""Routing: deciding which hosts and addresses receive mail for a destination."""
