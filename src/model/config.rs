//! `config.json` of a LLaMA-family model, in HF transformers' field names.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// llama3-style RoPE frequency scaling (`rope_scaling` with `rope_type: "llama3"`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default = "one")]
    pub factor: f64,
    #[serde(default = "one")]
    pub low_freq_factor: f64,
    #[serde(default = "four")]
    pub high_freq_factor: f64,
    #[serde(default = "default_orig_ctx")]
    pub original_max_position_embeddings: usize,
}

fn one() -> f64 {
    1.0
}
fn four() -> f64 {
    4.0
}
fn default_orig_ctx() -> usize {
    8192
}
fn default_theta() -> f64 {
    10000.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ctx() -> usize {
    2048
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LlamaConfig {
    #[serde(default = "default_arch")]
    pub architectures: Vec<String>,
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub torch_dtype: Option<String>,
}

fn default_arch() -> Vec<String> {
    vec!["LlamaForCausalLM".into()]
}
fn default_model_type() -> String {
    "llama".into()
}
fn default_hidden_act() -> String {
    "silu".into()
}

impl LlamaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading model config {}", path.display()))?;
        let cfg: LlamaConfig = serde_json::from_str(&text)
            .with_context(|| format!("parsing model config {}", path.display()))?;
        cfg.validate()
            .with_context(|| format!("model config {}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if self.model_type != "llama" && self.model_type != "mistral" {
            bail!(
                "model_type {:?} is not supported (expected \"llama\")",
                self.model_type
            );
        }
        if self.hidden_act != "silu" {
            bail!(
                "hidden_act {:?} is not supported (expected \"silu\")",
                self.hidden_act
            );
        }
        if self.num_attention_heads == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 {
            bail!("num_attention_heads, num_hidden_layers and vocab_size must be positive");
        }
        if !self.num_attention_heads.is_multiple_of(self.n_kv_heads()) {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.n_kv_heads()
            );
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!("head_dim {} must be even for RoPE", self.head_dim());
        }
        if let Some(s) = &self.rope_scaling {
            if s.rope_type != "llama3" && s.rope_type != "default" {
                bail!(
                    "rope_scaling type {:?} is not supported (expected \"llama3\")",
                    s.rope_type
                );
            }
        }
        Ok(())
    }

    pub fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim()
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads() * self.head_dim()
    }

    /// End-of-sequence ids (HF allows a single id or a list).
    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|v| vec![v as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            _ => vec![],
        }
    }

    /// Parameter count, counting a tied LM head once.
    pub fn parameter_count(&self) -> usize {
        let d = self.hidden_size;
        let per_layer =
            d * self.q_dim() * 2 + d * self.kv_dim() * 2 + 3 * d * self.intermediate_size + 2 * d;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * d
        };
        self.vocab_size * d + self.num_hidden_layers * per_layer + d + head
    }

    /// Inverse frequencies of RoPE (one per rotated pair), with llama3 scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let hd = self.head_dim();
        let mut inv: Vec<f64> = (0..hd / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / hd as f64))
            .collect();
        if let Some(s) = self
            .rope_scaling
            .as_ref()
            .filter(|s| s.rope_type == "llama3")
        {
            let old_ctx = s.original_max_position_embeddings as f64;
            let low_wavelen = old_ctx / s.low_freq_factor;
            let high_wavelen = old_ctx / s.high_freq_factor;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= s.factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (old_ctx / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        inv
    }

    /// Named presets for `zoft init`.
    pub fn preset(name: &str) -> Option<Self> {
        let (d, ffn, layers, heads, kv) = match name {
            "llama-7b" => (4096, 11008, 32, 32, 32),
            "llama-13b" => (5120, 13824, 40, 40, 40),
            "llama-30b" => (6656, 17920, 60, 52, 52),
            "llama-65b" => (8192, 22016, 80, 64, 64),
            "smollm2-135m" => (576, 1536, 30, 9, 3),
            _ => return None,
        };
        let smol = name == "smollm2-135m";
        Some(LlamaConfig {
            architectures: default_arch(),
            model_type: default_model_type(),
            hidden_size: d,
            intermediate_size: ffn,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv),
            head_dim: None,
            vocab_size: if smol { 49152 } else { 32000 },
            max_position_embeddings: if smol { 8192 } else { 2048 },
            rms_norm_eps: if smol { 1e-5 } else { 1e-6 },
            rope_theta: if smol { 100000.0 } else { 10000.0 },
            rope_scaling: None,
            tie_word_embeddings: smol,
            bos_token_id: Some(1),
            eos_token_id: Some(serde_json::json!(2)),
            pad_token_id: None,
            hidden_act: default_hidden_act(),
            torch_dtype: Some("bfloat16".into()),
        })
    }
}
