"""What happens to queued mail and when: ready queues, destination windows, retry
schedule and reply classification (Postfix's qmgr; KumoMTA's scheduled and ready
queues). Pure: no I/O, time is passed in."""
