"""Value types of the mail path: what every stage hands to the next.

Nothing here does I/O or imports a stage package; ``sendarix.interfaces`` is written in
terms of these types alone."""
