"""Between the session and the queue: header cleanup, content filters (``filters/``),
DKIM signing and the intake that commits a message to the spool (Postfix's
cleanup(8))."""
