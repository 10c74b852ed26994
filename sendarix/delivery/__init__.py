"""The delivery agent: the Twisted service that carries out the scheduler's
decisions over egress sessions and records each outcome."""
