//! Zeroth-order training: two forwards per step, weights updated in place, memory = inference.
//!
//! SPSA: g = (L(w + eps z) - L(w - eps z)) / (2 eps), then an update along z. z is regenerated
//! from Philox keys (seed, step, tensor id) whenever it is needed and never stored. Each method
//! is one file implementing `ZoMethod` over the shared machinery in `direction`.

pub mod direction;
pub mod hook;
pub mod mezo;
pub mod mezo_adam;
pub mod paired;
pub mod passes;
pub mod sparse_mezo;
pub mod tezo;
pub mod tezo_adam;

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, LinearHook, PairedHook};
use crate::model::{DType, Llama, LlamaWeights, ParamKind};
use anyhow::{bail, Result};
use direction::{perturb_tensor, Direction, StepKey};
use passes::{Rule, ZSpec, ZoBackend};
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

    /// Whether the method can run with `--perturb inplace`. Sparse-MeZO cannot: once an
    /// element has moved to w0 + eps z, whether it belongs to the mask (|w0| <= h) can no longer
    /// be read off the weights, since an element that stayed at w0 = x outside the mask and one
    /// inside it that moved from x - eps z both hold x. Telling them apart takes a stored bit
    /// per weight; the fused mode never perturbs the weights, so it reads the mask off the true
    /// w0 and stores nothing.
    pub fn runs_in_place(self) -> bool {
        self != Method::SparseMezo
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
    /// Fused, with the two forwards run in lockstep a block at a time, so that z is drawn
    /// once for both: the first stream builds the second's perturbed weights beside its own
    /// (see `zo::paired`). The same losses and weights as `Fused`, for a second residual
    /// stream and one layer's matrices of memory. An objective without a paired form (or a
    /// backend without a paired hook) runs it as `Fused`.
    Paired,
}

impl Perturb {
    pub fn name(self) -> &'static str {
        match self {
            Perturb::Inplace => "inplace",
            Perturb::Fused => "fused",
            Perturb::Paired => "paired",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "inplace" => Perturb::Inplace,
            "fused" => Perturb::Fused,
            "paired" => Perturb::Paired,
            other => bail!("unknown perturb mode {other:?}: expected inplace, fused or paired"),
        })
    }

    /// Whether the weights are written only by the update (the fused modes).
    pub fn is_fused(self) -> bool {
        self != Perturb::Inplace
    }

    /// `--perturb`: "inplace", "fused", "paired", or "auto" (None), which `Perturb::auto`
    /// resolves once the weights are loaded.
    pub fn parse_or_auto(s: &str) -> Result<Option<Self>> {
        match s {
            "auto" => Ok(None),
            other => Self::parse(other)
                .map_err(|_| {
                    anyhow::anyhow!(
                        "unknown perturb mode {other:?}: expected inplace, fused, paired or auto"
                    )
                })
                .map(Some),
        }
    }

    /// In place where `method` can run so, fused otherwise: a mode every method accepts, for
    /// when the weights that `auto` looks at are not loaded yet.
    pub fn in_place_if_allowed(method: Method) -> Self {
        if method.runs_in_place() {
            Perturb::Inplace
        } else {
            Perturb::Fused
        }
    }

    /// The mode for `cfg` on these weights and this backend: in place when every tensor is
    /// stored in f32, where the round trip +eps z, -2 eps z, +eps z stays within an ulp and in
    /// place is as fast or faster with the lower peak; fused otherwise, because through bf16
    /// storage the round trip drifts (tests/zo.rs measures it) and the fused mode never writes
    /// a perturbation. Every method also goes fused where the backend builds the perturbed
    /// weights inside its GEMM (dense z and TeZO's low-rank z alike): there fused measured
    /// faster than in place (tools/bench/results/README.md). TeZO with weight decay stays in
    /// place, the one mode that can apply it. Sparse-MeZO is always fused: in place it would
    /// have to store its mask (see `Method::runs_in_place`).
    pub fn auto<B: ZoBackend>(
        cfg: &ZoConfig,
        backend: &B,
        weights: &LlamaWeights<B::Weight>,
    ) -> Self {
        let all_f32 = weights
            .tensors()
            .into_iter()
            .all(|t| B::weight_dtype(t) == DType::F32);
        let in_place = all_f32 && !backend.fused_builds_weights_in_gemm();
        if !cfg.method.runs_in_place() {
            Perturb::Fused
        } else if in_place || cfg.decay_needs_inplace() {
            Perturb::Inplace
        } else {
            Perturb::Fused
        }
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
    /// Whether weight decay needs the in-place mode: TeZO's fused update stays low-rank, and
    /// decay is not low-rank.
    pub fn decay_needs_inplace(&self) -> bool {
        matches!(self.method, Method::Tezo | Method::TezoAdam) && self.weight_decay > 0.0
    }

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
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            bail!("weight decay must be >= 0, got {}", self.weight_decay);
        }
        if !((0.0..1.0).contains(&self.beta1) && (0.0..1.0).contains(&self.beta2)) {
            bail!(
                "Adam's beta1 and beta2 must be in [0, 1), got {} and {}",
                self.beta1,
                self.beta2
            );
        }
        if !(self.adam_eps > 0.0 && self.adam_eps.is_finite()) {
            bail!(
                "Adam's eps must be a positive number, got {}",
                self.adam_eps
            );
        }
        if self.perturb == Perturb::Inplace && !self.method.runs_in_place() {
            bail!(
                "sparse-mezo runs only with --perturb fused (or auto): in place, its mask \
                 could not be recomputed from the perturbed weights without storing it"
            );
        }
        if self.perturb.is_fused() && self.decay_needs_inplace() {
            bail!(
                "weight decay is not supported with {} --perturb {}: its update stays low-rank \
                 (use --perturb inplace)",
                self.method.name(),
                self.perturb.name()
            );
        }
        Ok(())
    }
}

/// What one optimizer sees of a tensor when it updates it.
pub struct TensorCtx {
    pub id: usize,
    pub kind: ParamKind,
    /// A 2-D weight (low-rank directions apply); vectors are the norm gains.
    pub is_matrix: bool,
}

/// A zeroth-order method: how z is drawn and how an estimate updates the weights. Methods
/// keep their optimizer state on the backend `B` that holds the weights.
pub trait ZoMethod<B: ZoBackend> {
    fn direction(&self) -> &Direction;

    /// Updates tensor `t`, which currently holds w0 + offset * z(key), with projected gradient
    /// `g`: the result is the updated w0, so an in-place run restores and updates in one pass.
    #[allow(clippy::too_many_arguments)]
    fn update_tensor(
        &mut self,
        backend: &B,
        t: &mut B::Weight,
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

    /// Optimizer state by name, on the host, for checkpoints.
    fn state(&self, backend: &B) -> Result<Vec<(String, Vec<f32>)>> {
        let _ = backend;
        Ok(vec![])
    }

    fn load_state(&mut self, backend: &B, state: HashMap<String, Vec<f32>>) -> Result<()> {
        let _ = backend;
        if let Some(k) = state.keys().next() {
            bail!("optimizer state has unexpected entry {k}");
        }
        Ok(())
    }

    /// Bytes of optimizer state held.
    fn state_bytes(&self) -> usize {
        0
    }
}

pub fn new_method<B: ZoBackend + 'static>(
    cfg: &ZoConfig,
    backend: &B,
    weights: &LlamaWeights<B::Weight>,
) -> Result<Box<dyn ZoMethod<B>>> {
    cfg.validate()?;
    if let (Method::Tezo | Method::TezoAdam, Some(max)) = (cfg.method, backend.max_low_rank()) {
        if cfg.rank > max {
            bail!(
                "rank {} is above {max}, the largest this backend's low-rank pass takes",
                cfg.rank
            );
        }
    }
    let shapes: Vec<&[usize]> = weights.tensors().into_iter().map(B::weight_shape).collect();
    Ok(match cfg.method {
        Method::Mezo => Box::new(mezo::Mezo),
        Method::MezoAdam => Box::new(mezo_adam::MezoAdam::new(backend, &shapes)?),
        Method::SparseMezo => Box::new(sparse_mezo::SparseMezo::new(
            backend,
            weights,
            cfg.sparsity,
        )?),
        Method::Tezo => Box::new(tezo::Tezo::new(cfg, &shapes)),
        Method::TezoAdam => Box::new(tezo_adam::TezoAdam::new(cfg, backend, &shapes)?),
    })
}

/// Evaluates the loss of the step's batch on a model seen through a hook.
pub type LossFn<'a, B = CpuBackend> =
    dyn FnMut(&Llama<B>, &mut dyn LinearHook<B>) -> Result<f32> + 'a;

/// What a step minimizes: the loss of the step's batch on the model seen through a hook, and,
/// where the objective can run one, both losses of a paired forward.
pub trait Objective<B: Backend> {
    fn loss(&mut self, model: &Llama<B>, hook: &mut dyn LinearHook<B>) -> Result<f32>;

    /// The losses of the batch through streams 0 and 1 of `hook`, from one paired forward
    /// (`Llama::hidden_paired`); `None` where this objective has no paired form, which makes
    /// a paired step run its two forwards one after the other.
    fn paired_losses(
        &mut self,
        model: &Llama<B>,
        hook: &mut dyn PairedHook<B>,
    ) -> Option<Result<[f32; 2]>> {
        let _ = (model, hook);
        None
    }
}

/// A loss closure as an objective without a paired form.
struct ClosureObjective<'l, 'a, B: Backend>(&'l mut LossFn<'a, B>);

impl<B: Backend> Objective<B> for ClosureObjective<'_, '_, B> {
    fn loss(&mut self, model: &Llama<B>, hook: &mut dyn LinearHook<B>) -> Result<f32> {
        (self.0)(model, hook)
    }
}

/// The two losses and the projected gradient of one step.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct StepResult {
    pub loss_plus: f32,
    pub loss_minus: f32,
    pub projected_grad: f32,
}

/// Kinds of every tensor in canonical order.
pub fn tensor_kinds<B: ZoBackend>(model: &Llama<B>) -> Vec<ParamKind> {
    crate::model::weights::expected_tensors(&model.cfg)
        .into_iter()
        .map(|(_, _, k)| k)
        .collect()
}

/// How the z of tensor `id` is drawn element by element (dense or sparse) under `dir`.
pub fn elem_spec(dir: &Direction, id: usize) -> ZSpec<'static> {
    match dir {
        Direction::Sparse { thresholds } => ZSpec::Sparse {
            threshold: thresholds[id],
        },
        Direction::Dense | Direction::LowRank { .. } => ZSpec::Dense,
    }
}

/// Drives one method over a model on backend `B`.
pub struct ZoOptimizer<B: ZoBackend = CpuBackend> {
    pub cfg: ZoConfig,
    pub method: Box<dyn ZoMethod<B>>,
    kinds: Vec<ParamKind>,
}

impl<B: ZoBackend + 'static> ZoOptimizer<B> {
    pub fn new(cfg: ZoConfig, model: &Llama<B>) -> Result<Self> {
        let method = new_method(&cfg, &model.backend, &model.weights)?;
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
        model: &mut Llama<B>,
        step: u64,
        loss: &mut LossFn<B>,
    ) -> Result<StepResult> {
        self.step_objective(model, step, &mut ClosureObjective(loss))
    }

    /// `step` on an objective, which may run both perturbed forwards as one paired forward.
    pub fn step_objective(
        &mut self,
        model: &mut Llama<B>,
        step: u64,
        objective: &mut dyn Objective<B>,
    ) -> Result<StepResult> {
        let key = self.key(step);
        let eps = self.cfg.eps;
        let (lp, lm, offset) = match self.cfg.perturb {
            Perturb::Inplace => {
                self.perturb_all(model, key, 0.0, eps)?;
                let lp = objective.loss(model, &mut crate::backend::NoHook);
                let lp = self.restore_on_error(model, key, eps, lp)?;
                self.perturb_all(model, key, eps, -eps)?;
                let lm = objective.loss(model, &mut crate::backend::NoHook);
                let lm = self.restore_on_error(model, key, -eps, lm)?;
                (lp, lm, -eps)
            }
            Perturb::Fused | Perturb::Paired => {
                // One paired forward where the mode, the backend and the objective allow it.
                let paired = match self.cfg.perturb {
                    Perturb::Paired => match B::paired_hook(self, model, key, eps)? {
                        Some(mut hook) => objective.paired_losses(model, &mut *hook),
                        None => None,
                    },
                    _ => None,
                };
                let [lp, lm] = match paired {
                    Some(losses) => losses?,
                    None => [
                        objective.loss(model, &mut *B::fused_hook(self, model, key, eps)?)?,
                        objective.loss(model, &mut *B::fused_hook(self, model, key, -eps)?)?,
                    ],
                };
                (lp, lm, 0.0)
            }
        };
        let g = (lp - lm) / (2.0 * eps);
        if !g.is_finite() {
            // Put the weights back before reporting, so the last good state survives.
            if offset != 0.0 {
                self.perturb_all(model, key, offset, 0.0)?;
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

    /// A failed perturbed forward leaves the weights at w0 + offset z: restore them first.
    fn restore_on_error(
        &self,
        model: &mut Llama<B>,
        key: StepKey,
        offset: f32,
        loss: Result<f32>,
    ) -> Result<f32> {
        if loss.is_err() {
            self.perturb_all(model, key, offset, 0.0)?;
        }
        loss
    }

    /// The hook that evaluates the current (possibly virtual) weights without perturbation.
    pub fn eval_hook<'a>(&'a self, model: &'a Llama<B>) -> Result<Box<dyn LinearHook<B> + 'a>> {
        match self.cfg.perturb {
            Perturb::Inplace => Ok(Box::new(crate::backend::NoHook)),
            Perturb::Fused | Perturb::Paired => B::fused_hook(self, model, self.key(0), 0.0),
        }
    }

    /// Moves every tensor (except virtual low-rank ones) from w0 + from z to w0 + to z.
    pub fn perturb_all(
        &self,
        model: &mut Llama<B>,
        key: StepKey,
        from: f32,
        to: f32,
    ) -> Result<()> {
        let dir = self.method.direction();
        let backend = &model.backend;
        let weights = &mut model.weights;
        backend.batch_passes(&mut || {
            for (id, t) in weights.tensors_mut().into_iter().enumerate() {
                if self.method.virtual_coefficients(id).is_some() {
                    continue; // low-rank virtual tensors are perturbed by the hook
                }
                perturb_tensor(backend, t, id, key, dir, from, to)?;
            }
            Ok(())
        })
    }

    pub fn update_all(
        &mut self,
        model: &mut Llama<B>,
        key: StepKey,
        offset: f32,
        g: f32,
    ) -> Result<()> {
        let backend = &model.backend;
        let weights = &mut model.weights;
        backend.batch_passes(&mut || {
            for (id, t) in weights.tensors_mut().into_iter().enumerate() {
                let ctx = TensorCtx {
                    id,
                    kind: self.kinds[id],
                    is_matrix: B::weight_shape(t).len() == 2,
                };
                self.method
                    .update_tensor(backend, t, &ctx, key, offset, g, &self.cfg)?;
            }
            Ok(())
        })
    }

    /// Writes any virtual (low-rank) update into the weights, e.g. before saving.
    pub fn materialize(&mut self, model: &mut Llama<B>) -> Result<()> {
        let backend = &model.backend;
        let key = self.key(0);
        for (id, t) in model.weights.tensors_mut().into_iter().enumerate() {
            if let Some(c) = self.method.virtual_coefficients(id) {
                // Nothing to add; skipped, since a pass would turn a -0 weight into +0 (an
                // IEEE sum of zeros of either sign is +0 unless both are -0).
                if c.iter().all(|&x| x == 0.0) {
                    continue;
                }
                let z = ZSpec::LowRank { coef: c };
                backend.zo_pass(t, id, key, z, 0.0, Rule::Move { to: 1.0 }, None)?;
            }
        }
        self.method.clear_virtual();
        Ok(())
    }
}
