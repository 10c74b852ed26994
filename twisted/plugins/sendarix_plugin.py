"""twistd plugin drop-in: ``twistd -n sendarix``."""

from twisted.application.service import ServiceMaker

sendarix = ServiceMaker(
    "Sendarix",
    "sendarix.node.tap",
    "SMTP relay: submission, durable spool, delivery.",
    "sendarix",
)
