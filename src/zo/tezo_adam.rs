//! TeZO-Adam: Adam whose moments live on the r-vectors of each matrix (the gradient estimate
//! in tau coordinates is g * tau), so the optimizer state is tiny; vectors (norms) keep
//! elementwise moments, which are small too.

use super::direction::{is_matrix, Direction, Factors, StepKey, TensorZ};
use super::mezo::decay_for;
use super::mezo_adam::{adam_corrections, adam_update, load_moments, moments_state};
use super::tezo::LowRank;
use super::{TensorCtx, ZoConfig, ZoMethod};
use crate::model::{HostTensor, LlamaWeights};
use anyhow::{bail, Result};
use std::collections::HashMap;

pub struct TezoAdam {
    lr: LowRank,
    /// Per tensor: r moments for matrices, numel moments for vectors.
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl TezoAdam {
    pub fn new(cfg: &ZoConfig, weights: &LlamaWeights) -> Self {
        let zeros = || {
            weights
                .tensors()
                .iter()
                .map(|t| vec![0.0; if is_matrix(t) { cfg.rank } else { t.numel() }])
                .collect()
        };
        TezoAdam {
            lr: LowRank::new(cfg, weights),
            m: zeros(),
            v: zeros(),
        }
    }
}

impl ZoMethod for TezoAdam {
    fn direction(&self) -> &Direction {
        &self.lr.dir
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
        let wd = decay_for(ctx.kind, cfg);
        let (m, v) = (&mut self.m[ctx.id], &mut self.v[ctx.id]);
        if !is_matrix(t) {
            let tz = TensorZ::of(t, ctx.id, key, &self.lr.dir, &[]);
            adam_update(t, &tz, offset, g, (m, v), cfg, key.step, wd);
            return Ok(());
        }
        let tau = Factors::tau(key, ctx.id, cfg.rank);
        let (c1, c2) = adam_corrections(cfg, key.step);
        let mut delta = vec![0.0f32; cfg.rank];
        for k in 0..cfg.rank {
            let ge = g * tau[k];
            m[k] = cfg.beta1 * m[k] + (1.0 - cfg.beta1) * ge;
            v[k] = cfg.beta2 * v[k] + (1.0 - cfg.beta2) * ge * ge;
            delta[k] = -cfg.lr * (m[k] / c1) / ((v[k] / c2).sqrt() + cfg.adam_eps);
        }
        self.lr.apply(t, ctx.id, key, offset, &delta, cfg.lr * wd);
        Ok(())
    }

    fn virtual_coefficients(&self, id: usize) -> Option<&[f32]> {
        self.lr.virtual_coefficients(id)
    }

    fn clear_virtual(&mut self) {
        self.lr.clear();
    }

    fn state(&self) -> Vec<(String, Vec<f32>)> {
        let mut s = moments_state(&self.m, &self.v);
        s.extend(self.lr.state());
        s
    }

    fn load_state(&mut self, mut state: HashMap<String, Vec<f32>>) -> Result<()> {
        load_moments(&mut self.m, &mut self.v, &mut state)?;
        self.lr.load_state(&mut state)?;
        if let Some(k) = state.keys().next() {
            bail!("tezo-adam state has unexpected entry {k}");
        }
        Ok(())
    }
}
