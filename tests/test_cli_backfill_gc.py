"""The garbage collector during `escrowd backfill`: the start-up heap frozen, young
collections rare, and the process's settings back afterwards."""

from __future__ import annotations

import gc

from escrowd.daemon import cli_backfill


def test_a_backfill_collects_young_objects_rarely_and_restores_the_collector() -> None:
    before = gc.get_threshold()
    try:
        with cli_backfill._collecting_for_a_backfill():
            assert gc.get_threshold() == (cli_backfill.BACKFILL_GC_THRESHOLD, *before[1:])
            assert gc.get_freeze_count() > 0
            # Short-lived allocations far past the default threshold: no collection runs.
            collections = gc.get_stats()[0]["collections"]
            junk = [[n] for n in range(cli_backfill.BACKFILL_GC_THRESHOLD // 2)]
            assert gc.get_stats()[0]["collections"] == collections
            del junk
        assert gc.get_threshold() == before
    finally:
        gc.unfreeze()
