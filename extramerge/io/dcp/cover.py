"""Do a tensor's DCP chunks tile it exactly? Checked in O(n log n) for n chunks of any rank.

Boxes are half-open: [lo, hi) in every dimension. The chunks tile the tensor T exactly when the signed sum
G = Σ_c 1_c − 1_T is zero everywhere. Along dimension 0, G(x, ·) changes only at the chunks' and T's
edges; at an edge x the change is the signed sum of the (d−1)-dimensional faces starting there (+) and
ending there (−). So G ≡ 0 exactly when, at every edge x, that change is zero as a (d−1)-dimensional
signed sum: the same question one dimension down, until, with no dimension left, a sum of signs.
Identical faces with opposite signs cancel before going down (one row of FSDP shards ends where the next
begins, with the same extent in the other dimensions), so a grid of chunks costs O(n) faces and any
cover at most 2^d faces per chunk; the sorting of edges adds the log n. The first point where a change
is not zero names a place where chunks overlap or leave a gap.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["uncovered", "overlapping"]

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (lo, hi)


def uncovered(shape: Sequence[int], boxes: Sequence[Box], work: int | None = None) -> tuple[int, ...] | None:
    """None if ``boxes`` (each inside ``shape``) tile [0, shape) exactly; else a corner (offsets) where
    their count changes wrongly. Raises ValueError after more than ``work`` faces (default 64 per box
    plus 10**6) instead of running on (a crafted set of boxes in many dimensions)."""
    budget = 64 * len(boxes) + 10**6 if work is None else work
    level: dict = {}
    for lo, hi in boxes:
        level[(lo, hi)] = level.get((lo, hi), 0) + 1
    whole = (tuple(0 for _ in shape), tuple(shape))
    level[whole] = level.get(whole, 0) - 1
    todo: list[tuple[tuple[int, ...], dict]] = [((), level)]
    while todo:
        at, faces = todo.pop()
        faces = {box: s for box, s in faces.items() if s}
        budget -= len(faces)
        if budget < 0:
            raise ValueError("too many faces to compare")
        if not faces:
            continue
        if not next(iter(faces))[0]:  # no dimension left: the signs did not cancel
            return at
        edges: dict[int, dict] = {}
        for (lo, hi), s in faces.items():
            face = (lo[1:], hi[1:])
            for x, sign in ((lo[0], s), (hi[0], -s)):
                e = edges.setdefault(x, {})
                e[face] = e.get(face, 0) + sign
        for x in sorted(edges, reverse=True):  # smallest edge handled first
            todo.append(((*at, x), edges[x]))
    return None


def overlapping(point: Sequence[int], boxes: Sequence[Box]) -> list[int]:
    """Indices of two or more boxes holding one element at ``point`` or just before it in some dimensions
    (the corner ``uncovered`` names is where a wrong count begins); [] if no such element is found."""
    for k in range(min(2 ** len(point), 64)):
        q = [p - ((k >> i) & 1) for i, p in enumerate(point)]
        hit = [j for j, (lo, hi) in enumerate(boxes) if all(map(_holds, lo, q, hi))]
        if len(hit) > 1:
            return hit
    return []


def _holds(lo: int, x: int, hi: int) -> bool:
    return lo <= x < hi
