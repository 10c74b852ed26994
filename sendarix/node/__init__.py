"""A running node: the service tree, the twistd plugin's options, worker processes."""
