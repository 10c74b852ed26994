"""Control: how people and programs outside the message path see and steer the node.

The command line (``cli``) works on the stores directly; the HTTP API (``api``) serves
the same operations over JSON, beside the metrics and the operator dashboard.  Both call
one implementation of each operation.
"""
