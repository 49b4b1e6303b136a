"""Zones and lines of a stream: geometry only (no state, no I/O).

A zone is a polygon, a line a segment, in source-frame pixels or, when every coordinate is at
most 1, in fractions of the frame (resolved against each frame's size, so they survive a
resolution change). An object is in a zone by its anchor point (bottom-centre by default: where
it stands); it crosses a line when its anchor's path between two frames intersects the segment.
Direction: `in` is a crossing to the right-hand side of someone walking from a to b on the image
(y down): for a line drawn downwards, `in` is towards the frame's left.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

Point = tuple[float, float]

ANCHORS = ("bottom_center", "center", "top_center", "bottom_left", "bottom_right")


def anchor_of(box: Sequence[float], anchor: str) -> Point:
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    cx = (x1 + x2) / 2
    return {"bottom_center": (cx, y2), "center": (cx, (y1 + y2) / 2), "top_center": (cx, y1),
            "bottom_left": (x1, y2), "bottom_right": (x2, y2)}[anchor]


def resolve(points: Sequence[Sequence[float]], width: int, height: int) -> list[Point]:
    """Pixels as given, or fractions (every coordinate <= 1) scaled to the frame."""
    fractions = all(0 <= float(v) <= 1 for p in points for v in p)
    if fractions:
        return [(float(x) * width, float(y) * height) for x, y in points]
    return [(float(x), float(y)) for x, y in points]


def inside(point: Point, polygon: Sequence[Point]) -> bool:
    """Even-odd rule (ray casting); a point on an edge counts as inside."""
    x, y = point
    result = False
    n = len(polygon)
    for i in range(n):
        (x1, y1), (x2, y2) = polygon[i], polygon[(i + 1) % n]
        if _on_segment(point, (x1, y1), (x2, y2)):
            return True
        if (y1 > y) != (y2 > y):
            xi = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
            if x < xi:
                result = not result
    return result


def side(point: Point, a: Point, b: Point) -> float:
    """> 0 right of a->b (image coordinates), < 0 left, 0 on the line."""
    return (b[0] - a[0]) * (point[1] - a[1]) - (b[1] - a[1]) * (point[0] - a[0])


def crossing(p: Point, q: Point, a: Point, b: Point) -> Literal["in", "out"] | None:
    """`in` (left -> right of a->b), `out`, or None when the path p->q does not cross the segment a-b.

    A path that only touches the line is no crossing; a path that ends on the line crosses when it
    leaves it on the other side (the caller keeps the last point strictly off the line)."""
    s1, s2 = side(p, a, b), side(q, a, b)
    if s1 == 0 or s2 == 0 or (s1 > 0) == (s2 > 0):
        return None
    t1, t2 = side(a, p, q), side(b, p, q)
    if (t1 > 0) == (t2 > 0) and t1 != 0 and t2 != 0:
        return None  # the segment a-b lies on one side of the path: they do not meet
    return "in" if s1 < 0 < s2 else "out"


def _on_segment(p: Point, a: Point, b: Point) -> bool:
    if abs(side(p, a, b)) > 1e-9:
        return False
    return min(a[0], b[0]) - 1e-9 <= p[0] <= max(a[0], b[0]) + 1e-9 and \
        min(a[1], b[1]) - 1e-9 <= p[1] <= max(a[1], b[1]) + 1e-9
