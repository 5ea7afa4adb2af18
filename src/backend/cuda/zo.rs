//! ZO passes on the device: `ZoBackend` for `CudaBackend`, the twin of the CPU implementation in
//! src/zo/passes.rs. The kernels (csrc/zo.cu) regenerate z from the same Philox keys and repeat
//! the CPU arithmetic operation for operation, so both backends write the same bits
//! (tests/cuda_parity.rs checks every pass).

use super::kernels::{self, ElemRule, ElemZ, PhiloxKey};
use super::{CudaBackend, CudaWeight, DevBuf};
use crate::backend::mem::{MemReport, Tag};
use crate::backend::{LinearHook, PairedHook, ParamId};
use crate::model::{DType, Llama, LlamaWeights};
use crate::zo::direction::{StepKey, FACTOR_U, FACTOR_V};
use crate::zo::passes::{abs_percentile, Rule, ZSpec, ZoBackend};
use crate::zo::ZoOptimizer;
use anyhow::{bail, Result};
use std::path::Path;

impl PhiloxKey {
    /// The stream of tensor `id` at a step: the element-wise z of a pass.
    pub(crate) fn of_tensor(key: StepKey, id: ParamId) -> Self {
        PhiloxKey {
            seed: key.seed,
            step: key.step,
            tensor: id as u32,
        }
    }
}

/// Passes gathered by `batch_passes`, for one Philox seed and step: element passes as jobs of
/// `zo_pass_jobs`, low-rank moves as jobs of `zo_low_rank_move_jobs`.
#[derive(Default)]
pub(crate) struct PassBatch {
    key: Option<(u64, u32)>,
    jobs: kernels::PassJobs,
    low_rank: kernels::LowRankJobs,
}

impl PassBatch {
    /// Whether a gathered pass writes the tensor at device address `w`.
    fn writes(&self, w: u64) -> bool {
        self.jobs.jobs.iter().any(|j| j.writes(w))
            || self.low_rank.jobs.jobs.iter().any(|j| j.writes(w))
    }
}

impl CudaBackend {
    fn open_batch(&self) -> std::sync::MutexGuard<'_, Option<PassBatch>> {
        self.pass_batch.lock().expect("the pass batch lock")
    }

    /// Runs the passes gathered so far, if any: one launch for the element passes and one for
    /// the low-rank moves (they write different tensors, so their order does not matter). Both
    /// run even if the first fails.
    fn flush_passes(&self) -> Result<()> {
        let (key, jobs, low_rank) = match self.open_batch().as_mut() {
            Some(b) => (
                b.key.take(),
                std::mem::take(&mut b.jobs),
                std::mem::take(&mut b.low_rank),
            ),
            None => return Ok(()),
        };
        let Some((seed, step)) = key else {
            return Ok(()); // nothing gathered
        };
        let elements = self.run_element_jobs(
            &jobs,
            PhiloxKey {
                seed,
                step,
                tensor: 0,
            },
        );
        let moves = self.run_low_rank_jobs(low_rank, seed);
        match (elements, moves) {
            (Err(e), Err(f)) => Err(anyhow::anyhow!(
                "{e:#}; the batch's low-rank moves failed too: {f:#}"
            )),
            (elements, moves) => elements.and(moves),
        }
    }

    fn run_element_jobs(&self, jobs: &kernels::PassJobs, key: PhiloxKey) -> Result<()> {
        if jobs.jobs.is_empty() {
            return Ok(()); // none, or only empty tensors
        }
        let table = self.buf_from_host(&jobs.jobs, Tag::Scratch, "a batch of ZO passes")?;
        // The table is freed stream-ordered, after the launch that reads it.
        kernels::zo_pass_jobs(&self.dev, table.ptr(), jobs.jobs.len(), jobs.blocks, key)
    }

    fn run_low_rank_jobs(&self, mut jobs: kernels::LowRankJobs, seed: u64) -> Result<()> {
        if jobs.jobs.jobs.is_empty() {
            return Ok(());
        }
        let coefficients =
            self.buf_from_host(&jobs.coefficients, Tag::Scratch, "low-rank coefficients")?;
        jobs.resolve(coefficients.ptr());
        let table = &jobs.jobs.jobs;
        let table = self.buf_from_host(table, Tag::Scratch, "a batch of low-rank moves")?;
        let at = (table.ptr(), jobs.jobs.jobs.len(), jobs.jobs.blocks);
        kernels::zo_low_rank_move_jobs(&self.dev, at, jobs.max_rank(), seed, (FACTOR_U, FACTOR_V))
    }

    /// Runs the gathered passes first if one of them writes `w`, so that a pass over `w` that
    /// cannot join the batch (a decay) comes after it; other tensors' passes wait.
    fn flush_passes_over(&self, w: &CudaWeight) -> Result<()> {
        let pending = (self.open_batch().as_ref()).is_some_and(|b| b.writes(w.ptr()));
        if pending {
            self.flush_passes()?;
        }
        Ok(())
    }

    /// Opens the way for a pass over `w` with Philox `key` to join the open batch: runs what
    /// the batch holds first if that has another seed or step, or writes `w` too. False when
    /// no batch is open.
    fn make_room_for(&self, w: &CudaWeight, key: (u64, u32)) -> Result<bool> {
        let run_first = match self.open_batch().as_ref() {
            None => return Ok(false),
            Some(b) => b.key.is_some_and(|k| k != key) || b.writes(w.ptr()),
        };
        if run_first {
            self.flush_passes()?;
        }
        Ok(true)
    }

    /// Adds an element pass to the open batch, if one is open; false when none is.
    fn gather_pass(
        &self,
        w: &CudaWeight,
        key: PhiloxKey,
        z: ElemZ,
        offset: f32,
        rule: kernels::JobRule,
    ) -> Result<bool> {
        if !self.make_room_for(w, (key.seed, key.step))? {
            return Ok(false);
        }
        let mut open = self.open_batch();
        let batch = open.as_mut().expect("the batch stays open");
        let (dtype, n) = (w.dtype, w.numel());
        batch
            .jobs
            .push(w.ptr(), dtype, n, key.tensor, z, offset, rule)?;
        batch.key = Some((key.seed, key.step));
        Ok(true)
    }

    /// Adds a low-rank move to the open batch, if one is open; false when none is.
    fn gather_low_rank_move(
        &self,
        w: &CudaWeight,
        id: ParamId,
        key: StepKey,
        coef: &[f32],
        (offset, to): (f32, f32),
    ) -> Result<bool> {
        if !self.make_room_for(w, (key.seed, key.step))? {
            return Ok(false);
        }
        let mut open = self.open_batch();
        let batch = open.as_mut().expect("the batch stays open");
        let shape = (w.shape[0], w.shape[1]);
        batch.low_rank.push(
            (w.ptr(), w.ptr()),
            w.dtype,
            shape,
            id as u32,
            coef,
            offset,
            to,
        )?;
        batch.key = Some((key.seed, key.step));
        Ok(true)
    }

    /// The low-rank pass: w <- (w - offset z) + to z with z = U diag(coef) V^T / sqrt(r).
    pub(crate) fn zo_low_rank_move(
        &self,
        w: &mut CudaWeight,
        id: ParamId,
        seed: u64,
        coef: &[f32],
        offset: f32,
        to: f32,
    ) -> Result<()> {
        self.zo_low_rank_move_into(w.ptr(), w, id, seed, coef, (offset, to))
    }

    /// The low-rank pass from `w` into the tensor at `dst` (as `w` is shaped and stored; `w`'s
    /// own address for the pass in place): dst <- (w - offset z) + to z.
    pub(crate) fn zo_low_rank_move_into(
        &self,
        dst: u64,
        w: &CudaWeight,
        id: ParamId,
        seed: u64,
        coef: &[f32],
        (offset, to): (f32, f32),
    ) -> Result<()> {
        if w.shape.len() != 2 {
            bail!("{}: a low-rank direction needs a matrix", w.name);
        }
        // Freed stream-ordered after the launch that reads it.
        let c = self.buf_from_host(coef, Tag::Scratch, "low-rank coefficients")?;
        kernels::zo_low_rank_move(
            &self.dev,
            (dst, w.ptr()),
            w.dtype,
            w.shape[0],
            w.shape[1],
            c.ptr(),
            coef.len(),
            seed,
            id as u32,
            (FACTOR_U, FACTOR_V),
            offset,
            to,
        )
    }
}

impl ZoBackend for CudaBackend {
    type State = DevBuf;

    fn max_low_rank(&self) -> Option<usize> {
        Some(kernels::LR_MAX_RANK)
    }

    fn zo_state(&self, values: &[f32]) -> Result<DevBuf> {
        self.buf_from_host(values, Tag::Optimizer, "ZO optimizer state")
    }

    fn zo_state_to_host(&self, s: &DevBuf) -> Result<Vec<f32>> {
        self.buf_to_host(s, s.bytes() / 4)
    }

    fn weight_shape(w: &CudaWeight) -> &[usize] {
        &w.shape
    }

    fn weight_dtype(w: &CudaWeight) -> DType {
        w.dtype
    }

    fn memory(&self) -> MemReport {
        self.mem().report()
    }

    fn zo_threshold(&self, w: &CudaWeight, sparsity: f32) -> Result<f32> {
        // Once per run and tensor: a host selection over the downloaded values is simple and
        // gives exactly the CPU's threshold.
        Ok(abs_percentile(self.weight_to_host(w)?, sparsity))
    }

    fn zo_pass(
        &self,
        w: &mut CudaWeight,
        id: ParamId,
        key: StepKey,
        z: ZSpec,
        offset: f32,
        rule: Rule,
        moments: Option<(&mut DevBuf, &mut DevBuf)>,
    ) -> Result<()> {
        let ez = match z {
            ZSpec::Dense => ElemZ::Dense,
            ZSpec::Sparse { threshold } => ElemZ::Sparse { threshold },
            ZSpec::LowRank { coef } => {
                let Rule::Move { to } = rule else {
                    bail!(
                        "{}: the CUDA backend runs low-rank passes with the Move rule only \
                         (got {rule:?})",
                        w.name
                    );
                };
                if w.shape.len() == 2
                    && self.gather_low_rank_move(w, id, key, coef, (offset, to))?
                {
                    return Ok(());
                }
                return self.zo_low_rank_move(w, id, key.seed, coef, offset, to);
            }
        };
        let pkey = PhiloxKey::of_tensor(key, id);
        let n = w.numel();
        let elem = |rule| -> Result<()> {
            if self.gather_pass(w, pkey, ez, offset, kernels::JobRule::Elem(rule))? {
                return Ok(());
            }
            kernels::zo_pass(&self.dev, w.ptr(), w.dtype, n, pkey, ez, offset, rule)
        };
        match (rule, moments) {
            (Rule::Move { to }, _) => elem(ElemRule::Move { to }),
            (Rule::Sgd { lr, g, wd }, _) => elem(ElemRule::Sgd { lr, g, wd }),
            (Rule::Adam(a), Some((m, v))) => {
                if m.bytes() != n * 4 || v.bytes() != n * 4 {
                    bail!(
                        "{}: Adam moments do not match the tensor ({} and {} values for {n})",
                        w.name,
                        m.bytes() / 4,
                        v.bytes() / 4
                    );
                }
                let rule = kernels::JobRule::Adam {
                    m: m.ptr(),
                    v: v.ptr(),
                    args: &a,
                };
                if self.gather_pass(w, pkey, ez, offset, rule)? {
                    return Ok(());
                }
                kernels::zo_adam_pass(
                    &self.dev,
                    w.ptr(),
                    w.dtype,
                    m.ptr(),
                    v.ptr(),
                    n,
                    pkey,
                    ez,
                    offset,
                    &a,
                )
            }
            (Rule::Adam(_), None) => bail!("{}: an Adam pass needs its moments", w.name),
        }
    }

    fn zo_decay(&self, w: &mut CudaWeight, factor: f32) -> Result<()> {
        self.flush_passes_over(w)?;
        kernels::zo_decay(&self.dev, w.ptr(), w.dtype, w.numel(), factor)
    }

    /// Gathers the passes `passes` makes and runs them when it returns (or before a decay of a
    /// tensor they write): one launch for the element passes and one for the low-rank moves,
    /// instead of one launch a tensor.
    fn batch_passes(&self, passes: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        {
            let mut open = self.open_batch();
            if open.is_some() {
                drop(open);
                return passes(); // inside another batch, which runs them
            }
            *open = Some(PassBatch::default());
        }
        let gathered = passes();
        // What was gathered runs even after an error, as it would have one pass at a time.
        let ran = self.flush_passes();
        *self.open_batch() = None;
        match (gathered, ran) {
            (Err(e), Err(f)) => Err(anyhow::anyhow!(
                "{e:#}; then the passes gathered before it failed too: {f:#}"
            )),
            (gathered, ran) => gathered.and(ran),
        }
    }

    fn fused_hook<'a>(
        opt: &'a ZoOptimizer<Self>,
        model: &'a Llama<Self>,
        key: StepKey,
        scale: f32,
    ) -> Result<Box<dyn LinearHook<Self> + 'a>> {
        let hook = super::fused::CudaFusedHook::new(opt, key, scale).with_layers(&model.weights);
        Ok(Box::new(hook))
    }

    fn paired_hook<'a>(
        opt: &'a ZoOptimizer<Self>,
        _model: &'a Llama<Self>,
        key: StepKey,
        eps: f32,
    ) -> Result<Option<Box<dyn PairedHook<Self> + 'a>>> {
        Ok(Some(Box::new(super::paired::CudaPairedHook::new(
            opt, key, eps,
        ))))
    }

    fn save_weights(&self, weights: &LlamaWeights<CudaWeight>, dir: &Path) -> Result<()> {
        weights
            .try_map(|_, w| self.weight_to_host_tensor(w))?
            .save(dir)
    }
}
