//! MeZO-Adam: Adam on the estimate g z with full first and second moments per weight. The
//! memory-hungry baseline (two extra copies of the model) that the others are measured against.

use super::direction::{Direction, ElemState, StepKey, TensorZ};
use super::mezo::decay_for;
use super::{TensorCtx, ZoConfig, ZoMethod};
use crate::model::{HostTensor, LlamaWeights};
use anyhow::{bail, Result};
use std::collections::HashMap;

pub struct MezoAdam {
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

const DENSE: Direction = Direction::Dense;

impl MezoAdam {
    pub fn new(weights: &LlamaWeights) -> Self {
        let zeros = || {
            weights
                .tensors()
                .iter()
                .map(|t| vec![0.0; t.numel()])
                .collect()
        };
        MezoAdam {
            m: zeros(),
            v: zeros(),
        }
    }
}

/// Bias-corrected Adam step sizes for step index `step` (0-based).
pub fn adam_corrections(cfg: &ZoConfig, step: u32) -> (f32, f32) {
    let t = step as i32 + 1;
    (1.0 - cfg.beta1.powi(t), 1.0 - cfg.beta2.powi(t))
}

/// Elementwise AdamW on the estimate g z, restoring from w0 + offset z in the same pass.
#[allow(clippy::too_many_arguments)]
pub fn adam_update(
    t: &mut HostTensor,
    tz: &TensorZ,
    offset: f32,
    g: f32,
    (m, v): (&mut [f32], &mut [f32]),
    cfg: &ZoConfig,
    step: u32,
    wd: f32,
) {
    let (c1, c2) = adam_corrections(cfg, step);
    let (ms, vs) = (ElemState::new(m), ElemState::new(v));
    let (b1, b2, lr, e) = (cfg.beta1, cfg.beta2, cfg.lr, cfg.adam_eps);
    tz.pass(t, offset, |j, w0, z| {
        // SAFETY: each element index j belongs to exactly one chunk of the pass.
        let (m, v) = unsafe { (ms.get(j), vs.get(j)) };
        let ge = g * z;
        *m = b1 * *m + (1.0 - b1) * ge;
        *v = b2 * *v + (1.0 - b2) * ge * ge;
        w0 - lr * ((*m / c1) / ((*v / c2).sqrt() + e) + wd * w0)
    });
}

pub fn moments_state(m: &[Vec<f32>], v: &[Vec<f32>]) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    for (i, (m, v)) in m.iter().zip(v).enumerate() {
        out.push((format!("m.{i}"), m.clone()));
        out.push((format!("v.{i}"), v.clone()));
    }
    out
}

/// Fills moment vectors from saved state, checking every length.
pub fn load_moments(
    m: &mut [Vec<f32>],
    v: &mut [Vec<f32>],
    state: &mut HashMap<String, Vec<f32>>,
) -> Result<()> {
    for (name, slot) in m
        .iter_mut()
        .enumerate()
        .map(|(i, s)| (format!("m.{i}"), s))
        .chain(v.iter_mut().enumerate().map(|(i, s)| (format!("v.{i}"), s)))
    {
        if slot.is_empty() {
            continue;
        }
        let Some(saved) = state.remove(&name) else {
            bail!("optimizer state has no {name}");
        };
        if saved.len() != slot.len() {
            bail!(
                "optimizer state {name} has {} values, expected {}",
                saved.len(),
                slot.len()
            );
        }
        *slot = saved;
    }
    Ok(())
}

impl ZoMethod for MezoAdam {
    fn direction(&self) -> &Direction {
        &DENSE
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
        let tz = TensorZ::of(t, ctx.id, key, &DENSE, &[]);
        let mv = (&mut self.m[ctx.id][..], &mut self.v[ctx.id][..]);
        adam_update(
            t,
            &tz,
            offset,
            g,
            mv,
            cfg,
            key.step,
            decay_for(ctx.kind, cfg),
        );
        Ok(())
    }

    fn state(&self) -> Vec<(String, Vec<f32>)> {
        moments_state(&self.m, &self.v)
    }

    fn load_state(&mut self, mut state: HashMap<String, Vec<f32>>) -> Result<()> {
        load_moments(&mut self.m, &mut self.v, &mut state)?;
        if let Some(k) = state.keys().next() {
            bail!("mezo-adam state has unexpected entry {k}");
        }
        Ok(())
    }
}
