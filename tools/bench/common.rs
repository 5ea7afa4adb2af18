//! Shared by the CPU benchmarks: argument lookup and the model under test.
#![allow(dead_code)] // each benchmark uses its own subset

use zoft::model::{DType, LlamaConfig, LlamaWeights};

/// The value after `name` on the command line, or `default`.
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

/// `--model DIR` when given, else random f32 weights of the `--random` preset's shape.
pub fn load_model() -> anyhow::Result<(LlamaConfig, LlamaWeights)> {
    let dir = arg("--model", "");
    if dir.is_empty() {
        let cfg = LlamaConfig::preset(&arg("--random", "smollm2-135m"))
            .ok_or_else(|| anyhow::anyhow!("unknown --random preset"))?;
        let w = LlamaWeights::random(&cfg, 0, DType::parse(&arg("--dtype", "f32"))?);
        return Ok((cfg, w));
    }
    let f = zoft::model::load::load_dir(std::path::Path::new(&dir))?;
    Ok((f.cfg, f.weights))
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
