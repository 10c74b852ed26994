"""Outcomes made visible: the sinks each event goes to (the event itself is a
:mod:`sendarix.model.event`; the searchable delivery log is a store)."""
