#!/usr/bin/env python3
"""Splits the fused decode tail kernel's launches into phases, from a kernel
timeline (MAMBA_SERVE_TAIL=1 MAMBA_SERVE_TIMELINE=FILE mamba-serve bench ...,
batch 1).

Thread 0 of every block of `mamba1_tail_*` (tag 19, kernels/step.cu) marks
its start (event 0), the return of its dependent-launch wait (1), x_proj
summed (3), xdbl handed over (4), the step done (5), y handed over (6),
out_proj's weights in shared memory (7) and its end (2). Over the last 50
whole launches but the final 10 (a step's layers), this prints for each
segment the median over launches of the median block's time and of the
slowest block's, and the median launch span (first start to last end).
The marks cost thread 0 an atomic each (~0.4 us), which the segments
include.

Usage: scripts/tail-phases.py FILE
"""
import collections
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import timeline  # noqa: E402  (the record format's reader)

TAIL = 19  # TL_TAIL
ORDER = [0, 1, 3, 4, 5, 6, 7, 2]
NAMES = {
    (0, 1): "start to wait returned",
    (1, 3): "x_proj summed",
    (3, 4): "barrier: xdbl",
    (4, 5): "step",
    (5, 6): "barrier: y",
    (6, 7): "out_proj weights waited",
    (7, 2): "out_proj, residual",
}
SAME_LAUNCH_NS = 5_000  # block starts of one launch lie closer than this


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    recs = sorted((t, e, blk) for t, tag, e, blk, _ in timeline.raw(sys.argv[1]) if tag == TAIL)
    starts = [r for r in recs if r[1] == 0]
    if not starts:
        sys.exit("no fused tail records (was MAMBA_SERVE_TAIL set?)")
    groups = [[starts[0]]]
    for r in starts[1:]:
        (groups[-1].append(r) if r[0] - groups[-1][-1][0] < SAME_LAUNCH_NS else groups.append([r]))
    full = max(len(g) for g in groups)
    launches = [g for g in groups if len(g) == full][-60:-10]
    med, slow, span = collections.defaultdict(list), collections.defaultdict(list), []
    for i, g in enumerate(launches):
        lo = g[0][0]
        hi = launches[i + 1][0][0] if i + 1 < len(launches) else lo + 100_000
        blocks = collections.defaultdict(dict)
        for t, e, blk in recs:
            if lo <= t < hi:
                blocks[blk].setdefault(e, t)
        per = collections.defaultdict(list)
        for ev in blocks.values():
            for a, b in zip(ORDER, ORDER[1:]):
                if a in ev and b in ev:
                    per[(a, b)].append(ev[b] - ev[a])
        for k, v in per.items():
            med[k].append(statistics.median(v))
            slow[k].append(max(v))
        ends = [ev[2] for ev in blocks.values() if 2 in ev]
        if ends:
            span.append(max(ends) - lo)
    print(f"{len(launches)} launches of {full} blocks")
    print(f"{'segment':26} {'median':>8} {'slowest':>8}   (us)")
    for k, name in NAMES.items():
        if med[k]:
            print(f"{name:26} {statistics.median(med[k]) / 1000:8.2f} {statistics.median(slow[k]) / 1000:8.2f}")
    if span:
        print(f"launch span (first start to last end): {statistics.median(span) / 1000:.2f} us")


if __name__ == "__main__":
    main()
