#!/usr/bin/env python3
"""Times Hugging Face transformers' MambaForCausalLM on the GPU, for the
side-by-side figures in BENCHMARKS.md.

Same shapes as `mamba-serve bench --random-shape NAME`, random weights in
bf16 (transformers' own initialisation, on the GPU). Without the optional
mamba-ssm / causal-conv1d kernels transformers runs its torch path.

- Prefill: one sequence of each prompt length, `model(ids, use_cache=True)`,
  timed with a device synchronisation on both sides (one warm-up with a
  short prompt first; the best of `--prefill-runs` runs).
- Decode: one step of `batch` sequences (all layers, lm_head and argmax,
  updating the model's own cache in place) captured in a CUDA graph after a
  32-token prefill, timed as the mean of `--replays` replays with CUDA
  events, as in the team's earlier peer measurements.

Prints one JSON object per measurement, then a table.
"""

import argparse
import inspect
import json
import math
import sys
import time

import torch
from transformers import MambaConfig, MambaForCausalLM

SHAPES = {
    "mamba-130m": (768, 24),
    "mamba-370m": (1024, 48),
    "mamba-790m": (1536, 48),
    "mamba-1.4b": (2048, 48),
    "mamba-2.8b": (2560, 64),
}
VOCAB = 50280


def build(name):
    d, layers = SHAPES[name]
    cfg = MambaConfig(
        vocab_size=VOCAB,
        hidden_size=d,
        num_hidden_layers=layers,
        state_size=16,
        expand=2,
        conv_kernel=4,
        time_step_rank=math.ceil(d / 16),
        use_bias=False,
        use_conv_bias=True,
        tie_word_embeddings=True,
        residual_in_fp32=True,
    )
    with torch.device("cuda"):
        model = MambaForCausalLM(cfg)
    model = model.to(torch.bfloat16).eval()
    return model, cfg


def prefill(model, length, runs):
    ids = torch.randint(0, 1000, (1, length), device="cuda")
    best = float("inf")
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(ids, use_cache=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def decode_step_ms(model, cfg, batch, replays):
    """(graph ms, eager ms) of one decode step after a 32-token prefill.

    The cache comes from the prefill's output (its attribute name and the
    forward argument differ between transformers releases)."""
    ids = torch.randint(0, 1000, (batch, 32), device="cuda")
    out = model(ids, use_cache=True)
    kw = "cache_params" if getattr(out, "cache_params", None) is not None else "past_key_values"
    cache = getattr(out, kw)
    extra = {kw: cache, "use_cache": True}
    if "cache_position" in inspect.signature(model.forward).parameters:
        extra["cache_position"] = torch.tensor([32], device="cuda")
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    del out

    def step():
        logits = model(tok, **extra).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    def timed(f, n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            f()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / n

    step()
    eager = timed(step, 5)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    ms = timed(graph.replay, replays)
    del graph, cache
    return ms, eager


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--prompt-len", default="512,2048")
    p.add_argument("--batch", default="1,16,64,256,1024")
    p.add_argument("--prefill-runs", type=int, default=1)
    p.add_argument("--replays", type=int, default=30)
    p.add_argument("--time-limit", type=float, default=1e9, help="seconds; later shapes are skipped past it")
    a = p.parse_args()
    t_start = time.time()
    rows = []
    torch.manual_seed(0)
    with torch.no_grad():
        for name in a.shapes.split(","):
            if time.time() - t_start > a.time_limit:
                print(f"skipping {name}: past the time limit", file=sys.stderr)
                continue
            model, cfg = build(name)
            prefill(model, 64, 1)
            for length in [int(x) for x in a.prompt_len.split(",")]:
                s = prefill(model, length, a.prefill_runs)
                r = {"shape": name, "kind": "prefill", "prompt_len": length, "seconds": s, "tokens_per_s": length / s}
                rows.append(r)
                print(json.dumps(r), flush=True)
            for batch in [int(x) for x in a.batch.split(",")]:
                try:
                    ms, eager = decode_step_ms(model, cfg, batch, a.replays)
                    r = {"shape": name, "kind": "decode", "batch": batch, "step_ms": ms, "eager_step_ms": eager,
                         "tokens_per_s": batch / ms * 1e3}
                except Exception as e:  # out of memory, or a release whose step cannot be captured
                    r = {"shape": name, "kind": "decode", "batch": batch, "error": f"{type(e).__name__}: {e}"[:500]}
                    torch.cuda.empty_cache()
                rows.append(r)
                print(json.dumps(r), flush=True)
            del model
            torch.cuda.empty_cache()
    print(f"\n{'shape':<12} {'what':<14} {'ms':>10} {'tokens/s':>12}")
    for r in rows:
        what = f"prefill {r['prompt_len']}" if r["kind"] == "prefill" else f"decode B={r['batch']}"
        ms = r["seconds"] * 1e3 if r["kind"] == "prefill" else r.get("step_ms", float("nan"))
        print(f"{r['shape']:<12} {what:<14} {ms:>10.3f} {r.get('tokens_per_s', float('nan')):>12.1f}")


if __name__ == "__main__":
    main()
