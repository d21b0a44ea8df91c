#!/usr/bin/env python3
"""Fill the {{PLACEHOLDERS}} of a model card from training_log.json and config.json.

Usage (from the repository root, after scripts/train_shakespeare.py):

    python3 scripts/fill_model_card.py       # scripts/model_card_template.md -> models/shakespeare-mamba/README.md
    python3 scripts/fill_model_card.py --model-dir DIR --template T.md --out OUT.md

Standard library only. Fails, writing nothing, if a placeholder has no value or a value
is missing from the log (for example when the training run did not finish).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

PLACEHOLDER = re.compile(r"\{\{([A-Z0-9_]+)\}\}")


def fmt_int(n) -> str:
    return f"{int(n):,}"


def values(log: dict, cfg: dict) -> dict[str, str]:
    m, d, tr, res, smp, env, tok = (
        log["model"], log["data"], log["training"], log["results"], log["samples"],
        log["environment"], log["tokenizer"],
    )
    d_inner = cfg["intermediate_size"]
    state_bytes = cfg["num_hidden_layers"] * d_inner * (cfg["conv_kernel"] - 1 + cfg["state_size"]) * 4
    train_loss = res["train_loss"]  # plain transformers, saved weights, like val_loss
    return {
        "WEIGHTS_MB": f"{res['weights_file_bytes'] / 1e6:.1f}",
        "WEIGHTS_DTYPE": {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(cfg.get("dtype", ""), cfg.get("dtype", "?")),
        "TRAIN_WORKS": str(d["train_works"]),
        "TRAIN_CHARS": fmt_int(d["train_chars"]),
        "VAL_CHARS": fmt_int(d["val_chars"]),
        "TRAIN_TOKENS": fmt_int(d["train_tokens"]),
        "VAL_TOKENS": fmt_int(d["val_tokens"]),
        "TOKENIZER_VOCAB": fmt_int(tok["vocab_size"]),
        "CHARS_PER_TOKEN": f"{tok['chars_per_token_train']:.1f}",
        "MODEL_MAX_LENGTH": str(log["args"]["model_max_length"]),
        "CONTEXT": str(tr["context_length"]),
        "PARAMETERS": fmt_int(m["parameters"]),
        "HIDDEN": str(cfg["hidden_size"]),
        "LAYERS": str(cfg["num_hidden_layers"]),
        "D_INNER": str(d_inner),
        "STATE": str(cfg["state_size"]),
        "CONV": str(cfg["conv_kernel"]),
        "DT_RANK": str(cfg["time_step_rank"]),
        "VOCAB": fmt_int(cfg["vocab_size"]),
        "STATE_BYTES": f"{fmt_int(state_bytes)} ({state_bytes / 1024:.0f} KiB)",
        "TRAIN_SECONDS": f"{tr['train_seconds']:.0f}",
        "DEVICE": env["device"],
        "TORCH_VERSION": env["torch"],
        "TRANSFORMERS_VERSION": env["transformers"],
        "STEPS": fmt_int(tr["steps"]),
        "TOKENS_SEEN": fmt_int(tr["tokens_seen"]),
        "EPOCHS": f"{tr['epochs']:.1f}",
        "BATCH": str(tr["batch_size"]),
        "OPTIMIZER": tr["optimizer"],
        "SCHEDULE": tr["schedule"],
        "PRECISION": tr["precision"],
        "SCAN": scan_text(log["scan"]["used"]),
        "KEPT": kept_text(tr, res),
        "VAL_LOSS": f"{res['val_loss']:.4f}",
        "VAL_PPL": f"{res['val_ppl']:.2f}",
        "TRAIN_LOSS": f"{train_loss:.4f}",
        "TRAIN_PPL": f"{res.get('train_ppl', math.exp(train_loss)):.2f}",
        "SAMPLE_SETTINGS": smp["settings"],
        "SAMPLED_SETTINGS": smp["sampled_settings"],
        "GREEDY_SAMPLE": smp["greedy"].rstrip(),
        "SAMPLED_SAMPLE": smp["sampled"].rstrip(),
    }


def kept_text(tr: dict, res: dict) -> str:
    if tr["kept_step"] == tr["steps"]:
        return "those of the last step, which had the lowest validation loss of the run"
    return (f"those of step {fmt_int(tr['kept_step'])}, which had the lowest validation loss of the run "
            f"({res['val_loss_training_precision']:.4f} against {res['val_loss_last_step']:.4f} at the last step, "
            "in training precision)")


def scan_text(used: str) -> str:
    if used.startswith("ours/chunk"):
        return (f"the training script's own two-level chunked scan (chunk {used.split('chunk')[1]}), checked "
                "against transformers' forward before training; the saved model is plain MambaForCausalLM")
    return "transformers' own PyTorch path"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="models/shakespeare-mamba")
    ap.add_argument("--template", default="scripts/model_card_template.md")
    ap.add_argument("--out", default=None, help="default: MODEL_DIR/README.md")
    args = ap.parse_args()

    model_dir = Path(args.model_dir)
    template = Path(args.template)
    out = Path(args.out) if args.out else model_dir / "README.md"
    text = template.read_text(encoding="utf-8")
    wanted = sorted(set(PLACEHOLDER.findall(text)))
    if not wanted:
        sys.exit(f"{template} has no placeholders left (already filled?)")

    log = json.loads((model_dir / "training_log.json").read_text(encoding="utf-8"))
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if log.get("status") != "done":
        print(f"warning: training_log.json status is {log.get('status')!r}", file=sys.stderr)
    try:
        vals = values(log, cfg)
    except KeyError as e:
        sys.exit(f"error: training_log.json lacks {e}")
    missing = [w for w in wanted if w not in vals]
    if missing:
        sys.exit(f"error: no value for {', '.join(missing)}")
    filled = PLACEHOLDER.sub(lambda mt: vals[mt.group(1)], text)
    out.write_text(filled, encoding="utf-8")
    print(f"filled {len(wanted)} placeholders into {out}")


if __name__ == "__main__":
    main()
