//! MeZO-Adam: Adam on the estimate g z with full first and second moments per weight. The
//! memory-hungry baseline (two extra copies of the model) that the others are measured against.

use super::direction::{Direction, StepKey};
use super::mezo::decay_for;
use super::passes::{AdamArgs, Rule, ZSpec, ZoBackend};
use super::{TensorCtx, ZoConfig, ZoMethod};
use anyhow::{bail, Result};
use std::collections::HashMap;

/// Per-element Adam moments of some tensors (None for the others), resident on the backend.
/// Saved as `m.{id}` and `v.{id}`.
pub struct ElemMoments<S> {
    moments: Vec<Option<(S, S)>>,
    lens: Vec<usize>,
}

impl<S> ElemMoments<S> {
    /// Zero moments of `lens[id]` elements for every tensor with a non-zero length.
    pub fn zeros<B: ZoBackend<State = S>>(backend: &B, lens: Vec<usize>) -> Result<Self> {
        let moments = lens
            .iter()
            .map(|&n| {
                if n == 0 {
                    return Ok(None);
                }
                let zeros = vec![0.0f32; n];
                Ok(Some((backend.zo_state(&zeros)?, backend.zo_state(&zeros)?)))
            })
            .collect::<Result<_>>()?;
        Ok(ElemMoments { moments, lens })
    }

    pub fn get_mut(&mut self, id: usize) -> Option<(&mut S, &mut S)> {
        self.moments[id].as_mut().map(|(m, v)| (m, v))
    }

    pub fn bytes(&self) -> usize {
        self.lens.iter().sum::<usize>() * 2 * 4
    }

    pub fn state<B: ZoBackend<State = S>>(&self, backend: &B) -> Result<Vec<(String, Vec<f32>)>> {
        let mut out = Vec::new();
        for (id, mv) in self.moments.iter().enumerate() {
            if let Some((m, v)) = mv {
                out.push((format!("m.{id}"), backend.zo_state_to_host(m)?));
                out.push((format!("v.{id}"), backend.zo_state_to_host(v)?));
            }
        }
        Ok(out)
    }

    /// Takes this set's entries out of saved state, checking every length.
    pub fn load<B: ZoBackend<State = S>>(
        &mut self,
        backend: &B,
        state: &mut HashMap<String, Vec<f32>>,
    ) -> Result<()> {
        for (id, slot) in self.moments.iter_mut().enumerate() {
            if slot.is_none() {
                continue;
            }
            let m = take_exact(state, &format!("m.{id}"), self.lens[id])?;
            let v = take_exact(state, &format!("v.{id}"), self.lens[id])?;
            *slot = Some((backend.zo_state(&m)?, backend.zo_state(&v)?));
        }
        Ok(())
    }
}

/// Removes entry `name` from saved state, which must hold `len` values.
pub fn take_exact(
    state: &mut HashMap<String, Vec<f32>>,
    name: &str,
    len: usize,
) -> Result<Vec<f32>> {
    match state.remove(name) {
        Some(v) if v.len() == len => Ok(v),
        Some(v) => bail!(
            "optimizer state {name} has {} values, expected {len}",
            v.len()
        ),
        None => bail!("optimizer state has no {name}"),
    }
}

/// Bias-corrected Adam step sizes for step index `step` (0-based).
pub fn adam_corrections(cfg: &ZoConfig, step: u32) -> (f32, f32) {
    let t = step as i32 + 1;
    (1.0 - cfg.beta1.powi(t), 1.0 - cfg.beta2.powi(t))
}

/// The Adam rule of one step for projected gradient `g`.
pub fn adam_rule(cfg: &ZoConfig, step: u32, g: f32, wd: f32) -> Rule {
    let (c1, c2) = adam_corrections(cfg, step);
    Rule::Adam(AdamArgs {
        g,
        lr: cfg.lr,
        wd,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        c1,
        c2,
        eps: cfg.adam_eps,
    })
}

pub struct MezoAdam<S> {
    moments: ElemMoments<S>,
}

const DENSE: Direction = Direction::Dense;

impl<S> MezoAdam<S> {
    pub fn new<B: ZoBackend<State = S>>(backend: &B, shapes: &[&[usize]]) -> Result<Self> {
        let lens = shapes.iter().map(|s| s.iter().product()).collect();
        Ok(MezoAdam {
            moments: ElemMoments::zeros(backend, lens)?,
        })
    }
}

impl<B: ZoBackend> ZoMethod<B> for MezoAdam<B::State> {
    fn direction(&self) -> &Direction {
        &DENSE
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
        let rule = adam_rule(cfg, key.step, g, decay_for(ctx.kind, cfg));
        let mv = self.moments.get_mut(ctx.id);
        backend.zo_pass(t, ctx.id, key, ZSpec::Dense, offset, rule, mv)
    }

    fn state(&self, backend: &B) -> Result<Vec<(String, Vec<f32>)>> {
        self.moments.state(backend)
    }

    fn load_state(&mut self, backend: &B, mut state: HashMap<String, Vec<f32>>) -> Result<()> {
        self.moments.load(backend, &mut state)?;
        if let Some(k) = state.keys().next() {
            bail!("mezo-adam state has unexpected entry {k}");
        }
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        self.moments.bytes()
    }
}
