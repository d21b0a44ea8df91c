#!/usr/bin/env python3
"""Train the small default model: a Mamba-1 language model on the works of Shakespeare.

Usage (from the repository root; needs python3 with torch, transformers 5.x and tokenizers,
nothing else, and no network):

    python3 scripts/train_shakespeare.py                      # CUDA, 300 s of training
    python3 scripts/train_shakespeare.py --budget-seconds 600 --copy-to /some/dir
    python3 scripts/train_shakespeare.py --device cpu --budget-seconds 20 --tiny \\
        --out-dir /tmp/shakespeare-smoke                      # smoke test of the whole script

Input: data/shakespeare/train.txt and val.txt (made by scripts/prepare_shakespeare.py;
works separated by a line holding only `<|endoftext|>`).

Output, in --out-dir (default models/shakespeare-mamba; an existing README.md there is
left alone):
  config.json, generation_config.json, model.safetensors   plain MambaForCausalLM, fp16
  tokenizer.json, tokenizer_config.json                     byte-level BPE, chat template
  training_log.json                                         settings, losses, samples
With --copy-to DIR those six files are copied to DIR as well.

Steps:
  1. Tokenizer: byte-level BPE (ByteLevel pre-tokenizer and decoder, no normaliser),
     trained on the training split only, `<|endoftext|>` = id 0 = eos = bos = pad. An
     existing tokenizer.json in --out-dir is reused (so a re-run keeps the same ids).
  2. Model: MambaForCausalLM (Mamba-1) from MambaConfig, tied embeddings, vocabulary
     padded to a multiple of 8. Default size: hidden 384, 5 layers (inner size 768,
     state 16, conv 4, dt rank 24), 6.39M parameters, 12.8 MB in bf16: well under the
     16 MB cap, and with ~1.6M training tokens a bigger model would only over-fit sooner
     (hidden 384 x 6 layers would be 14.7 MB; hidden 512 x 6, 24 MB, does not fit).
  3. Fast training path. Without the mamba_ssm CUDA kernels, transformers' Mamba mixer
     runs its selective scan as a Python loop over the sequence (hundreds of small
     kernels per layer, forward and backward). This script has its own mixer forward for
     full sequences without a cache: the same math, with the recurrence
     h_t = a_t * h_{t-1} + b_t computed by a two-level chunked scan (a short sequential
     loop inside chunks, for all chunks at once, then a carry pass across chunks) in a
     custom autograd function whose backward is the same scan run in reverse. It is
     bound to the mixers of the model being trained only (per instance, not the class),
     and checked against transformers' own forward (fp32, random weights, max abs
     difference < 1e-4; gradients too) before training; if the check fails the script
     trains with transformers' own path. It then times a training step with each
     chunk length and with transformers' path and uses the fastest that passed.
  4. Training: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear warm-up then
     cosine decay over the wall-clock budget, bf16 autocast on CUDA, random windows of
     --context tokens; validation loss on the whole held-out split every
     --eval-every-seconds; the weights with the best validation loss are kept. The corpus
     is small (about 1.6M tokens), so a long run over-fits: when the validation loss has
     not improved for --patience evaluations, the cosine decay is brought forward (from
     the current lr to the floor over a quarter of the time trained so far, at least
     20 s) and training ends there, before the budget.
  5. Save (fp16, safetensors), reload the saved folder in plain transformers (no patch)
     and measure the validation loss there (this is the reported figure), then generate
     a greedy and a sampled sample (temperature 0.8, fixed seed, on the CPU in fp32)
     from "ROMEO:" with `generate`.

The whole run stops training early when --max-total-seconds would otherwise be exceeded
(the time for set-up and for the final steps is reserved).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import shutil
import sys
import time
import traceback
import types
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import tokenizers  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import MambaConfig, MambaForCausalLM  # noqa: E402

EOT = "<|endoftext|>"
SEPARATOR = EOT + "\n"
PROMPT = "ROMEO:"

# Play-script chat template: every message is a speech, "NAME:\n<content>\n\n", where NAME is
# the message's `name` if it has one, else its role, in capitals; a system message is a
# stage direction in brackets. The generation prompt is the assistant's speaker line.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- '[' ~ (message['content'] | trim) ~ ']\\n\\n' -}}"
    "{%- else -%}"
    "{{- ((message['name'] if (message['name'] is defined and message['name']) else message['role']) | upper)"
    " ~ ':\\n' ~ (message['content'] | trim) ~ '\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- 'ASSISTANT:\\n' -}}"
    "{%- endif -%}"
)

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------------------
# Our scan: h_t = a_t * h_{t-1} + b_t along dim 1, h_{-1} = 0 (reverse: h_t = a_t * h_{t+1} + b_t)
# --------------------------------------------------------------------------------------


def linear_scan(a: torch.Tensor, b: torch.Tensor, chunk: int, reverse: bool = False) -> torch.Tensor:
    """Two-level scan over dim 1 of (batch, length, M) float tensors.

    Level 1: inside chunks of `chunk` steps, a sequential loop that advances every chunk
    at once, also keeping the running product of a (the decay from the chunk's start).
    Level 2: a loop over chunks adds each chunk's incoming state times that decay.
    Only products and sums of the given numbers: no division, no exp/log, so it is as
    stable as the plain recurrence.
    """
    bsz, length, m = a.shape
    t_len = max(1, min(chunk, length))
    n_chunks = -(-length // t_len)
    pad = n_chunks * t_len - length
    if pad:  # padding sits after the sequence (before it, for reverse: zeros stay zero)
        a = F.pad(a, (0, 0, 0, pad))
        b = F.pad(b, (0, 0, 0, pad))
    a4 = a.reshape(bsz, n_chunks, t_len, m)
    b4 = b.reshape(bsz, n_chunks, t_len, m)
    h = torch.empty_like(b4)
    p = torch.empty_like(a4)
    order = range(t_len - 1, -1, -1) if reverse else range(t_len)
    prev = None
    for t in order:
        if prev is None:
            h[:, :, t].copy_(b4[:, :, t])
            p[:, :, t].copy_(a4[:, :, t])
        else:
            torch.addcmul(b4[:, :, t], a4[:, :, t], h[:, :, prev], out=h[:, :, t])
            torch.mul(a4[:, :, t], p[:, :, prev], out=p[:, :, t])
        prev = t
    if reverse:
        for c in range(n_chunks - 2, -1, -1):
            h[:, c].addcmul_(p[:, c], h[:, c + 1, 0].unsqueeze(1))
    else:
        for c in range(1, n_chunks):
            h[:, c].addcmul_(p[:, c], h[:, c - 1, t_len - 1].unsqueeze(1))
    h = h.reshape(bsz, n_chunks * t_len, m)
    return h[:, :length] if pad else h


class LinearScan(torch.autograd.Function):
    """h = scan(a, b) with the backward pass written out:
    g_t = dL/dh_t + a_{t+1} g_{t+1} (a reverse scan), dL/db_t = g_t, dL/da_t = g_t h_{t-1}."""

    @staticmethod
    def forward(ctx, a, b, chunk):
        h = linear_scan(a, b, chunk)
        ctx.save_for_backward(a, h)
        ctx.chunk = chunk
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, h = ctx.saved_tensors
        a_next = torch.zeros_like(a)
        a_next[:, :-1] = a[:, 1:]
        g = linear_scan(a_next, grad_h.contiguous(), ctx.chunk, reverse=True)
        grad_a = torch.zeros_like(a)
        torch.mul(g[:, 1:], h[:, :-1], out=grad_a[:, 1:])
        return grad_a, g, None


def fast_mixer_forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
    """MambaMixer.forward for full sequences without cache or padding mask; anything else
    goes to transformers' own forward. Same math as transformers' torch path
    (modeling_mamba.MambaMixer.forward + mamba_selective_scan); the SSM part runs in fp32."""
    if cache_params is not None or attention_mask is not None:
        return type(self).forward(self, hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)
    dtype = hidden_states.dtype
    bsz, seq_len, _ = hidden_states.shape
    d_inner, n_state = self.intermediate_size, self.ssm_state_size

    # 1. input projection: x (conv branch) and z (gate)
    x, z = self.in_proj(hidden_states).chunk(2, dim=-1)
    # 2. causal depthwise convolution + activation
    x = F.conv1d(
        x.transpose(1, 2),
        self.conv1d.weight,
        self.conv1d.bias if self.use_conv_bias else None,
        padding=self.conv_kernel_size - 1,
        groups=d_inner,
    )[..., :seq_len]
    x = self.act(x).transpose(1, 2)  # (bsz, L, d_inner)
    # 3. input-dependent dt, B, C
    time_step, b_mat, c_mat = torch.split(
        self.x_proj(x), [self.time_step_rank, n_state, n_state], dim=-1
    )
    time_step = F.linear(time_step, self.dt_proj.weight)  # (bsz, L, d_inner), bias added below
    device_type = hidden_states.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        dt = F.softplus(time_step.float() + self.dt_proj.bias.float())
        a_cont = -torch.exp(self.A_log.float())  # (d_inner, n_state)
        xf = x.float()
        decay = torch.exp(dt.unsqueeze(-1) * a_cont)  # (bsz, L, d_inner, n_state)
        inp = (dt * xf).unsqueeze(-1) * b_mat.float().unsqueeze(2)
        states = LinearScan.apply(
            decay.reshape(bsz, seq_len, d_inner * n_state),
            inp.reshape(bsz, seq_len, d_inner * n_state),
            self._scan_chunk,
        ).reshape(bsz, seq_len, d_inner, n_state)
        y = torch.matmul(states, c_mat.float().unsqueeze(-1)).squeeze(-1)  # (bsz, L, d_inner)
        y = y + xf * self.D.float()
        y = y * F.silu(z.float())
    # 4. output projection
    return self.out_proj(y.to(dtype))


def mixers(model):
    return [layer.mixer for layer in model.backbone.layers]


def use_fast_path(model, chunk: int | None) -> None:
    """Bind our forward to this model's mixers (chunk length `chunk`), or unbind (None)."""
    for mixer in mixers(model):
        if chunk is None:
            mixer.__dict__.pop("forward", None)
            mixer.__dict__.pop("_scan_chunk", None)
        else:
            mixer._scan_chunk = chunk
            mixer.forward = types.MethodType(fast_mixer_forward, mixer)


@contextlib.contextmanager
def exact_fp32():
    """No TF32 anywhere while checking numerics."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def randomise_mixer(mixer, gen: torch.Generator) -> None:
    """Weights with outputs of order one and widely spread decays, for the numeric check."""

    def rnd(t: torch.Tensor, std: float) -> torch.Tensor:
        return (torch.randn(t.shape, generator=gen) * std).to(t.device, t.dtype)

    hidden, d_inner = mixer.hidden_size, mixer.intermediate_size
    mixer.in_proj.weight.copy_(rnd(mixer.in_proj.weight, hidden**-0.5))
    mixer.conv1d.weight.copy_(rnd(mixer.conv1d.weight, 0.5))
    if mixer.conv1d.bias is not None:
        mixer.conv1d.bias.copy_(rnd(mixer.conv1d.bias, 0.2))
    mixer.x_proj.weight.copy_(rnd(mixer.x_proj.weight, d_inner**-0.5))
    mixer.dt_proj.weight.copy_(rnd(mixer.dt_proj.weight, mixer.time_step_rank**-0.5))
    mixer.dt_proj.bias.copy_(rnd(mixer.dt_proj.bias, 1.5) - 2.0)  # dt from ~0.005 to ~2
    mixer.A_log.add_(rnd(mixer.A_log, 0.5))
    mixer.D.copy_(rnd(mixer.D, 1.0))
    mixer.out_proj.weight.copy_(rnd(mixer.out_proj.weight, d_inner**-0.5))


def verify_fast_path(device, chunk: int, real_config: MambaConfig, seed: int) -> dict:
    """Compare our forward (and gradients) with transformers' own, fp32, random weights."""
    out = {"chunk": chunk}
    gen = torch.Generator().manual_seed(seed)
    with exact_fp32():
        # a) whole small model: logits and every parameter's gradient
        cfg = MambaConfig(
            vocab_size=96, hidden_size=48, num_hidden_layers=2, state_size=16, conv_kernel=4,
            expand=2, time_step_rank="auto", initializer_range=0.1, tie_word_embeddings=True,
            pad_token_id=0, bos_token_id=0, eos_token_id=0,
        )
        torch.manual_seed(seed)
        ref = MambaForCausalLM(cfg).to(device).float()
        for mixer in mixers(ref):
            randomise_mixer(mixer, gen)
        fast = copy.deepcopy(ref)
        use_fast_path(fast, chunk)
        ids = torch.randint(0, cfg.vocab_size, (3, 37), generator=gen).to(device)  # 37: not a multiple of chunk
        ref.train()
        fast.train()
        lr_ = ref(input_ids=ids, use_cache=False).logits
        lf_ = fast(input_ids=ids, use_cache=False).logits
        out["logits_max_abs_diff"] = (lr_ - lf_).abs().max().item()
        tgt = torch.randint(0, cfg.vocab_size, ids.shape, generator=gen).to(device)
        F.cross_entropy(lr_.reshape(-1, cfg.vocab_size), tgt.reshape(-1)).backward()
        F.cross_entropy(lf_.reshape(-1, cfg.vocab_size), tgt.reshape(-1)).backward()
        worst = 0.0
        for (name, pr), (_, pf) in zip(ref.named_parameters(), fast.named_parameters()):
            if pr.grad is None and pf.grad is None:
                continue
            scale = pr.grad.abs().max().item() + 1e-12
            worst = max(worst, (pr.grad - pf.grad).abs().max().item() / scale)
        out["grad_max_rel_diff"] = worst
        # b) one mixer of the real size, train and eval mode
        torch.manual_seed(seed + 1)
        small_real = copy.deepcopy(real_config)
        small_real.num_hidden_layers = 1
        m_ref = MambaForCausalLM(small_real).to(device).float()
        mixer = mixers(m_ref)[0]
        randomise_mixer(mixer, gen)
        xs = torch.randn(2, 70, small_real.hidden_size, generator=gen).to(device)
        diffs, scale = [], 0.0
        for train_mode in (True, False):
            mixer.train(train_mode)
            with torch.no_grad():
                want = type(mixer).forward(mixer, xs)
                mixer._scan_chunk = chunk
                got = fast_mixer_forward(mixer, xs)
            diffs.append((want - got).abs().max().item())
            scale = max(scale, want.abs().max().item())
        out["mixer_max_abs_diff"] = max(diffs)
        out["mixer_output_max_abs"] = scale
    out["ok"] = (
        out["logits_max_abs_diff"] < 1e-4
        and out["mixer_max_abs_diff"] < 1e-4
        and out["grad_max_rel_diff"] < 1e-3
        and out["mixer_output_max_abs"] > 0.1  # the comparison is not of near-zero numbers
    )
    return out


# --------------------------------------------------------------------------------------
# Data and tokenizer
# --------------------------------------------------------------------------------------


def read_works(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    works = [w for w in text.split(SEPARATOR) if w.strip()]
    if not works:
        sys.exit(f"error: {path} holds no text")
    return works


def train_tokenizer(works: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(works, trainer=trainer, length=len(works))
    return tok


def tokenizer_config(model_max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": EOT,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "added_tokens_decoder": {
            "0": {"content": EOT, "lstrip": False, "normalized": False, "rstrip": False,
                  "single_word": False, "special": True}
        },
        "chat_template": CHAT_TEMPLATE,
    }


def encode_works(tok: Tokenizer, works: list[str]) -> torch.Tensor:
    eot = tok.token_to_id(EOT)
    ids = [eot]
    for enc in tok.encode_batch(works, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, context: int) -> torch.Tensor:
    """Non-overlapping windows of context+1 tokens (input + shifted target)."""
    n = (len(ids) - 1) // context
    idx = torch.arange(n)[:, None] * context + torch.arange(context + 1)[None, :]
    return ids[idx]


# --------------------------------------------------------------------------------------
# Training helpers
# --------------------------------------------------------------------------------------


def autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_loss(model, batch: torch.Tensor, vocab: int, reduction: str = "mean") -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, vocab), batch[:, 1:].reshape(-1), reduction=reduction)


@torch.no_grad()
def evaluate(model, wins: torch.Tensor, batch: int, device, amp: bool, vocab: int) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(wins), batch):
        x = wins[i : i + batch].to(device, non_blocking=True)
        with autocast(device, amp):
            total += lm_loss(model, x, vocab, reduction="sum").item()
        count += x[:, 1:].numel()
    model.train(was_training)
    return total / max(count, 1)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step_fn(model, device, amp, batch_fn, vocab, warmup: int, reps: int) -> float:
    """Seconds per forward+backward at the training shape (no optimiser step)."""
    for i in range(warmup + reps):
        if i == warmup:
            sync(device)
            t = time.perf_counter()
        x = batch_fn()
        with autocast(device, amp):
            loss = lm_loss(model, x, vocab)
        loss.backward()
        model.zero_grad(set_to_none=True)
    sync(device)
    return (time.perf_counter() - t) / reps


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="data/shakespeare")
    ap.add_argument("--out-dir", default="models/shakespeare-mamba")
    ap.add_argument("--copy-to", default=None, help="also copy the output files to this folder")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--budget-seconds", type=float, default=300.0, help="wall-clock training time")
    ap.add_argument("--max-total-seconds", type=float, default=540.0,
                    help="stop training early so that the whole script ends by about this time")
    ap.add_argument("--tiny", action="store_true", help="tiny model and batch, for a smoke test")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--state", type=int, default=16)
    ap.add_argument("--conv", type=int, default=4)
    ap.add_argument("--expand", type=int, default=2)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--eval-every-seconds", type=float, default=10.0)
    ap.add_argument("--patience", type=int, default=4,
                    help="evaluations without improvement before the lr decay is brought forward (0: never)")
    ap.add_argument("--log-every-steps", type=int, default=50)
    ap.add_argument("--scan", default="auto", choices=["auto", "ours", "transformers"],
                    help="auto: fastest path that passed the check")
    ap.add_argument("--chunks", default="8,16,32", help="chunk lengths to try for our scan")
    ap.add_argument("--model-max-length", type=int, default=1024)
    ap.add_argument("--sample-tokens", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                    help="bf16 autocast on CUDA (faster, but the model then differs from its fp32 self)")
    ap.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=False,
                    help="TF32 matmuls on CUDA (faster; see --amp)")
    ap.add_argument("--dropout", type=float, default=0.2,
                    help="dropout on each mixer's output while training (the saved model has none)")
    ap.add_argument("--save-dtype", default="float16", choices=["float16", "bfloat16"],
                    help="dtype of the saved weights (fp16 keeps A_log and the dt bias 8x more precisely)")
    args = ap.parse_args()

    if args.tiny:  # smoke-test sizes, for whatever was not given on the command line
        tiny = {"hidden": 64, "layers": 2, "context": 64, "batch": 8, "warmup_steps": 20,
                "eval_every_seconds": 5.0, "log_every_steps": 10, "sample_tokens": 60}
        for name, value in tiny.items():
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but CUDA is not available (use --device cpu for a smoke test)")
    # Exact fp32 by default. A model trained under bf16 autocast, or with
    # TF32 matmuls, evaluated about 0.35 nats better in that precision than
    # in exact fp32, the way every server runs it: it had fitted the reduced
    # precision. Training in the serving precision avoids that.
    amp = device.type == "cuda" and args.amp
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(args.seed)

    data_dir, out_dir = Path(args.data_dir), Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "training_log.json"
    record: dict = {
        "status": "starting",
        "started_unix": int(T0),
        "argv": sys.argv[1:],
        "args": vars(args),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        },
        "errors": [],
    }
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"tokenizers {tokenizers.__version__}, device {record['environment']['device']}")

    # ---------------- data + tokenizer ----------------
    train_works = read_works(data_dir / "train.txt")
    val_works = read_works(data_dir / "val.txt")
    tok_path = out_dir / "tokenizer.json"
    t = time.time()
    if tok_path.exists():
        tok = Tokenizer.from_file(str(tok_path))
        tok_source = "reused"
        log(f"tokenizer: reusing {tok_path} ({tok.get_vocab_size()} tokens)")
    else:
        tok = train_tokenizer(train_works, args.vocab_size)
        tok.save(str(tok_path))
        tok_source = "trained"
        log(f"tokenizer: trained on the training split in {time.time() - t:.1f} s "
            f"({tok.get_vocab_size()} tokens)")
    if tok.token_to_id(EOT) != 0:
        sys.exit(f"error: {EOT} must be id 0, is {tok.token_to_id(EOT)}")
    probe = val_works[0][:2000]
    if tok.decode(tok.encode(probe).ids, skip_special_tokens=False) != probe:
        sys.exit("error: tokenizer does not round-trip the text")
    write_json(out_dir / "tokenizer_config.json", tokenizer_config(args.model_max_length))

    train_ids = encode_works(tok, train_works)
    val_ids = encode_works(tok, val_works)
    train_chars = sum(len(w) for w in train_works)
    val_chars = sum(len(w) for w in val_works)
    val_wins = windows(val_ids, args.context)
    log(f"data: train {train_chars:,} chars -> {len(train_ids):,} tokens "
        f"({train_chars / len(train_ids):.2f} chars/token); val {val_chars:,} chars -> "
        f"{len(val_ids):,} tokens, {len(val_wins)} windows of {args.context}")
    record["tokenizer"] = {
        "type": "byte-level BPE", "source": tok_source, "vocab_size": tok.get_vocab_size(),
        "special_tokens": {EOT: 0}, "seconds": round(time.time() - t, 1),
        "chars_per_token_train": round(train_chars / len(train_ids), 3),
    }
    record["data"] = {
        "train_works": len(train_works), "val_works": len(val_works),
        "train_chars": train_chars, "val_chars": val_chars,
        "train_tokens": len(train_ids), "val_tokens": len(val_ids),
        "val_windows": len(val_wins), "val_tokens_scored": int(len(val_wins) * args.context),
    }

    # ---------------- model ----------------
    vocab = tok.get_vocab_size()
    padded_vocab = -(-vocab // 8) * 8
    config = MambaConfig(
        vocab_size=padded_vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        state_size=args.state,
        conv_kernel=args.conv,
        expand=args.expand,
        time_step_rank="auto",
        tie_word_embeddings=True,
        initializer_range=0.02,
        rescale_prenorm_residual=True,
        residual_in_fp32=True,
        use_cache=True,
        use_mambapy=False,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(args.seed)
    model = MambaForCausalLM(config).to(device)
    if model.lm_head.weight.data_ptr() != model.backbone.embeddings.weight.data_ptr():
        sys.exit("error: embeddings are not tied")
    # Residual dropout on every mixer's output, in training mode only: a
    # regulariser for a small corpus that leaves inference untouched.
    if args.dropout > 0:
        for mixer in mixers(model):
            mixer.register_forward_hook(lambda mod, inp, out: F.dropout(out, args.dropout, training=mod.training))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: MambaForCausalLM hidden {args.hidden}, layers {args.layers}, d_inner "
        f"{config.intermediate_size}, state {args.state}, conv {args.conv}, dt rank "
        f"{config.time_step_rank}, vocab {padded_vocab} (tokenizer {vocab}); {n_params:,} parameters, "
        f"{2 * n_params / 1e6:.2f} MB in bf16")
    record["model"] = {
        "architecture": "MambaForCausalLM (Mamba-1)", "hidden_size": args.hidden,
        "num_hidden_layers": args.layers, "intermediate_size": config.intermediate_size,
        "state_size": args.state, "conv_kernel": args.conv, "time_step_rank": config.time_step_rank,
        "vocab_size": padded_vocab, "tokenizer_vocab_size": vocab, "tied_embeddings": True,
        "parameters": n_params, "bf16_bytes": 2 * n_params,
    }
    write_json(log_path, record)

    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    train_dev = train_ids.to(device)
    offsets = torch.arange(args.context + 1, device=device)
    hi = len(train_ids) - args.context - 1

    def train_batch() -> torch.Tensor:
        starts = torch.randint(0, hi, (args.batch,), device=device, generator=gen)
        return train_dev[starts[:, None] + offsets[None, :]]

    # ---------------- check and choose the scan ----------------
    chunks = [int(c) for c in args.chunks.split(",") if c.strip()]
    checks, timings = [], {}
    passed = []
    if args.scan != "transformers":
        for c in chunks:
            try:
                res = verify_fast_path(device, c, config, args.seed)
            except Exception as e:  # noqa: BLE001
                res = {"chunk": c, "ok": False, "error": repr(e)}
                record["errors"].append(f"check chunk {c}: {e!r}")
            checks.append(res)
            log(f"check of our scan, chunk {c}: " + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}"
                                                               for k, v in res.items() if k != "chunk"))
            if res.get("ok"):
                passed.append(c)
    if args.scan == "ours" and not passed:
        record["errors"].append("our scan failed its check; training with transformers' path")
        log("WARNING: our scan failed its check; falling back to transformers' own path")
    candidates = [("ours", c) for c in passed] + [("transformers", None)]
    if args.scan == "transformers":
        candidates = [("transformers", None)]
    best_path = ("transformers", None)
    if len(candidates) > 1:
        best_time = math.inf
        for kind, c in candidates:
            use_fast_path(model, c)
            name = f"ours/chunk{c}" if kind == "ours" else "transformers"
            try:
                reps = 3 if kind == "ours" else 1
                secs = time_step_fn(model, device, amp, train_batch, padded_vocab, warmup=1, reps=reps)
            except Exception as e:  # noqa: BLE001 (e.g. out of memory)
                secs = math.inf
                record["errors"].append(f"timing {name}: {e!r}")
                model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            timings[name] = round(secs, 4)
            log(f"timing {name}: {secs * 1000:.1f} ms per forward+backward")
            if secs < best_time:
                best_time, best_path = secs, (kind, c)
    use_fast_path(model, best_path[1] if best_path[0] == "ours" else None)
    path_name = f"ours/chunk{best_path[1]}" if best_path[0] == "ours" else "transformers"
    log(f"training path: {path_name}")
    record["scan"] = {"used": path_name, "checks": checks, "seconds_per_step": timings}
    model.zero_grad(set_to_none=True)
    write_json(log_path, record)

    # ---------------- train ----------------
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.endswith("A_log") else no_decay).append(p)
    opt_kwargs = {"lr": args.lr, "betas": (0.9, 0.95), "eps": 1e-8}
    if device.type == "cuda":
        opt_kwargs["fused"] = True
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        **opt_kwargs,
    )
    reserve = 45.0 if not args.tiny else 10.0  # final eval, save, reload check, samples
    budget = min(args.budget_seconds, args.max_total_seconds - (time.time() - T0) - reserve)
    if budget < args.budget_seconds:
        log(f"training time cut to {budget:.0f} s to end by --max-total-seconds")
    budget = max(budget, 1.0)

    min_lr = args.lr * args.min_lr_ratio
    # Cosine over the budget; if the validation loss stops improving (the corpus is small,
    # so a long run over-fits), the decay is brought forward: from the current lr down to
    # min_lr over a quarter of the time trained so far (at least 20 s), then training ends.
    sched = {"end": budget, "decay_from_s": None, "decay_from_lr": None, "bad_evals": 0}

    def lr_at(step: int, t: float) -> float:
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        if sched["decay_from_s"] is None:
            frac, top = t / budget, args.lr
        else:
            frac = (t - sched["decay_from_s"]) / max(sched["end"] - sched["decay_from_s"], 1e-9)
            top = sched["decay_from_lr"]
        return min_lr + (top - min_lr) * 0.5 * (1 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))

    history: list[dict] = []
    record["history"] = history
    record["status"] = "training"
    best = {"val_loss": math.inf, "step": -1, "state": None}
    step, tokens_seen = 0, 0
    loss_sum = torch.zeros((), device=device)
    loss_n = 0
    last_train_loss = float("nan")
    model.train()
    log(f"training for {budget:.0f} s: batch {args.batch} x {args.context} tokens, lr {args.lr}, "
        f"warm-up {args.warmup_steps} steps, cosine to {args.min_lr_ratio * args.lr:g}")
    t_train = time.time()
    next_eval = t_train + args.eval_every_seconds

    def do_eval(final: bool = False) -> None:
        nonlocal loss_n, last_train_loss
        elapsed = time.time() - t_train
        if loss_n:
            last_train_loss = (loss_sum / loss_n).item()
            loss_sum.zero_()
            loss_n = 0
        val = evaluate(model, val_wins, args.batch, device, amp, padded_vocab)
        entry = {
            "step": step, "tokens": tokens_seen, "seconds": round(elapsed, 1),
            "lr": optimizer.param_groups[0]["lr"], "train_loss": round(last_train_loss, 4),
            "val_loss": round(val, 4), "val_ppl": round(math.exp(val), 2),
        }
        history.append(entry)
        sched["bad_evals"] = 0 if val < best["val_loss"] - 1e-3 else sched["bad_evals"] + 1
        if val < best["val_loss"]:
            best.update(val_loss=val, step=step,
                        state={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
        if (
            not final
            and args.patience > 0
            and sched["bad_evals"] >= args.patience
            and sched["decay_from_s"] is None
            and step >= args.warmup_steps
        ):
            end = min(budget, elapsed + max(0.25 * elapsed, 20.0))
            sched.update(decay_from_s=elapsed, decay_from_lr=entry["lr"], end=end)
            record["early_decay"] = {"at_step": step, "at_seconds": round(elapsed, 1), "from_lr": entry["lr"],
                                     "ends_at_seconds": round(end, 1)}
            log(f"validation loss has not improved for {args.patience} evaluations: decaying lr from "
                f"{entry['lr']:.2e} to {min_lr:.2e} until {end:.0f} s, then stopping")
        log(("final " if final else "") + f"step {step:6d} | tokens {tokens_seen / 1e6:7.2f}M | "
            f"train {last_train_loss:.4f} | val {val:.4f} (ppl {math.exp(val):.1f}) | "
            f"lr {entry['lr']:.2e} | {step / max(elapsed, 1e-9):.1f} steps/s")
        write_json(log_path, record)

    try:
        while True:
            now = time.time()
            if now - t_train >= sched["end"]:
                break
            lr = lr_at(step, now - t_train)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x = train_batch()
            with autocast(device, amp):
                loss = lm_loss(model, x, padded_vocab)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            loss_n += 1
            step += 1
            tokens_seen += x[:, 1:].numel()
            if step % args.log_every_steps == 0 and now < next_eval:
                avg = (loss_sum / loss_n).item()
                if not math.isfinite(avg):
                    raise FloatingPointError(f"training loss is {avg} at step {step}")
                log(f"step {step:6d} | tokens {tokens_seen / 1e6:7.2f}M | train {avg:.4f} | lr {lr:.2e} | "
                    f"{step / (time.time() - t_train):.1f} steps/s")
            if now >= next_eval:
                do_eval()
                next_eval = time.time() + args.eval_every_seconds
    except Exception as e:  # noqa: BLE001 -- keep what was learnt so far
        record["errors"].append(f"training stopped at step {step}: {e!r}")
        log(f"ERROR: training stopped at step {step}: {e!r}\n{traceback.format_exc()}")
        optimizer.zero_grad(set_to_none=True)
    train_seconds = time.time() - t_train
    try:
        do_eval(final=True)
    except Exception as e:  # noqa: BLE001
        record["errors"].append(f"final evaluation: {e!r}")
        log(f"ERROR: final evaluation: {e!r}")
    if best["state"] is None:
        record["status"] = "failed"
        write_json(log_path, record)
        sys.exit("error: no evaluated weights to save")
    last_val = history[-1]["val_loss"] if history else math.nan
    chosen = "last" if best["step"] == step else f"best (step {best['step']})"
    log(f"training done: {step} steps, {tokens_seen:,} tokens in {train_seconds:.0f} s; "
        f"keeping the {chosen} weights, val {best['val_loss']:.4f}")

    # ---------------- save ----------------
    save_model = MambaForCausalLM(config)
    save_model.load_state_dict(best["state"])
    save_model = save_model.to(getattr(torch, args.save_dtype))
    # `rescale_prenorm_residual` only shapes the initialisation, but
    # transformers 5.17 re-applies it when it loads a checkpoint (it divides
    # every out_proj weight by sqrt(layers) again), so the saved config must
    # say false or every transformers user gets a corrupted model.
    save_model.config.rescale_prenorm_residual = False
    save_model.generation_config.eos_token_id = 0
    save_model.generation_config.bos_token_id = 0
    save_model.generation_config.pad_token_id = 0
    save_model.save_pretrained(out_dir, safe_serialization=True)
    del save_model
    weights_bytes = (out_dir / "model.safetensors").stat().st_size
    log(f"saved {out_dir}/model.safetensors ({weights_bytes / 1e6:.2f} MB)")

    # train loss of the kept weights on a fixed sample of training windows (as many as val)
    g_cpu = torch.Generator().manual_seed(args.seed + 7)
    all_train_wins = windows(train_ids, args.context)
    train_sample = all_train_wins[torch.randperm(len(all_train_wins), generator=g_cpu)[: max(len(val_wins), 1)]]
    train_eval = float("nan")
    try:
        model.load_state_dict({k: v.to(device) for k, v in best["state"].items()})
        train_eval = evaluate(model, train_sample, args.batch, device, amp, padded_vocab)
    except Exception as e:  # noqa: BLE001
        record["errors"].append(f"train-loss evaluation: {e!r}")

    record["training"] = {
        "steps": step,
        "tokens_seen": tokens_seen,
        "epochs": round(tokens_seen / len(train_ids), 2),
        "batch_size": args.batch,
        "context_length": args.context,
        "optimizer": f"AdamW(lr={args.lr}, betas=(0.9, 0.95), weight_decay={args.weight_decay} on matrices)",
        "schedule": (
            f"linear warm-up {args.warmup_steps} steps, cosine to {args.min_lr_ratio}x over {budget:.0f} s"
            if "early_decay" not in record else
            f"linear warm-up {args.warmup_steps} steps, cosine over {budget:.0f} s until the validation loss "
            f"stopped improving at {record['early_decay']['at_seconds']:.0f} s (step "
            f"{record['early_decay']['at_step']}), then cosine from there to {args.min_lr_ratio}x of the peak "
            f"lr by {record['early_decay']['ends_at_seconds']:.0f} s"
        ),
        "precision": "bf16 autocast, fp32 weights and SSM state" if amp else ("fp32 (TF32 matmuls)" if device.type == "cuda" and args.tf32 else "fp32"),
        "grad_clip": args.grad_clip,
        "train_seconds": round(train_seconds, 1),
        "budget_seconds": round(budget, 1),
        "kept_weights": chosen,
        "kept_step": best["step"],
        "steps_per_second": round(step / max(train_seconds, 1e-9), 2),
        "tokens_per_second": round(tokens_seen / max(train_seconds, 1e-9)),
    }
    record["results"] = {
        "train_loss_training_precision": round(train_eval, 4),
        "train_loss_last_logged": round(last_train_loss, 4),
        "val_loss_training_precision": round(best["val_loss"], 4),
        "val_loss_last_step": last_val,
        "weights_file_bytes": weights_bytes,
    }
    record["status"] = "saved"
    write_json(log_path, record)

    # ---------------- plain transformers on the saved folder ----------------
    try:
        plain = MambaForCausalLM.from_pretrained(out_dir, dtype=torch.float32).to(device)
        plain.eval()
        # The loaded weights must be exactly the saved ones.
        from safetensors.torch import load_file
        stored = load_file(out_dir / "model.safetensors")
        loaded = plain.state_dict()
        changed = [k for k, v in stored.items() if not torch.equal(loaded[k].cpu(), v.float())]
        if changed:
            raise RuntimeError(f"transformers changed these tensors while loading: {changed}")
        # same windows, fp32, transformers' own path (no patch on this instance)
        with exact_fp32():
            val_plain = evaluate(plain, val_wins, args.batch, device, False, padded_vocab)
            train_plain = evaluate(plain, train_sample, args.batch, device, False, padded_vocab)
        patched = copy.deepcopy(plain)
        use_fast_path(patched, best_path[1] if best_path[0] == "ours" else 16)
        with exact_fp32(), torch.no_grad():
            xb = val_wins[: min(8, len(val_wins))].to(device)
            diff = (plain(input_ids=xb[:, :-1], use_cache=False).logits
                    - patched(input_ids=xb[:, :-1], use_cache=False).logits).abs().max().item()
        del patched
        record["results"].update({
            "val_loss": round(val_plain, 4),
            "val_ppl": round(math.exp(val_plain), 2),
            "train_loss": round(train_plain, 4),
            "train_ppl": round(math.exp(train_plain), 2),
            "losses_measured_with": f"plain transformers MambaForCausalLM, saved {args.save_dtype} weights, fp32 compute; "
                                    f"val: all {len(val_wins)} windows of the split, train: {len(train_sample)} "
                                    "random windows",
            "saved_model_logits_max_abs_diff_ours_vs_transformers": diff,
        })
        log(f"saved model in plain transformers: val loss {val_plain:.4f}, ppl {math.exp(val_plain):.2f}, "
            f"train loss {train_plain:.4f}; "
            f"logits max |ours - transformers| on the saved weights {diff:.2e}")
        del plain
    except Exception as e:  # noqa: BLE001
        record["errors"].append(f"plain transformers check: {e!r}")
        log(f"ERROR: plain transformers check: {e!r}\n{traceback.format_exc()}")
    write_json(log_path, record)

    # ---------------- samples (CPU, fp32, plain transformers) ----------------
    try:
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(out_dir)
        cpu_model = MambaForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
        prompt_ids = hf_tok(PROMPT, return_tensors="pt", add_special_tokens=False)
        common = dict(max_new_tokens=args.sample_tokens, pad_token_id=0, eos_token_id=0)
        with torch.no_grad():
            greedy = cpu_model.generate(**prompt_ids, do_sample=False, **common)
            torch.manual_seed(args.seed)
            sampled = cpu_model.generate(**prompt_ids, do_sample=True, temperature=0.8, top_k=0, top_p=1.0,
                                         **common)
        n_prompt = prompt_ids["input_ids"].shape[1]
        chat = hf_tok.apply_chat_template(
            [{"role": "user", "content": "Good morrow, sir."}], tokenize=False, add_generation_prompt=True
        )
        record["samples"] = {
            "prompt": PROMPT,
            "prompt_token_ids": prompt_ids["input_ids"][0].tolist(),
            "settings": f"transformers generate on the CPU, fp32 compute from the saved {args.save_dtype} weights, "
                        f"max_new_tokens={args.sample_tokens}, stop at {EOT}",
            "greedy": PROMPT + hf_tok.decode(greedy[0, n_prompt:], skip_special_tokens=True),
            "greedy_token_ids": greedy[0, n_prompt:].tolist(),
            "sampled_settings": f"do_sample=True, temperature=0.8, top_k=0, top_p=1.0, torch.manual_seed({args.seed})",
            "sampled": PROMPT + hf_tok.decode(sampled[0, n_prompt:], skip_special_tokens=True),
            "chat_template_example": chat,
        }
        log("greedy sample:\n" + record["samples"]["greedy"])
        log("sampled sample (temperature 0.8):\n" + record["samples"]["sampled"])
    except Exception as e:  # noqa: BLE001
        record["errors"].append(f"samples: {e!r}")
        log(f"ERROR: samples: {e!r}\n{traceback.format_exc()}")

    record["status"] = "done"
    record["total_seconds"] = round(time.time() - T0, 1)
    write_json(log_path, record)
    outputs = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "training_log.json"]
    if args.copy_to:
        dest = Path(args.copy_to)
        dest.mkdir(parents=True, exist_ok=True)
        for name in outputs:
            if (out_dir / name).exists():
                shutil.copy2(out_dir / name, dest / name)
        log(f"copied {', '.join(outputs)} to {dest}")
    log(f"done in {record['total_seconds']:.0f} s; errors: {len(record['errors'])}")


if __name__ == "__main__":
    main()
