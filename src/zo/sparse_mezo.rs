//! Sparse-MeZO: perturb and update only the small weights. Per tensor, a threshold h at a
//! percentile of |w| is computed once before training; an element moves only where the
//! unperturbed |w| <= h. The mask is recomputed on the fly and never stored.

use super::direction::{Direction, StepKey, TensorZ};
use super::mezo::{decay_for, sgd_update};
use super::{TensorCtx, ZoConfig, ZoMethod};
use crate::model::{HostTensor, LlamaWeights};
use anyhow::{bail, Result};
use std::collections::HashMap;

pub struct SparseMezo {
    sparsity: f32,
    dir: Direction,
}

impl SparseMezo {
    pub fn new(sparsity: f32) -> Self {
        SparseMezo {
            sparsity,
            dir: Direction::Sparse { thresholds: vec![] },
        }
    }
}

/// The threshold under which a fraction (1 - sparsity) of |w| lies.
pub fn threshold(t: &HostTensor, sparsity: f32) -> f32 {
    let mut a: Vec<f32> = t.to_f32_vec().into_iter().map(f32::abs).collect();
    let n = a.len();
    let keep = (((1.0 - sparsity as f64) * n as f64).round() as usize).clamp(1, n);
    let (_, h, _) = a.select_nth_unstable_by(keep - 1, f32::total_cmp);
    *h
}

impl ZoMethod for SparseMezo {
    fn direction(&self) -> &Direction {
        &self.dir
    }

    fn prepare(&mut self, weights: &LlamaWeights) -> Result<()> {
        let thresholds = weights
            .tensors()
            .iter()
            .map(|t| threshold(t, self.sparsity))
            .collect();
        self.dir = Direction::Sparse { thresholds };
        Ok(())
    }

    fn update_tensor(
        &mut self,
        t: &mut HostTensor,
        ctx: &TensorCtx,
        key: StepKey,
        offset: f32,
        g: f32,
        cfg: &ZoConfig,
    ) -> Result<()> {
        let tz = TensorZ::of(t, ctx.id, key, &self.dir, &[]);
        sgd_update(t, &tz, offset, g, cfg.lr, decay_for(ctx.kind, cfg));
        Ok(())
    }

    fn state(&self) -> Vec<(String, Vec<f32>)> {
        match &self.dir {
            Direction::Sparse { thresholds } => vec![("thresholds".into(), thresholds.clone())],
            _ => vec![],
        }
    }

    fn load_state(&mut self, mut state: HashMap<String, Vec<f32>>) -> Result<()> {
        let Some(h) = state.remove("thresholds") else {
            bail!("sparse-mezo state has no thresholds");
        };
        self.dir = Direction::Sparse { thresholds: h };
        if let Some(k) = state.keys().next() {
            bail!("sparse-mezo state has unexpected entry {k}");
        }
        Ok(())
    }
}
