#!/usr/bin/env python3
"""Re-measure a saved Shakespeare model with plain transformers, on the CPU.

Usage: python scripts/evaluate_shakespeare.py [--model models/shakespeare-mamba]

Loads the folder with MambaForCausalLM in fp32 (checking that the loaded
weights are exactly the stored ones), computes the validation loss over every
window of the validation split and the training loss over the same sample of
training windows the training script uses, regenerates the greedy and sampled
samples, and writes them into training_log.json ("results", "samples"). Then
run scripts/fill_model_card.py.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoTokenizer, MambaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
import train_shakespeare as ts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/shakespeare-mamba")
    ap.add_argument("--data-dir", default="data/shakespeare")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    out = Path(args.model)
    log = json.loads((out / "training_log.json").read_text())
    context = log["args"]["context"]
    seed = log["args"]["seed"]
    sample_tokens = log["args"]["sample_tokens"]
    torch.set_num_threads(max(1, torch.get_num_threads()))

    model = MambaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    stored = load_file(out / "model.safetensors")
    loaded = model.state_dict()
    changed = [k for k, v in stored.items() if not torch.equal(loaded[k], v.float())]
    if changed:
        sys.exit(f"transformers changed these tensors while loading: {changed}")

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    data = Path(args.data_dir)
    val_ids = ts.encode_works(tok, ts.read_works(data / "val.txt"))
    train_ids = ts.encode_works(tok, ts.read_works(data / "train.txt"))
    val_wins = ts.windows(val_ids, context)
    # The same training sample as the training script: as many windows as validation.
    g = torch.Generator().manual_seed(seed + 7)
    all_train = ts.windows(train_ids, context)
    train_sample = all_train[torch.randperm(len(all_train), generator=g)[: max(len(val_wins), 1)]]
    vocab = model.config.vocab_size
    # The sequential scan of transformers is slow on a CPU; its chunked
    # equivalent (checked equal below) measures the same function.
    ts.use_fast_path(model, 16)
    with torch.no_grad():
        probe = val_wins[:4]
        fast = model(input_ids=probe[:, :-1], use_cache=False).logits
        ts.use_fast_path(model, None)
        plain = model(input_ids=probe[:, :-1], use_cache=False).logits
        diff = (fast - plain).abs().max().item()
        if diff > 1e-4:
            sys.exit(f"the chunked scan differs from transformers by {diff}")
        ts.use_fast_path(model, 16)
        val = ts.evaluate(model, val_wins, args.batch, torch.device("cpu"), False, vocab)
        train = ts.evaluate(model, train_sample, args.batch, torch.device("cpu"), False, vocab)
        ts.use_fast_path(model, None)
    print(f"val {val:.4f} (ppl {math.exp(val):.2f}), train {train:.4f}; chunked vs plain logits {diff:.2e}")

    hf_tok = AutoTokenizer.from_pretrained(out)
    prompt = ts.PROMPT
    prompt_ids = hf_tok(prompt, return_tensors="pt", add_special_tokens=False)
    common = dict(max_new_tokens=sample_tokens, pad_token_id=0, eos_token_id=0)
    with torch.no_grad():
        greedy = model.generate(**prompt_ids, do_sample=False, **common)
        torch.manual_seed(seed)
        sampled = model.generate(**prompt_ids, do_sample=True, temperature=0.8, top_k=0, top_p=1.0, **common)
    n = prompt_ids["input_ids"].shape[1]
    dtype = str(next(iter(stored.values())).dtype).replace("torch.", "")
    log["results"].update({
        "val_loss": round(val, 4),
        "val_ppl": round(math.exp(val), 2),
        "train_loss": round(train, 4),
        "train_ppl": round(math.exp(train), 2),
        "losses_measured_with": f"transformers MambaForCausalLM on the CPU, saved {dtype} weights, fp32 compute "
                                f"(scan computed by the training script's chunked scan, equal to transformers' "
                                f"to {diff:.1e}); val: all {len(val_wins)} windows of the split, train: "
                                f"{len(train_sample)} random windows",
    })
    log["samples"].update({
        "prompt_token_ids": prompt_ids["input_ids"][0].tolist(),
        "settings": f"transformers generate on the CPU, fp32 compute from the saved {dtype} weights, "
                    f"max_new_tokens={sample_tokens}, stop at {ts.EOT}",
        "greedy": prompt + hf_tok.decode(greedy[0, n:], skip_special_tokens=True),
        "greedy_token_ids": greedy[0, n:].tolist(),
        "sampled_settings": f"do_sample=True, temperature=0.8, top_k=0, top_p=1.0, torch.manual_seed({seed})",
        "sampled": prompt + hf_tok.decode(sampled[0, n:], skip_special_tokens=True),
    })
    (out / "training_log.json").write_text(json.dumps(log, indent=1, ensure_ascii=False) + "\n")
    print("greedy:\n" + log["samples"]["greedy"][:600])
    print("sampled:\n" + log["samples"]["sampled"][:600])


if __name__ == "__main__":
    main()
