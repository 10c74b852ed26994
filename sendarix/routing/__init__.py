"""Where mail goes: routing rules, MX lookup, smarthost pools, provider shaping and
the in-memory throttle."""
