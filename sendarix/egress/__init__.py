"""Leaving the node: the ESMTP client (Postfix's smtp(8)), reply parsing, and the
choice of source address (egress sources with warmup)."""
