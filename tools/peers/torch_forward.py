#!/usr/bin/env python3
"""PyTorch peer: time the model's forward pass (logits for a batch of random token ids).

zoft's forward benchmark is compared against this, run on the same machine in the same job.

Needs: torch, transformers; for a GGUF source also gguf and accelerate.

    python tools/peers/torch_forward.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf \
        --batch 16 --seq 64 --warmup 1 --iters 3 --threads 2
    python tools/peers/torch_forward.py --device cuda --random-config llama-7b --batch 16 --seq 512

CPU runs in float32, CUDA in bfloat16, both with sdpa attention unless --dtype / --attn say
otherwise. The timed call is `model(input_ids).logits` under torch.inference_mode (full
[batch, seq, vocab] logits, no KV cache kept). Prints one JSON line:
    {"peer": "torch_forward", "device", "batch", "seq", "seconds_median", "seconds_all", "torch",
     "threads", ...}
plus seconds_min, the process CPU seconds of each timed forward (cpu_seconds_all: on a CPU run,
well under threads x wall means other processes shared the cores), the model source, dtype, attention, parameter count and peak memory of the timed forwards
(CUDA: torch.cuda.max_memory_allocated; CPU: peak RSS of the process).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_common as pc  # noqa: E402

import torch  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description="PyTorch forward-pass peer")
    pc.add_common_args(ap)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()

    device, dtype, attn = pc.setup(args)
    model, source = pc.load_model(args, device, dtype, attn)
    ids = pc.random_batch(model, args, device)

    def forward():
        with torch.inference_mode():
            logits = model(ids).logits
        return logits

    clean_peak = pc.reset_peak(device)
    secs, cpu = pc.timed(forward, device, args.warmup, args.iters)
    peak = pc.peak_bytes(device)

    out = {"peer": "torch_forward"}
    out.update(pc.describe(args, device, dtype, attn, model, source))
    out.update({
        "warmup": args.warmup, "iters": args.iters,
        "seconds_median": pc.median(secs), "seconds_all": secs, "seconds_min": min(secs),
        "cpu_seconds_all": cpu,
        "weights_gib": pc.gib(pc.weight_bytes(model)),
        "peak_gib": pc.gib(peak),
        "peak_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "rss",
        "peak_covers_only_timed_part": clean_peak,
    })
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
