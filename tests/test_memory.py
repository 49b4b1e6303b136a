"""The allocator setting framegrid makes at start (see pipeline.memory for the measurement behind it)."""

from __future__ import annotations

import sys

import pytest

from pipeline import parse_config
from pipeline.memory import fix_mmap_threshold


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_mmap_threshold_is_fixed_by_default(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert parse_config({}, tmp_path).pipeline.malloc_mmap_threshold_kb == 128
    assert fix_mmap_threshold(128) is True  # glibc accepted it
    assert fix_mmap_threshold(0) is False  # 0 leaves glibc's dynamic threshold alone
