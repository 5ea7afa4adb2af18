//! TeZO: per weight matrix fixed factors U [m x r], V [n x r] drawn once per run; per step only
//! tau in R^r, Z = U diag(tau) V^T / sqrt(r). Vectors (norms) get a full Gaussian. Because U and
//! V are fixed, W_t = W_0 + U diag(a_t) V^T / sqrt(r) exactly, where a_t sums the step
//! coefficients: with `--perturb fused` the update stays in a_t (virtual) until it is
//! materialized at save; with `--perturb inplace` each step writes its rank-r update.

use super::direction::{Direction, Factors, StepKey};
use super::mezo::{decay_for, sgd_update};
use super::passes::{Rule, ZSpec, ZoBackend};
use super::{TensorCtx, ZoConfig, ZoMethod};
use anyhow::{bail, Result};
use std::collections::HashMap;

/// The low-rank bookkeeping shared by TeZO and TeZO-Adam.
pub struct LowRank {
    pub dir: Direction,
    /// Virtual update coefficients per matrix (empty when writing updates in place).
    pub acc: Vec<Vec<f32>>,
    pub is_virtual: bool,
}

impl LowRank {
    pub fn new(cfg: &ZoConfig, shapes: &[&[usize]]) -> Self {
        let is_virtual = cfg.perturb.is_fused();
        let acc = shapes
            .iter()
            .map(|s| {
                if is_virtual && s.len() == 2 {
                    vec![0.0; cfg.rank]
                } else {
                    vec![]
                }
            })
            .collect();
        LowRank {
            dir: Direction::LowRank { rank: cfg.rank },
            acc,
            is_virtual,
        }
    }

    pub fn rank(&self) -> usize {
        match self.dir {
            Direction::LowRank { rank } => rank,
            _ => unreachable!(),
        }
    }

    /// Applies a step's update coefficients `delta` (length r) to matrix `id`, restoring from
    /// w0 + offset Z(tau) in the same pass when the update is written in place.
    #[allow(clippy::too_many_arguments)]
    pub fn apply<B: ZoBackend>(
        &mut self,
        backend: &B,
        t: &mut B::Weight,
        id: usize,
        key: StepKey,
        offset: f32,
        delta: &[f32],
        lr_wd: f32,
    ) -> Result<()> {
        if self.is_virtual {
            for (a, d) in self.acc[id].iter_mut().zip(delta) {
                *a += d;
            }
            return Ok(());
        }
        // Decoupled decay acts on w0 (w <- w - lr (step + wd w0)). The tensor still holds
        // w0 + offset Z, so decaying it first scales that perturbation by (1 - lr wd) too,
        // and the restore below takes back exactly the scaled amount.
        let keep = if lr_wd > 0.0 {
            backend.zo_decay(t, lr_wd)?;
            1.0 - lr_wd
        } else {
            1.0
        };
        let tau = Factors::tau(key, id, self.rank());
        // Z is linear in its coefficients: restore and update are one combined rank-r pass.
        let c: Vec<f32> = tau
            .iter()
            .zip(delta)
            .map(|(t, d)| -offset * keep * t + d)
            .collect();
        if c.iter().any(|&v| v != 0.0) {
            let z = ZSpec::LowRank { coef: &c };
            backend.zo_pass(t, id, key, z, 0.0, Rule::Move { to: 1.0 }, None)?;
        }
        Ok(())
    }

    pub fn virtual_coefficients(&self, id: usize) -> Option<&[f32]> {
        let a = &self.acc[id];
        (!a.is_empty()).then_some(a.as_slice())
    }

    pub fn state(&self) -> Vec<(String, Vec<f32>)> {
        self.acc
            .iter()
            .enumerate()
            .filter(|(_, a)| !a.is_empty())
            .map(|(i, a)| (format!("acc.{i}"), a.clone()))
            .collect()
    }

    pub fn load_state(&mut self, state: &mut HashMap<String, Vec<f32>>) -> Result<()> {
        for (i, slot) in self.acc.iter_mut().enumerate() {
            if !slot.is_empty() {
                *slot = super::mezo_adam::take_exact(state, &format!("acc.{i}"), slot.len())?;
            }
        }
        Ok(())
    }

    pub fn bytes(&self) -> usize {
        self.acc.iter().map(|a| a.len() * 4).sum()
    }

    pub fn clear(&mut self) {
        self.acc
            .iter_mut()
            .for_each(|a| a.iter_mut().for_each(|x| *x = 0.0));
    }
}

pub struct Tezo {
    lr: LowRank,
}

impl Tezo {
    pub fn new(cfg: &ZoConfig, shapes: &[&[usize]]) -> Self {
        Tezo {
            lr: LowRank::new(cfg, shapes),
        }
    }
}

impl<B: ZoBackend> ZoMethod<B> for Tezo {
    fn direction(&self) -> &Direction {
        &self.lr.dir
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
        let wd = decay_for(ctx.kind, cfg);
        if ctx.is_matrix {
            let tau = Factors::tau(key, ctx.id, cfg.rank);
            let delta: Vec<f32> = tau.iter().map(|x| -cfg.lr * g * x).collect();
            self.lr
                .apply(backend, t, ctx.id, key, offset, &delta, cfg.lr * wd)
        } else {
            sgd_update(backend, t, ctx.id, key, ZSpec::Dense, offset, g, cfg, wd)
        }
    }

    fn virtual_coefficients(&self, id: usize) -> Option<&[f32]> {
        self.lr.virtual_coefficients(id)
    }

    fn clear_virtual(&mut self) {
        self.lr.clear();
    }

    fn state(&self, _backend: &B) -> Result<Vec<(String, Vec<f32>)>> {
        Ok(self.lr.state())
    }

    fn state_bytes(&self) -> usize {
        self.lr.bytes()
    }

    fn load_state(&mut self, _backend: &B, mut state: HashMap<String, Vec<f32>>) -> Result<()> {
        self.lr.load_state(&mut state)?;
        if let Some(k) = state.keys().next() {
            bail!("tezo state has unexpected entry {k}");
        }
        Ok(())
    }
}
