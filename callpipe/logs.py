"""Logging set-up. Phone numbers are masked where they are logged (`workers.phones.mask_phone`)."""

from __future__ import annotations

import logging
import os


def setup_logging() -> None:
    level = os.environ.get("CALLPIPE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aio-pika and aiormq are chatty about reconnects at INFO.
    logging.getLogger("aiormq").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    logging.getLogger("aio_pika").setLevel(max(logging.WARNING, logging.getLevelName(level)))
