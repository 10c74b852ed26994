"""Tests of sendarix.events.webhooks."""
