#!/usr/bin/env python3
"""Splits the fused decode stack kernel's layers into phases, from a kernel
timeline (MAMBA_SERVE_TIMELINE=FILE mamba-serve bench ..., batch 1).

Thread 0 of every block marks each phase boundary of each layer (events 3
to 15 but 13 of tag 18, kernels/stack.cu); the block's producer lane and thread 0
also record, at the end, how long they waited (events 16 to 20). For the
last whole launch this prints, per segment of a layer, the median over
layers of the median and the slowest block's time, and the waits per
layer.

Usage: scripts/stack-phases.py FILE
"""
import collections
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import timeline  # noqa: E402  (the record format's reader)

STACK = 18  # TL_STACK
SEGMENTS = {
    4: "A: residual, side wait, norm",
    5: "A: in_proj rows",
    6: "A: conv, z",
    7: "B: read xc",
    8: "B: x_proj rows",
    9: "B: xdbl",
    10: "C: read xdbl, xc, z, side wait",
    11: "C: dt, state, gate",
    12: "D: read y",
    14: "D: out_proj rows",
    15: "D: residual",
}
WAITS = {16: "producer: ring full", 17: "producer: copies in flight", 18: "producer: side buffer busy",
         19: "warp 0: stage not arrived", 20: "warp 0: side buffer not arrived"}


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    recs = sorted((t, e, blk, extra) for t, tag, e, blk, extra in timeline.raw(sys.argv[1]) if tag == STACK)
    starts = [r for r in recs if r[1] == 0]
    if not starts:
        sys.exit("no stack kernel records")
    groups = [[starts[0]]]
    for r in starts[1:]:
        (groups[-1].append(r) if r[0] - groups[-1][-1][0] < 50_000 else groups.append([r]))
    full = max(len(g) for g in groups)
    g = [g for g in groups if len(g) == full][-1]
    lo = g[0][0]
    hi = next((h[0][0] for h in groups if h[0][0] > lo), 1 << 64)
    blocks = collections.defaultdict(list)
    for t, e, blk, extra in recs:
        if lo <= t < hi:
            blocks[blk].append((t, e, extra))
    per_seg = collections.defaultdict(list)  # (layer, event) -> [duration per block]
    at = collections.defaultdict(list)  # (layer, event) -> [time per block]
    waits = collections.defaultdict(list)
    layers = 0
    for blk, ev in blocks.items():
        layer, prev = -1, None
        for t, e, extra in ev:
            if e == 3:
                layer += 1
                prev = t
            elif 4 <= e <= 15 and prev is not None:
                per_seg[(layer, e)].append(t - prev)
                at[(layer, e)].append(t)
                prev = t
            elif e in WAITS:
                waits[e].append(extra)
        layers = max(layers, layer + 1)
    end = max(t for ev in blocks.values() for t, _, _ in ev)
    print(f"launch: {full} blocks, {layers} layers, {(end - lo) / 1000:.1f} us, {(end - lo) / 1000 / max(layers, 1):.2f} us a layer")
    print(f"{'segment':34} {'median':>8} {'slowest':>8}   (us; medians over layers)")
    total_med = total_max = 0.0
    for e, name in SEGMENTS.items():
        med = statistics.median(statistics.median(per_seg[(l, e)]) for l in range(layers) if per_seg[(l, e)]) / 1000
        slow = statistics.median(max(per_seg[(l, e)]) for l in range(layers) if per_seg[(l, e)]) / 1000
        total_med += med
        total_max += slow
        print(f"{name:34} {med:8.2f} {slow:8.2f}")
    print(f"{'sum':34} {total_med:8.2f} {total_max:8.2f}")
    for e, name in WAITS.items():
        if waits[e]:
            v = sorted(waits[e])
            print(f"{name:34} median {statistics.median(v) / 1000 / layers:6.2f} us a layer, max {v[-1] / 1000 / layers:6.2f}")


if __name__ == "__main__":
    main()
