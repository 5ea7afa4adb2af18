//! The weights of a LLaMA model, named as in HF transformers, checked against the config.

use super::config::LlamaConfig;
use super::safetensors_io;
use super::tensor::{DType, HostTensor};
use anyhow::{bail, Result};
use std::collections::HashMap;
use std::path::Path;

/// What a parameter is, which decides how methods treat it (e.g. no weight decay on norms,
/// full-Gaussian instead of low-rank perturbation for vectors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    Embedding,
    Norm,
    Linear,
    LmHead,
}

pub struct LayerWeights<W = HostTensor> {
    pub attn_norm: W,
    pub wq: W,
    pub wk: W,
    pub wv: W,
    pub wo: W,
    pub mlp_norm: W,
    pub w_gate: W,
    pub w_up: W,
    pub w_down: W,
}

pub struct LlamaWeights<W = HostTensor> {
    pub embed: W,
    pub layers: Vec<LayerWeights<W>>,
    pub final_norm: W,
    /// `None` when the LM head is tied to the embedding.
    pub lm_head: Option<W>,
}

/// HF names of one layer's tensors, in the order `LayerWeights` lists them.
pub const LAYER_TENSORS: [&str; 9] = [
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
];

/// Expected shapes of every tensor, by HF name, in canonical order. The position in this list
/// is the tensor id used to key random perturbations.
pub fn expected_tensors(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>, ParamKind)> {
    let d = cfg.hidden_size;
    let f = cfg.intermediate_size;
    let mut v = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, d],
        ParamKind::Embedding,
    )];
    for l in 0..cfg.num_hidden_layers {
        let shapes = [
            (vec![d], ParamKind::Norm),
            (vec![cfg.q_dim(), d], ParamKind::Linear),
            (vec![cfg.kv_dim(), d], ParamKind::Linear),
            (vec![cfg.kv_dim(), d], ParamKind::Linear),
            (vec![d, cfg.q_dim()], ParamKind::Linear),
            (vec![d], ParamKind::Norm),
            (vec![f, d], ParamKind::Linear),
            (vec![f, d], ParamKind::Linear),
            (vec![d, f], ParamKind::Linear),
        ];
        for (name, (shape, kind)) in LAYER_TENSORS.iter().zip(shapes) {
            v.push((format!("model.layers.{l}.{name}"), shape, kind));
        }
    }
    v.push(("model.norm.weight".to_string(), vec![d], ParamKind::Norm));
    if !cfg.tie_word_embeddings {
        v.push((
            "lm_head.weight".to_string(),
            vec![cfg.vocab_size, d],
            ParamKind::LmHead,
        ));
    }
    v
}

impl<W> LlamaWeights<W> {
    /// Assembles tensors listed in canonical order (`expected_tensors`) into a model.
    pub fn from_ordered(cfg: &LlamaConfig, tensors: Vec<W>) -> Self {
        let mut it = tensors.into_iter();
        let mut n = || it.next().expect("one tensor per expected name");
        let embed = n();
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            layers.push(LayerWeights {
                attn_norm: n(),
                wq: n(),
                wk: n(),
                wv: n(),
                wo: n(),
                mlp_norm: n(),
                w_gate: n(),
                w_up: n(),
                w_down: n(),
            });
        }
        let final_norm = n();
        let lm_head = (!cfg.tie_word_embeddings).then(&mut n);
        LlamaWeights {
            embed,
            layers,
            final_norm,
            lm_head,
        }
    }

    /// Every tensor in canonical order (the order of `expected_tensors`).
    pub fn tensors(&self) -> Vec<&W> {
        let mut v = vec![&self.embed];
        for l in &self.layers {
            v.extend([
                &l.attn_norm,
                &l.wq,
                &l.wk,
                &l.wv,
                &l.wo,
                &l.mlp_norm,
                &l.w_gate,
                &l.w_up,
                &l.w_down,
            ]);
        }
        v.push(&self.final_norm);
        v.extend(self.lm_head.as_ref());
        v
    }

    pub fn tensors_mut(&mut self) -> Vec<&mut W> {
        let mut v = vec![&mut self.embed];
        for l in &mut self.layers {
            v.extend([
                &mut l.attn_norm,
                &mut l.wq,
                &mut l.wk,
                &mut l.wv,
                &mut l.wo,
                &mut l.mlp_norm,
                &mut l.w_gate,
                &mut l.w_up,
                &mut l.w_down,
            ]);
        }
        v.push(&mut self.final_norm);
        if let Some(h) = self.lm_head.as_mut() {
            v.push(h);
        }
        v
    }

    pub fn lm_head(&self) -> &W {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// The same model with every tensor converted (e.g. uploaded to a device), in canonical order.
    pub fn try_map<U>(&self, mut f: impl FnMut(usize, &W) -> Result<U>) -> Result<LlamaWeights<U>> {
        let mut id = 0usize;
        let mut g = |w: &W| {
            let r = f(id, w);
            id += 1;
            r
        };
        let embed = g(&self.embed)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            layers.push(LayerWeights {
                attn_norm: g(&l.attn_norm)?,
                wq: g(&l.wq)?,
                wk: g(&l.wk)?,
                wv: g(&l.wv)?,
                wo: g(&l.wo)?,
                mlp_norm: g(&l.mlp_norm)?,
                w_gate: g(&l.w_gate)?,
                w_up: g(&l.w_up)?,
                w_down: g(&l.w_down)?,
            });
        }
        let final_norm = g(&self.final_norm)?;
        let lm_head = self.lm_head.as_ref().map(&mut g).transpose()?;
        Ok(LlamaWeights {
            embed,
            layers,
            final_norm,
            lm_head,
        })
    }
}

impl LlamaWeights<HostTensor> {
    /// Loads the safetensors of an HF-layout directory and checks every tensor against the
    /// config: present, right shape, supported dtype.
    pub fn load(dir: &Path, cfg: &LlamaConfig) -> Result<Self> {
        let tensors = safetensors_io::load_dir(dir)?;
        Self::from_tensors(tensors, cfg, &dir.display().to_string())
    }

    pub fn from_tensors(
        mut tensors: HashMap<String, HostTensor>,
        cfg: &LlamaConfig,
        origin: &str,
    ) -> Result<Self> {
        let mut ordered = Vec::new();
        for (name, shape, _) in expected_tensors(cfg) {
            let Some(t) = tensors.remove(&name) else {
                bail!(
                    "{origin}: missing tensor {name} (expected shape {shape:?} from config.json)"
                );
            };
            if t.shape != shape {
                bail!(
                    "{origin}: tensor {name} has shape {:?} but config.json implies {shape:?}",
                    t.shape
                );
            }
            ordered.push(t);
        }
        let dtype = ordered[1].dtype;
        if let Some(t) = ordered
            .iter()
            .find(|t| t.dtype != dtype && t.shape.len() == 2)
        {
            bail!(
                "{origin}: tensor {} is {} but the other matrices are {}; mixed matrix dtypes are not supported",
                t.name,
                t.dtype.name(),
                dtype.name()
            );
        }
        Ok(LlamaWeights::from_ordered(cfg, ordered))
    }

    pub fn matrix_dtype(&self) -> DType {
        self.layers[0].wq.dtype
    }

    pub fn byte_size(&self) -> usize {
        self.tensors().iter().map(|t| t.bytes().len()).sum()
    }

    /// Random weights of a config's shape (for tests and benchmarks): normal(0, std) matrices
    /// and norms near 1, from a deterministic seed.
    pub fn random(cfg: &LlamaConfig, seed: u64, dtype: DType) -> Self {
        let mut tensors = HashMap::new();
        for (i, (name, shape, kind)) in expected_tensors(cfg).into_iter().enumerate() {
            let n: usize = shape.iter().product();
            let mut data = vec![0.0f32; n];
            crate::rng::Philox::new(seed, 0xC0FFEE, i as u32).fill_normal(0, &mut data);
            match kind {
                ParamKind::Norm => data.iter_mut().for_each(|x| *x = 1.0 + 0.1 * *x),
                _ => data.iter_mut().for_each(|x| *x *= 0.05),
            }
            tensors.insert(
                name.clone(),
                HostTensor::from_f32_as(name, shape, &data, dtype),
            );
        }
        Self::from_tensors(tensors, cfg, "random").expect("random weights match their config")
    }

    /// Writes all tensors as an HF-layout `model.safetensors` in `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let ts = self.tensors();
        let list: Vec<(&str, &[usize], DType, &[u8])> = ts
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice(), t.dtype, t.bytes()))
            .collect();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors_io::save_file(&dir.join("model.safetensors"), &list, Some(meta))
    }
}
