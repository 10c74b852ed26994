"""Where mail comes in: the ESMTP submission server, its policy checks, SASL, the
DATA/BDAT readers and the submission limits (Postfix's smtpd and smtpd_check)."""
