"""Process memory behaviour: at most two glibc malloc arenas, freed memory kept for reuse, and an optional
fixed mmap threshold.

glibc gives threads their own malloc arenas, up to 8 per core. framegrid's threads come and go
(each stream's decoder, slot workers after a restart) and every arena keeps its own fragmented
heaps: 60 streams added and removed at runtime grew RSS by 98 MB with glibc's default, by 26 MB
with `MALLOC_ARENA_MAX=2` set before start and by 44 MB with the same limit set by `mallopt` when
the pipeline starts (`pipeline.malloc_arenas = 2`, the default; threads made before keep theirs).
It costs no throughput: 16 cameras x 320 through OpenVINO, two runs each, 176 and 184 frames/s
with glibc's default, 208 and 197 with two arenas (9.3-9.7 vs 8.4-8.8 ms of CPU per frame; RSS
growth over the window 5.9% vs 2.2-2.7%).

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

The dynamic threshold still gave the pages back too soon: glibc trims a heap whose free top grows
past twice the threshold (5.4 MB after a 720p frame), and a batch of two frames converted to BGR
frees more than that (each conversion allocates the reformatted picture and its array, 2.7 MB
each). So every batch of two or more faulted its frames' memory in anew: converting a 720p frame
took 1.0-1.2 ms in a batch instead of 0.4 ms alone. `pipeline.malloc_trim_threshold_kb` (128 MB by
default) keeps that much free heap for reuse, and with it every block up to 32 MB (glibc's most)
comes from the heap: 0.39-0.46 ms per frame in batches of 2 and 4 (16 cameras x 320: preprocess
per batch 4.8 -> 3.0 ms, RSS ~30 MB higher and flat).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper bound for it on 64-bit
M_ARENA_MAX = -8


def _mallopt(param: int, value: int, what: str) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: leave the allocator alone
        return False
    ok = bool(mallopt(param, value))
    if not ok:
        log.warning("could not set the malloc %s to %d", what, value)
    return ok


def fix_mmap_threshold(kib: int) -> bool:
    """Set a fixed glibc mmap threshold (disables the dynamic one); False where not glibc or kib is 0."""
    return kib > 0 and _mallopt(M_MMAP_THRESHOLD, kib * 1024, "mmap threshold (bytes)")


def keep_freed(kib: int) -> bool:
    """Keep up to `kib` of freed heap memory for reuse (glibc's trim threshold) and take every block up
    to 32 MB from the heap (setting either ends glibc's dynamic thresholds); False where not glibc or
    kib is 0. A fixed mmap threshold set after this (`fix_mmap_threshold`) wins."""
    return (kib > 0 and _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX, "mmap threshold (bytes)")
            and _mallopt(M_TRIM_THRESHOLD, kib * 1024, "trim threshold (bytes)"))


def limit_arenas(arenas: int) -> bool:
    """At most `arenas` glibc malloc arenas for the threads started from now on; False where not
    glibc or arenas is 0 (glibc's default: 8 per core)."""
    return arenas > 0 and _mallopt(M_ARENA_MAX, arenas, "arena limit")
