#!/usr/bin/env python3
"""Summarises a kernel timeline written by the CUDA backend.

Run `mamba-serve bench` with MAMBA_SERVE_TIMELINE=FILE: the instrumented
kernels (listed below) are compiled with timeline marks, and on exit the
newest records are written to FILE (see `tl_mark` in kernels/prelude.cu for
the format). This script groups the records into kernel launches, takes the
last whole decode step (the launches after one sampling launch up to the
next), and prints

- each launch of the step's first layers and its last few: the first and
  last block's start, dependent-launch wait and end, in µs from the step's
  start (a step ends with its sampling launch);
- the median gap between steps (the host reading the tokens back and
  launching the next step);
- per kind of launch, medians over the step: when its first block started,
  and when its first wait returned, after the previous launch's last block
  ended; its last block's end after its last wait (the body); its span
  after the previous launch (what the kind costs the step); and the spread
  of its blocks' ends (the tail).

Instrumented: the decode GEMVs, the decode steps and convs, the short-k
product, the 16-bit conversions, the row norms, the embedding and the
sampling. cuBLAS's kernels are not, so a launch after one shows the
cuBLAS time in its gap to the previous instrumented launch.

Usage: scripts/timeline.py FILE
"""
import bisect
import collections
import statistics
import struct
import sys

# The TL_* tags of kernels/prelude.cu.
TAGS = {
    1: "gemv",
    2: "stream",
    4: "step",
    5: "gemv-norm",
    6: "stream-norm",
    8: "conv-step",
    9: "conv-step4",
    10: "conv-staged",
    11: "step-wide",
    12: "step-lean",
    13: "shortk",
    14: "sample",
    15: "embed",
    16: "to-half",
    17: "norm-rows",
    18: "stack",
    19: "tail",
}
SAMPLE = 14
# Launches of one kernel shape whose first blocks start less than this far
# apart (ns) are one launch: a layer takes longer than this.
SAME_LAUNCH_NS = 8000


def raw(path):
    """Every record as (time, tag, event, block, third word)."""
    data = open(path, "rb").read()
    n = struct.unpack_from("<Q", data, 0)[0]
    recs = []
    for i in range(n):
        t, a, b = struct.unpack_from("<QQQ", data, 8 + 24 * i)
        recs.append((t, a >> 56, (a >> 48) & 0xFF, a & 0xFFFFFFFF, b))
    return recs


def read(path):
    """Every record as (time, tag, event, grid blocks, block threads)."""
    return [(t, tag, e, w >> 32, w & 0xFFFFFFFF) for t, tag, e, _, w in raw(path)]


def launches(recs):
    """(first start, (tag, blocks, threads), {event: sorted times}) of every
    launch whose blocks all started inside the records."""
    by_shape = collections.defaultdict(lambda: {0: [], 1: [], 2: []})
    for t, tag, event, blocks, threads in recs:
        if event <= 2:  # the stack kernel's phase marks are stack-phases.py's
            by_shape[(tag, blocks, threads)][event].append(t)
    out = []
    for shape, events in by_shape.items():
        for v in events.values():
            v.sort()
        groups = []
        for t in events[0]:
            if groups and t - groups[-1][-1] <= SAME_LAUNCH_NS:
                groups[-1].append(t)
            else:
                groups.append([t])
        bounds = [g[0] for g in groups] + [1 << 64]
        for i, g in enumerate(groups):
            if len(g) != shape[1]:
                continue  # cut off at the ring's start or end
            lo, hi = bounds[i], bounds[i + 1]
            ev = {e: v[bisect.bisect_left(v, lo) : bisect.bisect_left(v, hi)] for e, v in events.items()}
            out.append((g[0], shape, ev))
    out.sort()
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    recs = read(sys.argv[1])
    times = sorted({r[0] for r in recs})
    steps = [b - a for a, b in zip(times, times[1:]) if b > a]
    print(f"{len(recs)} records; timer step {min(steps) if steps else '?'} ns")
    ls = launches(recs)
    # A step ends with its sampling launch (with the widest grid, the LM
    # head, when the records hold no sampling).
    ends = [i for i, (_, shape, _) in enumerate(ls) if shape[0] == SAMPLE]
    if len(ends) < 2:
        widest = max(shape[1] for _, shape, _ in ls)
        ends = [i for i, (_, shape, _) in enumerate(ls) if shape[1] == widest]
    if len(ends) < 2:
        sys.exit("fewer than two step ends (sampling launches, or launches of the widest grid) in the records")
    # The host's part: from a step's last block (its sampling) to the next
    # step's first block, when the host has read the tokens back and
    # launched again.
    gaps = [ls[i + 1][2][0][0] - ls[i][2][2][-1] for i in ends if i + 1 < len(ls) and ls[i][2][2] and ls[i + 1][2][0]]
    if gaps:
        print(f"between steps: median {statistics.median(gaps) / 1000:.2f} us over {len(gaps)} gaps")
    step = ls[ends[-2] + 1 : ends[-1] + 1]
    t0 = step[0][0]
    us = lambda t: (t - t0) / 1000
    print(f"last whole step: {len(step)} instrumented launches, {us(step[-1][2][2][-1]):.2f} us")
    print("kind         blocks thr  start0  startN   wait0   waitN    end0    endN")
    step = [x for x in step if x[2][0] and x[2][2]]
    for i, (_, shape, ev) in enumerate(step):
        if i < 12 or i >= len(step) - 5:
            w = ev[1] or [float("nan")]
            w0, wn = (us(w[0]), us(w[-1])) if ev[1] else (float("nan"), float("nan"))
            print(f"{TAGS.get(shape[0], shape[0]):12s} {shape[1]:6d} {shape[2]:3d} "
                  f"{us(ev[0][0]):7.2f} {us(ev[0][-1]):7.2f} {w0:7.2f} {wn:7.2f} {us(ev[2][0]):7.2f} {us(ev[2][-1]):7.2f}")
    rows = collections.defaultdict(list)
    prev_end = None
    for _, shape, ev in step:
        if prev_end is not None:
            waited = ev[1] or ev[0]
            rows[shape].append((
                ev[0][0] - prev_end,
                waited[0] - prev_end,
                ev[2][-1] - waited[-1],
                ev[2][-1] - prev_end,
                ev[2][-1] - ev[2][0],
            ))
        prev_end = ev[2][-1]
    print("medians (us): kind blocks threads launches | start0-prev  wait0-prev  body  span  tail")
    for shape, v in rows.items():
        cols = "  ".join(f"{statistics.median(c) / 1000:6.2f}" for c in zip(*v))
        print(f"{TAGS.get(shape[0], shape[0]):12s} {shape[1]:6d} {shape[2]:3d} {len(v):4d} | {cols}")


if __name__ == "__main__":
    main()
