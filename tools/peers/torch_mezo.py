#!/usr/bin/env python3
"""PyTorch peer: the MeZO reference algorithm (Malladi et al., 2023), full-parameter MeZO-SGD.

zoft's ZO-step benchmark is compared against this, run on the same machine in the same job.
Follows the algorithm of the paper's reference trainer:

    each step draws a seed s
    perturb(c): torch.manual_seed(s); for every trainable parameter p, in named_parameters order:
                    z = torch.normal(0, 1, size=p.shape, device=p.device, dtype=p.dtype)
                    p += c * eps * z
    perturb(+1); l+ = loss      perturb(-2); l- = loss      perturb(+1)   (restores w)
    g = (l+ - l-) / (2 eps)
    update: torch.manual_seed(s); regenerate every z in the same order;
            p -= lr * (g * z + wd * p)     (no weight decay for norms and biases)

The loss is HF's causal-LM cross-entropy of the batch on itself (labels = input_ids), computed under
torch.inference_mode like the reference. Perturbations are in place (p.data.add_), so weights live
once; each z is one parameter-sized temporary.

Needs: torch, transformers; for a GGUF source also gguf and accelerate.

    python tools/peers/torch_mezo.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf \
        --batch 16 --seq 64 --warmup 1 --steps 2 --threads 2
    python tools/peers/torch_mezo.py --device cuda --random-config llama-7b --batch 16 --seq 512

Measures, in this order: inference forwards (`model(input_ids).logits`, as torch_forward.py), then
MeZO steps; --warmup untimed repetitions before each. Peak memory is taken separately for the two
phases (CUDA: torch.cuda.max_memory_allocated, reset between; CPU: peak RSS from getrusage, with
the kernel's high-water mark reset through /proc/self/clear_refs where Linux allows it).
Prints one JSON line with step and forward medians, their ratio, the time inside a step spent in
the two loss forwards vs the perturbation/update passes, and the peaks; also the minima and the
process CPU seconds of each timed run (on a CPU run, well under threads x wall means other processes
shared the cores and the wall figures are inflated).
"""

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_common as pc  # noqa: E402

import torch  # noqa: E402


def no_decay(name, p):
    n = name.lower()
    return p.ndim < 2 or "norm" in n or "bias" in n


class MeZO:
    def __init__(self, model, eps, lr, wd, seed):
        self.model = model
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.eps, self.lr, self.wd = eps, lr, wd
        self.rng = random.Random(seed)
        self.device = self.params[0][1].device
        self.t_forward = 0.0
        self.t_passes = 0.0

    def _z(self, p):
        return torch.normal(mean=0.0, std=1.0, size=p.shape, device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def perturb(self, seed, scale):
        torch.manual_seed(seed)
        for _, p in self.params:
            p.data.add_(self._z(p), alpha=scale * self.eps)

    @torch.no_grad()
    def update(self, seed, g):
        torch.manual_seed(seed)
        for name, p in self.params:
            z = self._z(p)
            if self.wd and not no_decay(name, p):
                p.data.mul_(1.0 - self.lr * self.wd)  # p -= lr * wd * p
            p.data.add_(z, alpha=-self.lr * g)  # p -= lr * g * z

    def loss(self, ids):
        with torch.inference_mode():
            return float(self.model(input_ids=ids, labels=ids).loss)

    def _passes(self, fn, *a):
        pc.sync(self.device)
        t0 = time.perf_counter()
        fn(*a)
        pc.sync(self.device)
        self.t_passes += time.perf_counter() - t0

    def _loss(self, ids):
        t0 = time.perf_counter()
        v = self.loss(ids)  # float() synchronizes
        self.t_forward += time.perf_counter() - t0
        return v

    def step(self, ids):
        seed = self.rng.randrange(1_000_000_000)
        self._passes(self.perturb, seed, 1.0)
        l_plus = self._loss(ids)
        self._passes(self.perturb, seed, -2.0)
        l_minus = self._loss(ids)
        self._passes(self.perturb, seed, 1.0)
        g = (l_plus - l_minus) / (2.0 * self.eps)
        self._passes(self.update, seed, g)
        return l_plus, l_minus, g


def main():
    ap = argparse.ArgumentParser(description="PyTorch MeZO-SGD peer")
    pc.add_common_args(ap)
    ap.add_argument("--steps", type=int, default=3, help="timed MeZO steps")
    ap.add_argument("--iters", type=int, default=None, help="timed forwards (default: --steps)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed forwards and steps before each")
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--wd", type=float, default=0.0)
    ap.add_argument("--step-seed", type=int, default=42, help="seed of the per-step seeds")
    args = ap.parse_args()
    iters = args.iters if args.iters is not None else args.steps

    device, dtype, attn = pc.setup(args)
    model, source = pc.load_model(args, device, dtype, attn)
    ids = pc.random_batch(model, args, device)

    # ---- inference forward ----
    def forward():
        with torch.inference_mode():
            return model(ids).logits

    clean_fwd = pc.reset_peak(device)
    fwd_secs, fwd_cpu = pc.timed(forward, device, args.warmup, iters)
    peak_fwd = pc.peak_bytes(device)

    # ---- MeZO steps ----
    mezo = MeZO(model, args.eps, args.lr, args.wd, args.step_seed)
    clean_step = pc.reset_peak(device)
    for _ in range(args.warmup):
        mezo.step(ids)
    step_secs, step_cpu, fwd_in_step, passes_in_step, losses = [], [], [], [], []
    for _ in range(args.steps):
        mezo.t_forward = mezo.t_passes = 0.0
        with pc.Clock(device) as c:
            l_plus, l_minus, g = mezo.step(ids)
        step_secs.append(c.wall)
        step_cpu.append(c.cpu)
        fwd_in_step.append(mezo.t_forward)
        passes_in_step.append(mezo.t_passes)
        losses.append({"loss_plus": l_plus, "loss_minus": l_minus, "projected_grad": g})
    peak_step = pc.peak_bytes(device)

    step_med, fwd_med = pc.median(step_secs), pc.median(fwd_secs)
    out = {"peer": "torch_mezo"}
    out.update(pc.describe(args, device, dtype, attn, model, source))
    out.update({
        "eps": args.eps, "lr": args.lr, "wd": args.wd, "warmup": args.warmup,
        "steps": args.steps, "forward_iters": iters,
        "step_seconds_median": step_med, "step_seconds_all": step_secs,
        "step_seconds_min": min(step_secs), "step_cpu_seconds_all": step_cpu,
        "forward_seconds_median": fwd_med, "forward_seconds_all": fwd_secs,
        "forward_seconds_min": min(fwd_secs), "forward_cpu_seconds_all": fwd_cpu,
        "step_over_forward": step_med / fwd_med if step_med and fwd_med else None,
        "step_two_loss_forwards_seconds_median": pc.median(fwd_in_step),
        "step_perturb_update_passes_seconds_median": pc.median(passes_in_step),
        "weights_gib": pc.gib(pc.weight_bytes(model)),
        "peak_forward_gib": pc.gib(peak_fwd),
        "peak_step_gib": pc.gib(peak_step),
        "peak_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "rss",
        "peaks_cover_only_their_phase": clean_fwd and clean_step,
        "losses": losses,
    })
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
