//! CPU forward timing of a model at batch x seq tokens (the default model, or a random model of
//! a preset's shape). Prints one JSON line; `tools/bench-forward` runs it beside PyTorch.
//!
//! cargo run --release --example bench_forward -- [--model DIR | --random smollm2-135m] [--batch 16] [--seq 64] [--iters 3]

#[path = "common.rs"]
mod common;

use common::{arg, load_model, median};
use std::time::Instant;
use zoft::backend::cpu::CpuBackend;
use zoft::backend::{NoHook, SeqLayout};
use zoft::model::Llama;

fn main() -> anyhow::Result<()> {
    let batch: usize = arg("--batch", "16").parse()?;
    let seq: usize = arg("--seq", "64").parse()?;
    let iters: usize = arg("--iters", "3").parse()?;
    let (cfg, weights) = load_model()?;
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
    println!(
        "{}",
        serde_json::json!({"bench": "zoft_forward", "device": "cpu", "threads": rayon::current_num_threads(),
            "batch": batch, "seq": seq, "seconds_median": median(times.clone()), "seconds_all": times})
    );
    Ok(())
}
