//! Sparse-MeZO: perturb and update only the small weights. Per tensor, a threshold h at a
//! percentile of |w| is computed once before training; an element moves only where the
//! unperturbed |w| <= h. The mask is recomputed on the fly and never stored, which is why
//! Sparse-MeZO runs only with the fused perturbation: its weights always hold the true w0
//! (in place, the mask could not be told from the perturbed weights; see `Method::runs_in_place`).

use super::direction::{Direction, StepKey};
use super::mezo::{decay_for, sgd_update};
use super::passes::{ZSpec, ZoBackend};
use super::{TensorCtx, ZoConfig, ZoMethod};
use crate::model::{HostTensor, LlamaWeights};
use anyhow::{bail, Result};
use std::collections::HashMap;

pub struct SparseMezo {
    dir: Direction,
}

impl SparseMezo {
    /// Thresholds from the initial weights.
    pub fn new<B: ZoBackend>(
        backend: &B,
        weights: &LlamaWeights<B::Weight>,
        sparsity: f32,
    ) -> Result<Self> {
        let thresholds = weights
            .tensors()
            .into_iter()
            .map(|t| backend.zo_threshold(t, sparsity))
            .collect::<Result<_>>()?;
        Ok(SparseMezo {
            dir: Direction::Sparse { thresholds },
        })
    }
}

/// The threshold under which a fraction (1 - sparsity) of |w| lies.
pub fn threshold(t: &HostTensor, sparsity: f32) -> f32 {
    super::passes::abs_percentile(t.to_f32_vec(), sparsity)
}

impl<B: ZoBackend> ZoMethod<B> for SparseMezo {
    fn direction(&self) -> &Direction {
        &self.dir
    }

    fn update_tensor(
        &mut self,
        backend: &B,
        t: &mut B::Weight,
        ctx: &TensorCtx,
        key: StepKey,
        offset: f32,
        g: f32,
        cfg: &ZoConfig,
    ) -> Result<()> {
        let z: ZSpec = super::elem_spec(&self.dir, ctx.id);
        let wd = decay_for(ctx.kind, cfg);
        sgd_update(backend, t, ctx.id, key, z, offset, g, cfg, wd)
    }

    fn state(&self, _backend: &B) -> Result<Vec<(String, Vec<f32>)>> {
        Ok(match &self.dir {
            Direction::Sparse { thresholds } => vec![("thresholds".into(), thresholds.clone())],
            _ => vec![],
        })
    }

    fn load_state(&mut self, _backend: &B, mut state: HashMap<String, Vec<f32>>) -> Result<()> {
        let Some(h) = state.remove("thresholds") else {
            bail!("sparse-mezo state has no thresholds");
        };
        let expected = match &self.dir {
            Direction::Sparse { thresholds } => thresholds.len(),
            _ => unreachable!(),
        };
        if h.len() != expected {
            bail!(
                "sparse-mezo state has {} thresholds, expected one per tensor ({expected})",
                h.len()
            );
        }
        self.dir = Direction::Sparse { thresholds: h };
        if let Some(k) = state.keys().next() {
            bail!("sparse-mezo state has unexpected entry {k}");
        }
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        match &self.dir {
            Direction::Sparse { thresholds } => thresholds.len() * 4,
            _ => 0,
        }
    }
}
