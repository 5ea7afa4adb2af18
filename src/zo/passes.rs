//! The seam between the ZO methods and the device that holds the weights. A method decides, per
//! tensor and step, where z comes from (`ZSpec`) and what to write (`Rule`); the backend runs
//! that as one pass over the tensor. The CPU implementation below is the oracle; the CUDA one
//! (src/backend/cuda/zo.rs) mirrors its arithmetic operation for operation.

use super::direction::{StepKey, TensorZ};
use crate::backend::cpu::{CpuAct, CpuBackend};
use crate::backend::mem::{MemReport, Tag};
use crate::backend::{Backend, LinearHook, PairedHook, ParamId};
use crate::model::{DType, HostTensor, Llama, LlamaWeights};
use anyhow::{bail, Result};
use std::path::Path;

/// Where the z of one tensor comes from in a pass.
#[derive(Clone, Copy, Debug)]
pub enum ZSpec<'a> {
    /// z = normal(seed, step, id), element index as counter.
    Dense,
    /// The dense z, zeroed where the unperturbed |w0| > threshold. A pass from a nonzero
    /// offset takes an element to be perturbed when |w - offset z| <= threshold, which misreads
    /// an unperturbed element within |offset z| above the threshold: the optimizer passes
    /// Sparse-MeZO's tensors only from offset 0 (it runs fused).
    Sparse { threshold: f32 },
    /// Z = U diag(coef) V^T / sqrt(r) with the run's fixed factors of this matrix,
    /// r = coef.len().
    LowRank { coef: &'a [f32] },
}

/// Adam hyperparameters of one update pass; c1, c2 are the bias corrections of this step.
#[derive(Clone, Copy, Debug)]
pub struct AdamArgs {
    pub g: f32,
    pub lr: f32,
    pub wd: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub c1: f32,
    pub c2: f32,
    pub eps: f32,
}

/// What a pass writes for each element, given the unperturbed weight w0 and its z.
#[derive(Clone, Copy, Debug)]
pub enum Rule {
    /// w0 + to * z.
    Move { to: f32 },
    /// w0 - lr (g z + wd w0); elements with z == 0 (outside a sparse mask) stay at w0.
    Sgd { lr: f32, g: f32, wd: f32 },
    /// AdamW on the estimate g z, with per-element moments passed to the pass; a zero step
    /// leaves w0 as it is.
    Adam(AdamArgs),
}

impl Rule {
    /// The new weight (the CPU definition every backend reproduces bit for bit).
    #[inline(always)]
    pub fn apply(self, w0: f32, z: f32, moments: Option<(&mut f32, &mut f32)>) -> f32 {
        match self {
            Rule::Move { to } => w0 + to * z,
            Rule::Sgd { lr, g, wd } => {
                if z == 0.0 {
                    w0
                } else {
                    w0 - lr * (g * z + wd * w0)
                }
            }
            Rule::Adam(a) => {
                let (m, v) = moments.expect("an Adam pass needs its moments");
                let ge = a.g * z;
                *m = a.beta1 * *m + (1.0 - a.beta1) * ge;
                *v = a.beta2 * *v + (1.0 - a.beta2) * ge * ge;
                let step = a.lr * ((*m / a.c1) / ((*v / a.c2).sqrt() + a.eps) + a.wd * w0);
                // A zero step (lr 0) keeps w0's bits: w0 - step would turn -0 into +0.
                if step == 0.0 {
                    w0
                } else {
                    w0 - step
                }
            }
        }
    }
}

/// A backend that can run ZO passes over its own weights.
pub trait ZoBackend: Backend {
    /// Per-element optimizer state (Adam moments), f32, accounted as optimizer memory.
    type State;

    /// The largest TeZO rank this backend's low-rank pass takes, if it has a limit.
    fn max_low_rank(&self) -> Option<usize> {
        None
    }

    /// Whether a fused forward builds each perturbed weight inside the GEMM, as the GEMM packs
    /// it, so that no perturbed copy is written (the CPU with bf16 GEMMs).
    fn fused_builds_weights_in_gemm(&self) -> bool {
        false
    }

    /// A state vector holding `values`.
    fn zo_state(&self, values: &[f32]) -> Result<Self::State>;
    fn zo_state_to_host(&self, s: &Self::State) -> Result<Vec<f32>>;
    fn weight_shape(w: &Self::Weight) -> &[usize];
    /// The tensor's storage dtype.
    fn weight_dtype(w: &Self::Weight) -> DType;
    /// Current and peak memory by tag of this backend's tracked allocations.
    fn memory(&self) -> MemReport;

    /// The value under which a fraction (1 - sparsity) of |w| lies.
    fn zo_threshold(&self, w: &Self::Weight, sparsity: f32) -> Result<f32>;

    /// One pass over `w`, which currently holds w0 + offset * z: writes `rule(w0, z)`.
    /// `moments` is required by `Rule::Adam` and ignored otherwise.
    #[allow(clippy::too_many_arguments)]
    fn zo_pass(
        &self,
        w: &mut Self::Weight,
        id: ParamId,
        key: StepKey,
        z: ZSpec,
        offset: f32,
        rule: Rule,
        moments: Option<(&mut Self::State, &mut Self::State)>,
    ) -> Result<()>;

    /// w <- w - factor * w (decoupled weight decay of a low-rank step written in place).
    fn zo_decay(&self, w: &mut Self::Weight, factor: f32) -> Result<()>;

    /// Runs `passes`, whose `zo_pass` calls this backend may gather and run together when it
    /// returns (the CUDA backend: every tensor's element pass in one launch and every matrix's
    /// low-rank move in another), so nothing inside may read back a tensor that a pass inside
    /// writes. By default they run as called.
    fn batch_passes(&self, passes: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        passes()
    }

    /// The hook of `--perturb fused` on this backend: every parameter use sees w + scale z.
    fn fused_hook<'a>(
        opt: &'a super::ZoOptimizer<Self>,
        model: &'a Llama<Self>,
        key: StepKey,
        scale: f32,
    ) -> Result<Box<dyn LinearHook<Self> + 'a>>;

    /// The hook of `--perturb paired` on this backend: stream 0 sees w + eps z and stream 1
    /// w - eps z, in one lockstep forward. `None` where the backend has none (the step then
    /// runs two fused forwards).
    fn paired_hook<'a>(
        opt: &'a super::ZoOptimizer<Self>,
        model: &'a Llama<Self>,
        key: StepKey,
        eps: f32,
    ) -> Result<Option<Box<dyn PairedHook<Self> + 'a>>> {
        let _ = (opt, model, key, eps);
        Ok(None)
    }

    /// Writes the weights as an HF-layout model.safetensors in `dir`.
    fn save_weights(&self, weights: &LlamaWeights<Self::Weight>, dir: &Path) -> Result<()>;
}

/// The value under which a fraction (1 - sparsity) of |w| lies.
pub fn abs_percentile(values: Vec<f32>, sparsity: f32) -> f32 {
    let mut a: Vec<f32> = values.into_iter().map(f32::abs).collect();
    let n = a.len();
    let keep = (((1.0 - sparsity as f64) * n as f64).round() as usize).clamp(1, n);
    let (_, h, _) = a.select_nth_unstable_by(keep - 1, f32::total_cmp);
    *h
}

impl ZoBackend for CpuBackend {
    /// Accounted under `Tag::Optimizer`.
    type State = CpuAct;

    fn fused_builds_weights_in_gemm(&self) -> bool {
        self.packs_weight_tiles()
    }

    fn zo_state(&self, values: &[f32]) -> Result<CpuAct> {
        self.from_host(values, 1, values.len(), Tag::Optimizer)
    }

    fn zo_state_to_host(&self, s: &CpuAct) -> Result<Vec<f32>> {
        Ok(s.data.clone())
    }

    fn weight_shape(w: &HostTensor) -> &[usize] {
        &w.shape
    }

    fn weight_dtype(w: &HostTensor) -> DType {
        w.dtype
    }

    fn memory(&self) -> MemReport {
        self.mem.report()
    }

    fn zo_threshold(&self, w: &HostTensor, sparsity: f32) -> Result<f32> {
        Ok(abs_percentile(w.to_f32_vec(), sparsity))
    }

    fn zo_pass(
        &self,
        w: &mut HostTensor,
        id: ParamId,
        key: StepKey,
        z: ZSpec,
        offset: f32,
        rule: Rule,
        moments: Option<(&mut CpuAct, &mut CpuAct)>,
    ) -> Result<()> {
        let tz = TensorZ::from_spec(w, id, key, z)?;
        let moments = match (rule, moments) {
            (Rule::Adam(_), Some((m, v))) => {
                if m.data.len() != w.numel() || v.data.len() != w.numel() {
                    bail!("{}: Adam moments do not match the tensor", w.name);
                }
                Some((&mut m.data[..], &mut v.data[..]))
            }
            (Rule::Adam(_), None) => bail!("{}: an Adam pass needs its moments", w.name),
            _ => None,
        };
        tz.pass(w, offset, rule, moments);
        Ok(())
    }

    fn zo_decay(&self, w: &mut HostTensor, factor: f32) -> Result<()> {
        super::direction::for_each_chunk(w, |_, w| w.iter_mut().for_each(|x| *x -= factor * *x));
        Ok(())
    }

    fn fused_hook<'a>(
        opt: &'a super::ZoOptimizer<Self>,
        model: &'a Llama<Self>,
        key: StepKey,
        scale: f32,
    ) -> Result<Box<dyn LinearHook<Self> + 'a>> {
        Ok(Box::new(super::hook::FusedHook::new(
            opt,
            key,
            scale,
            &model.backend,
        )))
    }

    fn paired_hook<'a>(
        opt: &'a super::ZoOptimizer<Self>,
        model: &'a Llama<Self>,
        key: StepKey,
        eps: f32,
    ) -> Result<Option<Box<dyn PairedHook<Self> + 'a>>> {
        Ok(Some(Box::new(super::paired::PairedFusedHook::new(
            opt,
            key,
            eps,
            &model.backend,
        ))))
    }

    fn save_weights(&self, weights: &LlamaWeights<HostTensor>, dir: &Path) -> Result<()> {
        weights.save(dir)
    }
}
