"""Outcomes made visible: the event record and its sinks."""
