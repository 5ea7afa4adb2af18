//! CPU forward timing of a model at batch x seq tokens (the default model, or a random model of
//! a preset's shape). Prints one JSON line; `tools/bench-forward` runs it beside PyTorch.
//!
//! cargo run --release --example bench_forward -- [--model DIR | --random smollm2-135m] [--batch 16] [--seq 64] [--iters 3]

use std::time::Instant;
use zoft::backend::cpu::CpuBackend;
use zoft::backend::{NoHook, SeqLayout};
use zoft::model::{DType, Llama, LlamaConfig, LlamaWeights};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn main() -> anyhow::Result<()> {
    let batch: usize = arg("--batch", "16").parse()?;
    let seq: usize = arg("--seq", "64").parse()?;
    let iters: usize = arg("--iters", "3").parse()?;
    let model_dir = arg("--model", "");
    let (cfg, weights) = if model_dir.is_empty() {
        let cfg = LlamaConfig::preset(&arg("--random", "smollm2-135m")).expect("known preset");
        let w = LlamaWeights::random(&cfg, 0, DType::F32);
        (cfg, w)
    } else {
        let f = zoft::model::load::load_dir(std::path::Path::new(&model_dir))?;
        (f.cfg, f.weights)
    };
    let model = Llama::new(cfg.clone(), weights, CpuBackend::new());
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| ((i * 7919) % cfg.vocab_size) as u32)
        .collect();
    let layout = SeqLayout::full(batch, seq, &vec![seq; batch]);
    // Logits of every position, as PyTorch's forward computes them, in row chunks.
    let targets: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
    let mut times = vec![];
    for i in 0..iters + 1 {
        let t0 = Instant::now();
        let lp = model.target_logprobs(&ids, &layout, &targets, &mut NoHook)?;
        std::hint::black_box(lp);
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({"bench": "zoft_forward", "device": "cpu", "threads": rayon::current_num_threads(),
            "batch": batch, "seq": seq, "seconds_median": times[times.len() / 2], "seconds_all": times})
    );
    Ok(())
}
