//! Zeroth-order training: two forwards per step, weights updated in place, memory = inference.
//!
//! SPSA: g = (L(w + eps z) - L(w - eps z)) / (2 eps), then an update along z. z is regenerated
//! from Philox keys (seed, step, tensor id) whenever it is needed and never stored. Each method
//! is one file implementing `ZoMethod` over the shared machinery in `direction`.

pub mod direction;
pub mod hook;
pub mod mezo;
pub mod mezo_adam;
pub mod sparse_mezo;
pub mod tezo;
pub mod tezo_adam;

use crate::backend::cpu::CpuBackend;
use crate::backend::LinearHook;
use crate::model::{HostTensor, Llama, LlamaWeights, ParamKind};
use anyhow::{bail, Result};
use direction::{perturb_tensor, Direction, StepKey};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Mezo,
    MezoAdam,
    SparseMezo,
    Tezo,
    TezoAdam,
}

impl Method {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "mezo" | "mezo-sgd" => Method::Mezo,
            "mezo-adam" => Method::MezoAdam,
            "sparse-mezo" => Method::SparseMezo,
            "tezo" => Method::Tezo,
            "tezo-adam" => Method::TezoAdam,
            other => bail!(
                "unknown method {other:?}: expected one of mezo, mezo-adam, sparse-mezo, tezo, tezo-adam"
            ),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Mezo => "mezo",
            Method::MezoAdam => "mezo-adam",
            Method::SparseMezo => "sparse-mezo",
            Method::Tezo => "tezo",
            Method::TezoAdam => "tezo-adam",
        }
    }
}

/// How z reaches the forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Perturb {
    /// Passes over the weights: +eps z, -2 eps z, then one restore+update pass.
    Inplace,
    /// Weights are written only by the update; each parameter use adds s*eps*z on the fly.
    Fused,
}

impl Perturb {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "inplace" => Perturb::Inplace,
            "fused" => Perturb::Fused,
            other => bail!("unknown perturb mode {other:?}: expected inplace or fused"),
        })
    }
}

/// Hyperparameters of a ZO run.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ZoConfig {
    pub method: Method,
    pub perturb: Perturb,
    pub eps: f32,
    pub lr: f32,
    pub weight_decay: f32,
    /// Sparse-MeZO: fraction of each tensor that stays frozen (the largest |w|).
    pub sparsity: f32,
    /// TeZO: rank of the fixed factors.
    pub rank: usize,
    pub beta1: f32,
    pub beta2: f32,
    pub adam_eps: f32,
    pub seed: u64,
}

impl Default for ZoConfig {
    fn default() -> Self {
        ZoConfig {
            method: Method::Mezo,
            perturb: Perturb::Inplace,
            eps: 1e-3,
            lr: 1e-6,
            weight_decay: 0.0,
            sparsity: 0.8,
            rank: 8,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
            seed: 0,
        }
    }
}

impl ZoConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            bail!("eps must be a positive number, got {}", self.eps);
        }
        if !(self.lr >= 0.0 && self.lr.is_finite()) {
            bail!("learning rate must be >= 0, got {}", self.lr);
        }
        if !(0.0..1.0).contains(&self.sparsity) {
            bail!("sparsity must be in [0, 1), got {}", self.sparsity);
        }
        if self.rank == 0 {
            bail!("rank must be at least 1");
        }
        if self.weight_decay < 0.0 {
            bail!("weight decay must be >= 0, got {}", self.weight_decay);
        }
        let low_rank = matches!(self.method, Method::Tezo | Method::TezoAdam);
        if low_rank && self.perturb == Perturb::Fused && self.weight_decay > 0.0 {
            bail!(
                "weight decay is not supported with {} --perturb fused: its update stays low-rank",
                self.method.name()
            );
        }
        Ok(())
    }
}

/// What one optimizer sees of a tensor when it updates it.
pub struct TensorCtx {
    pub id: usize,
    pub kind: ParamKind,
}

/// A zeroth-order method: how z is drawn and how an estimate updates the weights.
pub trait ZoMethod: Send {
    fn direction(&self) -> &Direction;

    /// Reads whatever it needs from the initial weights (once, before step 0).
    fn prepare(&mut self, weights: &LlamaWeights) -> Result<()> {
        let _ = weights;
        Ok(())
    }

    /// Updates tensor `t`, which currently holds w0 + offset * z(key), with projected gradient
    /// `g`: the result is the updated w0, so an in-place run restores and updates in one pass.
    fn update_tensor(
        &mut self,
        t: &mut HostTensor,
        ctx: &TensorCtx,
        key: StepKey,
        offset: f32,
        g: f32,
        cfg: &ZoConfig,
    ) -> Result<()>;

    /// Low-rank coefficients that the fused forward must add to tensor `id` (virtual update),
    /// if the method keeps its update low-rank instead of writing it into the weights.
    fn virtual_coefficients(&self, id: usize) -> Option<&[f32]> {
        let _ = id;
        None
    }

    /// Forgets the virtual update after it was written into the weights.
    fn clear_virtual(&mut self) {}

    /// Optimizer state by name, for checkpoints.
    fn state(&self) -> Vec<(String, Vec<f32>)> {
        vec![]
    }

    fn load_state(&mut self, state: HashMap<String, Vec<f32>>) -> Result<()> {
        if let Some(k) = state.keys().next() {
            bail!("optimizer state has unexpected entry {k}");
        }
        Ok(())
    }

    /// Bytes of optimizer state held.
    fn state_bytes(&self) -> usize {
        self.state().iter().map(|(_, v)| v.len() * 4).sum()
    }
}

pub fn new_method(cfg: &ZoConfig, weights: &LlamaWeights) -> Result<Box<dyn ZoMethod>> {
    cfg.validate()?;
    let mut m: Box<dyn ZoMethod> = match cfg.method {
        Method::Mezo => Box::new(mezo::Mezo),
        Method::MezoAdam => Box::new(mezo_adam::MezoAdam::new(weights)),
        Method::SparseMezo => Box::new(sparse_mezo::SparseMezo::new(cfg.sparsity)),
        Method::Tezo => Box::new(tezo::Tezo::new(cfg, weights)),
        Method::TezoAdam => Box::new(tezo_adam::TezoAdam::new(cfg, weights)),
    };
    m.prepare(weights)?;
    Ok(m)
}

/// Evaluates the loss of the step's batch on a model seen through a hook.
pub type LossFn<'a> =
    dyn FnMut(&Llama<CpuBackend>, &mut dyn LinearHook<CpuBackend>) -> Result<f32> + 'a;

/// The two losses and the projected gradient of one step.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct StepResult {
    pub loss_plus: f32,
    pub loss_minus: f32,
    pub projected_grad: f32,
}

/// Kinds of every tensor in canonical order.
pub fn tensor_kinds(model: &Llama<CpuBackend>) -> Vec<ParamKind> {
    crate::model::weights::expected_tensors(&model.cfg)
        .into_iter()
        .map(|(_, _, k)| k)
        .collect()
}

/// Drives one method over a CPU model.
pub struct ZoOptimizer {
    pub cfg: ZoConfig,
    pub method: Box<dyn ZoMethod>,
    kinds: Vec<ParamKind>,
}

impl ZoOptimizer {
    pub fn new(cfg: ZoConfig, model: &Llama<CpuBackend>) -> Result<Self> {
        let method = new_method(&cfg, &model.weights)?;
        Ok(ZoOptimizer {
            cfg,
            method,
            kinds: tensor_kinds(model),
        })
    }

    pub fn key(&self, step: u64) -> StepKey {
        StepKey {
            seed: self.cfg.seed,
            step: step as u32,
        }
    }

    /// One SPSA step: two perturbed losses, then the update. `loss` evaluates the model with
    /// the given hook on the step's batch.
    pub fn step(
        &mut self,
        model: &mut Llama<CpuBackend>,
        step: u64,
        loss: &mut LossFn,
    ) -> Result<StepResult> {
        let key = self.key(step);
        let eps = self.cfg.eps;
        let (lp, lm, offset) = match self.cfg.perturb {
            Perturb::Inplace => {
                self.perturb_all(model, key, 0.0, eps);
                let lp = loss(model, &mut crate::backend::NoHook)?;
                self.perturb_all(model, key, eps, -eps);
                let lm = loss(model, &mut crate::backend::NoHook)?;
                (lp, lm, -eps)
            }
            Perturb::Fused => {
                let lp = loss(
                    model,
                    &mut hook::FusedHook::new(self, key, eps, &model.backend),
                )?;
                let lm = loss(
                    model,
                    &mut hook::FusedHook::new(self, key, -eps, &model.backend),
                )?;
                (lp, lm, 0.0)
            }
        };
        let g = (lp - lm) / (2.0 * eps);
        if !g.is_finite() {
            // Put the weights back before reporting, so the last good state survives.
            if offset != 0.0 {
                self.perturb_all(model, key, offset, 0.0);
            }
            bail!("non-finite loss at step {step}: loss(+eps) = {lp}, loss(-eps) = {lm}");
        }
        self.update_all(model, key, offset, g)?;
        Ok(StepResult {
            loss_plus: lp,
            loss_minus: lm,
            projected_grad: g,
        })
    }

    /// The hook that evaluates the current (possibly virtual) weights without perturbation.
    pub fn eval_hook<'a>(
        &'a self,
        model: &'a Llama<CpuBackend>,
    ) -> Box<dyn LinearHook<CpuBackend> + 'a> {
        match self.cfg.perturb {
            Perturb::Inplace => Box::new(crate::backend::NoHook),
            Perturb::Fused => {
                Box::new(hook::FusedHook::new(self, self.key(0), 0.0, &model.backend))
            }
        }
    }

    pub fn perturb_all(&self, model: &mut Llama<CpuBackend>, key: StepKey, from: f32, to: f32) {
        let dir = self.method.direction().clone();
        for (id, t) in model.weights.tensors_mut().into_iter().enumerate() {
            if self.method.virtual_coefficients(id).is_some() {
                continue; // low-rank virtual tensors are perturbed by the hook
            }
            perturb_tensor(t, id, key, &dir, from, to);
        }
    }

    pub fn update_all(
        &mut self,
        model: &mut Llama<CpuBackend>,
        key: StepKey,
        offset: f32,
        g: f32,
    ) -> Result<()> {
        for (id, t) in model.weights.tensors_mut().into_iter().enumerate() {
            let ctx = TensorCtx {
                id,
                kind: self.kinds[id],
            };
            self.method
                .update_tensor(t, &ctx, key, offset, g, &self.cfg)?;
        }
        Ok(())
    }

    /// Writes any virtual (low-rank) update into the weights, e.g. before saving.
    pub fn materialize(&mut self, model: &mut Llama<CpuBackend>) -> Result<()> {
        let rank = self.cfg.rank;
        for (id, t) in model.weights.tensors_mut().into_iter().enumerate() {
            if let Some(c) = self.method.virtual_coefficients(id) {
                let c = c.to_vec();
                let fac =
                    direction::Factors::generate(self.cfg.seed, id, t.shape[0], t.shape[1], rank);
                direction::low_rank_pass(t, &fac, &c, |_, w, z| w + z);
            }
        }
        self.method.clear_virtual();
        Ok(())
    }
}
