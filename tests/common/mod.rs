//! Helpers shared by the integration tests.
#![allow(dead_code)]

use zoft::backend::cpu::CpuBackend;
use zoft::model::{DType, Llama, LlamaConfig, LlamaWeights};

/// A tiny LLaMA config: GQA (4 query heads over 2 kv heads), 2 layers.
pub fn tiny_config() -> LlamaConfig {
    let mut c = LlamaConfig::preset("smollm2-135m").unwrap();
    c.hidden_size = 32;
    c.intermediate_size = 48;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = Some(2);
    c.vocab_size = 61;
    c.max_position_embeddings = 64;
    c.rope_theta = 10000.0;
    c.tie_word_embeddings = false;
    c
}

pub fn tiny_model(cfg: &LlamaConfig, seed: u64) -> Llama<CpuBackend> {
    let w = LlamaWeights::random(cfg, seed, DType::F32);
    Llama::new(cfg.clone(), w, CpuBackend::new())
}

/// Relative norm error ||a - b|| / ||b||.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Deterministic token ids in [0, vocab).
pub fn tokens(n: usize, vocab: usize, salt: u64) -> Vec<u32> {
    let p = zoft::rng::Philox::new(salt, 1, 2);
    (0..n)
        .map(|i| (p.block(i as u64)[0] as usize % vocab) as u32)
        .collect()
}

/// Mean of loss(+eps) and loss(-eps) of every step in a trainer's JSONL log.
pub fn logged_losses(log: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["loss_plus"].as_f64().unwrap() + v["loss_minus"].as_f64().unwrap()) / 2.0
        })
        .collect()
}

/// Mean of the first and of the last `n` values.
pub fn first_last_means(v: &[f64], n: usize) -> (f64, f64) {
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    (mean(&v[..n]), mean(&v[v.len() - n..]))
}
