"""`infra.runner.run` runs services with the cycle collector tuned (GC_THRESHOLD)."""

from __future__ import annotations

import gc

from infra.runner import GC_THRESHOLD, run


def test_run_freezes_what_start_up_loaded_and_raises_the_collection_threshold() -> None:
    before = gc.get_threshold()
    try:

        async def seen() -> int:
            assert gc.get_threshold() == GC_THRESHOLD
            return gc.get_freeze_count()

        assert run(seen()) > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
