"""Process memory behaviour: an optional fixed glibc mmap threshold.

glibc raises its mmap threshold dynamically (up to 32 MB) after large blocks are freed; from then
on big buffers come from per-thread heaps and are reused. When inference allocated 23 MB float
batch tensors per batch, that fragmented those heaps (RSS climbing 755 -> 957 MB over minutes at
8 cameras x 640), and a fixed 128 KB threshold (`pipeline.malloc_mmap_threshold_kb = 128`)
kept them on mmap. Since then the input buffers are reused per shape and small (uint8 for
OpenVINO), and frames are converted on dispatch at their own size: with a fixed threshold every
converted 1280x720 frame (2.7 MB) landed on fresh mmap'd pages, faulted in and zeroed by the
kernel, costing 18% of the throughput at 8 cameras x 320 (120 vs 146 frames/s). The default is
glibc's dynamic threshold again (0): ten minutes at 8 cameras x 640 grew RSS 3.3% after warm-up
(631 -> 647 MB, flat from minute 3.5).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def fix_mmap_threshold(kib: int) -> bool:
    """Set a fixed glibc mmap threshold (disables the dynamic one); False where not glibc or kib is 0."""
    if kib <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: leave the allocator alone
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, kib * 1024))
    if not ok:
        log.warning("could not set the malloc mmap threshold to %d KiB", kib)
    return ok
