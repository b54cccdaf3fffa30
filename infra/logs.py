"""Logging set-up. Phone numbers are masked where they are logged (`infra.masking`)."""

from __future__ import annotations

import logging

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # aio-pika and aiormq are chatty about reconnects at INFO.
    quieter = max(logging.WARNING, logging.getLevelNamesMapping()[level])
    logging.getLogger("aiormq").setLevel(quieter)
    logging.getLogger("aio_pika").setLevel(quieter)
