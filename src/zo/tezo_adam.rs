//! TeZO-Adam: Adam whose moments live on the r-vectors of each matrix (the gradient estimate
//! in tau coordinates is g * tau), so the optimizer state is tiny; vectors (norms) keep
//! elementwise moments, which are small too.

use super::direction::{Direction, Factors, StepKey};
use super::mezo::decay_for;
use super::mezo_adam::{adam_corrections, adam_rule, take_exact, ElemMoments};
use super::passes::{ZSpec, ZoBackend};
use super::tezo::LowRank;
use super::{TensorCtx, ZoConfig, ZoMethod};
use anyhow::{bail, Result};
use std::collections::HashMap;

pub struct TezoAdam<S> {
    lr: LowRank,
    /// Per matrix: r first and second moments on the host (empty for vectors).
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Per vector: elementwise moments on the backend.
    elem: ElemMoments<S>,
}

impl<S> TezoAdam<S> {
    pub fn new<B: ZoBackend<State = S>>(
        cfg: &ZoConfig,
        backend: &B,
        shapes: &[&[usize]],
    ) -> Result<Self> {
        let rank_len = |s: &&[usize]| if s.len() == 2 { cfg.rank } else { 0 };
        let elem_len = |s: &&[usize]| if s.len() == 2 { 0 } else { s.iter().product() };
        Ok(TezoAdam {
            lr: LowRank::new(cfg, shapes),
            m: shapes.iter().map(|s| vec![0.0; rank_len(s)]).collect(),
            v: shapes.iter().map(|s| vec![0.0; rank_len(s)]).collect(),
            elem: ElemMoments::zeros(backend, shapes.iter().map(elem_len).collect())?,
        })
    }
}

impl<B: ZoBackend> ZoMethod<B> for TezoAdam<B::State> {
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
        if !ctx.is_matrix {
            let rule = adam_rule(cfg, key.step, g, wd);
            let mv = self.elem.get_mut(ctx.id);
            return backend.zo_pass(t, ctx.id, key, ZSpec::Dense, offset, rule, mv);
        }
        let (m, v) = (&mut self.m[ctx.id], &mut self.v[ctx.id]);
        let tau = Factors::tau(key, ctx.id, cfg.rank);
        let (c1, c2) = adam_corrections(cfg, key.step);
        let mut delta = vec![0.0f32; cfg.rank];
        for k in 0..cfg.rank {
            let ge = g * tau[k];
            m[k] = cfg.beta1 * m[k] + (1.0 - cfg.beta1) * ge;
            v[k] = cfg.beta2 * v[k] + (1.0 - cfg.beta2) * ge * ge;
            delta[k] = -cfg.lr * (m[k] / c1) / ((v[k] / c2).sqrt() + cfg.adam_eps);
        }
        self.lr
            .apply(backend, t, ctx.id, key, offset, &delta, cfg.lr * wd)
    }

    fn virtual_coefficients(&self, id: usize) -> Option<&[f32]> {
        self.lr.virtual_coefficients(id)
    }

    fn clear_virtual(&mut self) {
        self.lr.clear();
    }

    fn state(&self, backend: &B) -> Result<Vec<(String, Vec<f32>)>> {
        let mut s = self.elem.state(backend)?;
        for (id, (m, v)) in self.m.iter().zip(&self.v).enumerate() {
            if !m.is_empty() {
                s.push((format!("m.{id}"), m.clone()));
                s.push((format!("v.{id}"), v.clone()));
            }
        }
        s.extend(self.lr.state());
        Ok(s)
    }

    fn load_state(&mut self, backend: &B, mut state: HashMap<String, Vec<f32>>) -> Result<()> {
        self.elem.load(backend, &mut state)?;
        for (id, (m, v)) in self.m.iter_mut().zip(&mut self.v).enumerate() {
            if !m.is_empty() {
                *m = take_exact(&mut state, &format!("m.{id}"), m.len())?;
                *v = take_exact(&mut state, &format!("v.{id}"), v.len())?;
            }
        }
        self.lr.load_state(&mut state)?;
        if let Some(k) = state.keys().next() {
            bail!("tezo-adam state has unexpected entry {k}");
        }
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        let rank_moments: usize = self.m.iter().map(|m| m.len() * 2 * 4).sum();
        self.elem.bytes() + rank_moments + self.lr.bytes()
    }
}
