"""twistd plugin drop-in: ``twistd -n sendarix``."""

from twisted.application.service import ServiceMaker

sendarix = ServiceMaker(
    "Sendarix",
    "sendarix.tap",
    "SMTP relay: submission, durable spool, delivery.",
    "sendarix",
)
