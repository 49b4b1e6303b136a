"""Process-level robustness: the allocator settings made at start (see pipeline.core.memory for the
measurements behind them), and a payload that cannot be encoded never stopping the publisher."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import parse_config
from pipeline.core.memory import fix_mmap_threshold, keep_freed, limit_arenas


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_mmap_threshold_is_glibcs_by_default_and_can_be_fixed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # glibc's dynamic threshold by default: a fixed 128 KB one put every converted camera frame on
    # fresh mmap'd pages (8 x 1280x720 at imgsz 320: 120 vs 146 frames/s, see pipeline.core.memory)
    assert parse_config({}, tmp_path).pipeline.malloc_mmap_threshold_kb == 0
    assert fix_mmap_threshold(128) is True  # glibc accepted it
    assert fix_mmap_threshold(0) is False  # 0 leaves glibc's dynamic threshold alone


def probe(code: str, arg: int) -> int:
    """The number a probe script prints, run with `arg` in a fresh process (allocator settings are per process)."""
    out = subprocess.run([sys.executable, "-c", code, str(arg)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=60)
    return int(out.stdout.strip())


FAULTS_PROBE = """
import resource, sys
import numpy as np
from pipeline.core.memory import keep_freed
keep_freed(int(sys.argv[1]))
def batch():  # a batch of four 720p frames converted to BGR, then freed
    frames = [np.ones((720, 1280, 3), np.uint8) for _ in range(4)]
    return sum(int(f[0, 0, 0]) for f in frames)
for _ in range(5):
    batch()  # warm-up: the heap grows to the working set once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_frames_are_reused_not_faulted_in_anew(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With glibc's dynamic thresholds a batch of converted 720p frames freed more than the heap keeps,
    so each batch faulted its 11 MB in again (a 720p conversion: 1.0-1.2 ms in a batch, 0.4 alone)."""
    assert parse_config({}, tmp_path).pipeline.malloc_trim_threshold_kb == 128 * 1024
    assert keep_freed(0) is False  # 0 leaves glibc's dynamic thresholds alone
    # minor page faults of 50 batches, counted by the kernel
    pages = 50 * 4 * 720 * 1280 * 3 // 4096  # every frame's pages, once per batch
    assert probe(FAULTS_PROBE, 0) > pages // 2  # glibc's dynamic thresholds: faulted in again, batch after batch
    assert probe(FAULTS_PROBE, 128 * 1024) < pages // 50  # kept: the same memory serves every batch


ARENAS_PROBE = """
import ctypes, ctypes.util, sys, tempfile, threading
from pipeline.core.memory import limit_arenas
limit_arenas(int(sys.argv[1]))
together = threading.Barrier(8)
def work():
    together.wait()  # eight threads allocating at once, each wanting an arena of its own
    kept = [bytearray(1000) for _ in range(20000)]
    together.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes, libc.fclose.argtypes = [ctypes.c_int, ctypes.c_void_p], [ctypes.c_void_p]
path = tempfile.mktemp()
f = libc.fopen(path.encode(), b"w"); libc.malloc_info(0, f); libc.fclose(f)
print(open(path).read().count("<heap nr="))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_malloc_arenas_are_limited_to_two_by_default(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert parse_config({}, tmp_path).pipeline.malloc_arenas == 2
    assert limit_arenas(0) is False  # 0 leaves glibc's default alone
    # arenas counted by glibc's own malloc_info
    assert probe(ARENAS_PROBE, 0) > 2  # glibc's default: an arena per thread here, up to 8 per core
    assert probe(ARENAS_PROBE, 2) == 2


def test_unencodable_payload_is_dropped_and_counted_not_raised() -> None:
    """`publish` never raises: a NaN (or an unknown type) drops that message, counted by kind;
    numpy numbers are published as plain JSON numbers."""
    import json

    import numpy as np

    from pipeline import MqttConfig, Publisher

    pub = Publisher(MqttConfig(url="mqtt://127.0.0.1:1"))
    pub.publish("fg/stats", {"fps": float("nan")})
    pub.publish("fg/streams/a/state", {"x": object()})
    pub.publish("fg/streams/a/detections", {"n": np.int64(3), "boxes": np.zeros((1, 4), np.float32)})
    c = pub.counters()
    assert c["dropped_unencodable"] == 2
    assert c["dropped_by_kind"] == {"stats": 1, "state": 1}
    assert c["buffered"] == 1
    assert json.loads(pub._buffer[0].payload) == {"n": 3, "boxes": [[0.0, 0.0, 0.0, 0.0]]}
