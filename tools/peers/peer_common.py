"""Shared pieces of the PyTorch peer scripts (torch_forward.py, torch_mezo.py).

The peers are what zoft's benchmarks compare against: plain PyTorch + HF transformers, loaded and run
the way a user of those libraries would. Not meant to be imported from anywhere else.

Model sources (exactly one):
  --gguf PATH           a GGUF file, loaded with HF transformers' own GGUF loader (dequantized);
                        default: the ZOFT_GGUF environment variable
  --model-dir DIR       an HF-layout directory (config.json + safetensors)
  --random-config NAME  random weights of a known shape, built from a LlamaConfig directly on the
                        device (no download, no file): llama-7b, llama-13b, llama-30b, smollm2-135m
"""

import os
import platform
import resource
import statistics
import time

import torch

RANDOM_CONFIGS = {
    # name: (hidden, ffn, layers, heads, kv heads, vocab, tied, rope_theta)
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, True, 100000.0),
    "llama-7b": (4096, 11008, 32, 32, 32, 32000, False, 10000.0),
    "llama-13b": (5120, 13824, 40, 40, 40, 32000, False, 10000.0),
    "llama-30b": (6656, 17920, 60, 52, 52, 32000, False, 10000.0),
}

DTYPES = {"float32": torch.float32, "f32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "f16": torch.float16}


def add_common_args(ap, batch=16, seq=64):
    src = ap.add_argument_group("model source (one of)")
    src.add_argument("--gguf", default=os.environ.get("ZOFT_GGUF"),
                     help="GGUF file loaded through HF transformers (default: $ZOFT_GGUF)")
    src.add_argument("--model-dir", help="HF-layout model directory")
    src.add_argument("--random-config", choices=sorted(RANDOM_CONFIGS),
                     help="random-weight model of this shape")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", choices=sorted(DTYPES),
                    help="weights/compute dtype (default: float32 on cpu, bfloat16 on cuda)")
    ap.add_argument("--attn", default=None, choices=["eager", "sdpa"],
                    help="attention implementation (default: sdpa)")
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--seq", type=int, default=seq)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random token ids")


def setup(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    dtype = DTYPES[args.dtype] if args.dtype else (
        torch.bfloat16 if args.device == "cuda" else torch.float32)
    attn = args.attn or "sdpa"
    return torch.device(args.device), dtype, attn


def _dtype_kw(dtype):
    """transformers renamed from_pretrained's torch_dtype to dtype in 4.56."""
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_model(args, device, dtype, attn):
    """Returns (model, source description). The model is in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    chosen = [x for x in (args.random_config, args.model_dir) if x]
    if len(chosen) > 1:
        raise SystemExit("give only one of --model-dir, --random-config (or --gguf)")
    if args.random_config:
        h, ffn, layers, heads, kv, vocab, tied, theta = RANDOM_CONFIGS[args.random_config]
        cfg = LlamaConfig(hidden_size=h, intermediate_size=ffn, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                          tie_word_embeddings=tied, rope_theta=theta, rms_norm_eps=1e-5,
                          max_position_embeddings=max(4096, args.seq), pad_token_id=0,
                          bos_token_id=1, eos_token_id=2, attn_implementation=attn)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(prev)
        source = f"random:{args.random_config}"
    elif args.model_dir:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, attn_implementation=attn,
                                                     **_dtype_kw(dtype)).to(device)
        source = f"hf:{os.path.basename(os.path.abspath(args.model_dir))}"
    elif args.gguf:
        d, name = os.path.split(os.path.abspath(args.gguf))
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, attn_implementation=attn,
                                                     **_dtype_kw(dtype)).to(device)
        source = f"gguf:{name}"
    else:
        raise SystemExit("no model: pass --gguf (or set ZOFT_GGUF), --model-dir or --random-config")
    model.eval()
    return model, source


def random_batch(model, args, device):
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
    return ids.to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall and process CPU time of one timed region. cpu/wall well below the thread count on an
    otherwise idle CPU run means other processes took cores: the wall figure is then inflated."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


def timed(fn, device, warmup, iters):
    """Runs fn warmup times untimed, then iters times timed; returns (wall seconds, process CPU
    seconds), one entry per timed run."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(iters):
        with Clock(device) as c:
            fn()
        wall.append(c.wall)
        cpu.append(c.cpu)
    return wall, cpu


def median(xs):
    return statistics.median(xs) if xs else None


def reset_peak(device):
    """Starts a new peak-memory window. On CPU, resets the kernel's peak-RSS mark (Linux >= 4.0,
    /proc/self/clear_refs) so that getrusage's ru_maxrss covers only what follows; returns False
    where that is not possible (the peak then also covers everything before)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes(device):
    if device.type == "cuda":
        sync(device)
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if platform.system() == "Darwin" else rss * 1024  # Linux reports KiB


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def weight_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def gib(n):
    return None if n is None else round(n / 2**30, 3)


def describe(args, device, dtype, attn, model, source):
    return {
        "device": device.type, "device_name": device_name(device), "model": source,
        "params": sum(p.numel() for p in model.parameters()), "dtype": str(dtype).replace("torch.", ""),
        "attn": attn, "batch": args.batch, "seq": args.seq,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
