//! Shared by the benchmarks: argument lookup, the model under test (CPU) and the loss a ZO
//! step minimizes (any backend).
#![allow(dead_code)] // each benchmark uses its own subset

use zoft::backend::{Backend, LinearHook, PairedHook, SeqLayout};
use zoft::model::{DType, Llama, LlamaConfig, LlamaWeights};
use zoft::zo::Objective;

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

/// Mean causal-LM loss over every next token of `batch` full sequences, as the PyTorch peer
/// computes it, with the paired form that `--perturb paired` runs (a closure has none).
pub struct NextTokenLoss {
    pub ids: Vec<u32>,
    pub layout: SeqLayout,
    pub targets: Vec<i32>,
}

impl NextTokenLoss {
    /// `ids` as `batch` sequences of `seq` tokens, each token predicting the next.
    pub fn new(ids: Vec<u32>, batch: usize, seq: usize) -> Self {
        assert_eq!(ids.len(), batch * seq);
        let targets = (0..batch * seq)
            .map(|i| {
                if (i + 1) % seq == 0 {
                    -1
                } else {
                    ids[i + 1] as i32
                }
            })
            .collect();
        let layout = SeqLayout::full(batch, seq, &vec![seq; batch]);
        NextTokenLoss {
            ids,
            layout,
            targets,
        }
    }

    fn mean(&self, logprobs: &[f32]) -> f32 {
        let n = self.targets.iter().filter(|&&t| t >= 0).count() as f32;
        -logprobs.iter().sum::<f32>() / n
    }
}

impl<B: Backend> Objective<B> for NextTokenLoss {
    fn loss(&mut self, m: &Llama<B>, h: &mut dyn LinearHook<B>) -> anyhow::Result<f32> {
        Ok(self.mean(&m.target_logprobs(&self.ids, &self.layout, &self.targets, h)?))
    }

    fn paired_losses(
        &mut self,
        m: &Llama<B>,
        h: &mut dyn PairedHook<B>,
    ) -> Option<anyhow::Result<[f32; 2]>> {
        let lp = m.target_logprobs_paired(&self.ids, &self.layout, &self.targets, h);
        Some(lp.map(|[plus, minus]| [self.mean(&plus), self.mean(&minus)]))
    }
}
