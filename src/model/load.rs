//! Loading an HF-layout model directory: config, weights, tokenizer.

use super::{LlamaConfig, LlamaWeights};
use crate::tokenizer::Tokenizer;
use anyhow::Result;
use std::path::Path;

pub struct ModelFiles {
    pub cfg: LlamaConfig,
    pub weights: LlamaWeights,
    pub tokenizer: Tokenizer,
}

/// Reads config.json, maps the safetensors (copy-on-write, zero-copy where aligned) and loads
/// the tokenizer, checking each against the config.
pub fn load_dir(dir: &Path) -> Result<ModelFiles> {
    let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
    let weights = LlamaWeights::load(dir, &cfg)?;
    let tokenizer = Tokenizer::load(dir, cfg.vocab_size)?;
    Ok(ModelFiles {
        cfg,
        weights,
        tokenizer,
    })
}
