//! Text generation with a KV cache: greedy, temperature and top-p sampling.

use super::Llama;
use crate::backend::Backend;
use crate::rng::Philox;
use anyhow::{ensure, Result};

#[derive(Clone, Debug)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass kept (1.0 keeps all).
    pub top_p: f32,
    pub seed: u64,
    pub max_new_tokens: usize,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            max_new_tokens: 64,
        }
    }
}

/// Tensor id that keys the sampler's random stream (apart from any parameter's).
const SAMPLER_STREAM: u32 = u32::MAX;

/// Picks the next token from logits: argmax when greedy, else a top-p sample at `temperature`
/// using the uniform of element `index` of the sampler stream.
pub fn sample(logits: &[f32], s: &Sampling, index: u64) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, (((v - m) / s.temperature) as f64).exp()))
        .collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = probs.iter().map(|p| p.1).sum();
    let mut kept = 0.0;
    let mut n = 0;
    for p in &probs {
        kept += p.1;
        n += 1;
        if kept >= s.top_p as f64 * total {
            break;
        }
    }
    let u = Philox::new(s.seed, 0, SAMPLER_STREAM).uniform(index) as f64 * kept;
    let mut acc = 0.0;
    for p in &probs[..n] {
        acc += p.1;
        if u < acc {
            return p.0;
        }
    }
    probs[n - 1].0
}

/// Generates up to `s.max_new_tokens` tokens after `prompt`, stopping after any of `stop`.
/// `on_token` sees each new token as it is produced.
pub fn generate<B: Backend>(
    model: &Llama<B>,
    prompt: &[u32],
    s: &Sampling,
    stop: &[u32],
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    ensure!(!prompt.is_empty(), "generation needs a non-empty prompt");
    let capacity = (prompt.len() + s.max_new_tokens).min(model.cfg.max_position_embeddings);
    ensure!(
        prompt.len() < capacity,
        "prompt of {} tokens leaves no room in the model's context of {}",
        prompt.len(),
        model.cfg.max_position_embeddings
    );
    let mut cache = model.new_cache(capacity)?;
    let mut logits = model.forward_cached(prompt, &mut cache)?;
    let mut out = Vec::new();
    while out.len() < s.max_new_tokens && cache.len < capacity {
        let next = sample(&logits, s, out.len() as u64);
        out.push(next);
        on_token(next);
        if stop.contains(&next) || cache.len + 1 > capacity {
            break;
        }
        logits = model.forward_cached(&[next], &mut cache)?;
    }
    Ok(out)
}
