"""The event-loop watch: a callback that holds the loop is named, by function, while it holds it."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from pipeline.mqtt.telemetry import process_figures
from streams.loopwatch import LoopFigures, LoopWatch, loop_figures


def hold_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # what a blocking call in a callback does to every stream


async def _watched(watch: LoopWatch, body: float) -> tuple[LoopFigures | None, LoopFigures | None,
                                                           LoopFigures | None]:
    task = asyncio.create_task(watch.run())
    await asyncio.sleep(0.2)
    quiet = process_figures()["loop"]
    hold_the_loop(body)
    await asyncio.sleep(0.2)  # the loop turns again: the stall ends and is counted
    after = loop_figures()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return quiet, after, loop_figures()


def test_a_blocked_loop_is_named_while_blocked_and_counted_after(caplog: pytest.LogCaptureFixture) -> None:
    watch = LoopWatch(stall_s=0.3, tick_s=0.05)
    with caplog.at_level(logging.WARNING, logger="streams.loopwatch"):
        quiet, after, gone = asyncio.run(_watched(watch, 0.9))
    assert quiet == {"stalls": 0, "longest_s": 0.0, "blocked_s": 0.0, "last_where": None}
    assert after is not None
    assert after["stalls"] == 1
    assert after["blocked_s"] == 0.0
    assert 0.8 <= after["longest_s"] < 1.5  # type: ignore[index]
    assert "hold_the_loop" in str(after["last_where"])  # type: ignore[index]
    # logged twice: while it held the loop (with the stack), and when it let go (with the length)
    texts = [r.getMessage() for r in caplog.records]
    assert any("not turned" in t and "hold_the_loop" in t and "_watched" in t for t in texts), texts
    assert any(t.startswith("event loop: blocked for 0.") for t in texts), texts
    assert gone is None  # a stopped watch leaves nothing behind


def test_short_pauses_are_not_stalls() -> None:
    watch = LoopWatch(stall_s=0.3, tick_s=0.05)
    _quiet, after, _ = asyncio.run(_watched(watch, 0.15))
    assert after == {"stalls": 0, "longest_s": 0.0, "blocked_s": 0.0, "last_where": None}


def test_nonsense_thresholds_are_refused() -> None:
    with pytest.raises(ValueError, match="stall_s"):
        LoopWatch(stall_s=0.1, tick_s=0.1)
