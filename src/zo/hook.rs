//! The fused perturbation: weights stay as the update left them and every parameter use sees
//! w + scale * z (plus any virtual low-rank update), built on the fly. Restore is exact by
//! construction because nothing is ever subtracted back.
//!
//! Scratch stays at one layer's largest matrix: with bf16 GEMMs each tile of a linear layer's
//! perturbed weight is built as the GEMM packs it (low-rank z included); with f32 GEMMs a
//! linear layer gets a perturbed copy of its weight (or, for low-rank z, a side product beside
//! the GEMM). The embedding perturbs only the rows it gathers, and the LM head is perturbed
//! and applied a block of vocabulary rows at a time.

use super::direction::{Direction, Factors, StepKey, TensorZ};
use super::passes::{Rule, ZSpec, ZoBackend};
use super::{elem_spec, ZoOptimizer};
use crate::backend::cpu::gemm_bf16::WeightRows;
use crate::backend::cpu::head::{self, HeadBlocks, HEAD_BLOCK_ROWS};
use crate::backend::cpu::{CpuAct, CpuBackend};
use crate::backend::mem::{MemCounters, Tag};
use crate::backend::{Backend, LinearHook, ParamId};
use crate::model::HostTensor;
use anyhow::Result;
use rayon::prelude::*;
use std::sync::Arc;

/// Elements per parallel work item of a perturbed copy.
pub(super) const COPY_CHUNK: usize = 1 << 14;

/// What a fused forward adds to each parameter, whatever the device: the optimizer's direction
/// and virtual update, the step's keys and the signed perturbation size.
pub struct FusedView<'a, B: ZoBackend> {
    opt: &'a ZoOptimizer<B>,
    pub key: StepKey,
    /// The signed perturbation size (+eps, -eps, or 0 for evaluation).
    pub scale: f32,
}

impl<'a, B: ZoBackend + 'static> FusedView<'a, B> {
    pub fn new(opt: &'a ZoOptimizer<B>, key: StepKey, scale: f32) -> Self {
        FusedView { opt, key, scale }
    }

    /// The rank of the direction of a parameter of `shape`, if it is low-rank.
    pub fn low_rank(&self, shape: &[usize]) -> Option<usize> {
        match self.opt.method.direction() {
            Direction::LowRank { rank } if shape.len() == 2 => Some(*rank),
            _ => None,
        }
    }

    /// The low-rank coefficients seen by this forward: the virtual update plus scale * tau.
    pub fn coefficients(&self, id: ParamId, rank: usize) -> Vec<f32> {
        let tau = Factors::tau(self.key, id, rank);
        let virt = self.opt.method.virtual_coefficients(id);
        (0..rank)
            .map(|k| virt.map_or(0.0, |v| v[k]) + self.scale * tau[k])
            .collect()
    }

    /// Whether parameter `id` differs from the stored weights in this forward.
    pub fn moves(&self, id: ParamId) -> bool {
        self.scale != 0.0 || self.opt.method.virtual_coefficients(id).is_some()
    }

    /// How the element-wise (dense or sparse) z of parameter `id` is drawn.
    pub fn elem_z(&self, id: ParamId) -> ZSpec<'static> {
        elem_spec(self.opt.method.direction(), id)
    }
}

pub struct FusedHook<'a> {
    view: FusedView<'a, CpuBackend>,
    /// The perturbed copy of parameter `scratch_of` (or of an LM head block), in one buffer
    /// that every tensor of the forward reuses.
    scratch: HostTensor,
    scratch_of: Option<ParamId>,
    /// Bytes of the scratch buffer, as accounted under `Tag::Scratch`.
    scratch_bytes: usize,
    head_block_rows: usize,
    mem: Arc<MemCounters>,
}

impl<'a> FusedHook<'a> {
    pub fn new(opt: &'a ZoOptimizer, key: StepKey, scale: f32, backend: &CpuBackend) -> Self {
        FusedHook {
            view: FusedView::new(opt, key, scale),
            scratch: HostTensor::from_f32("fused scratch", vec![0], &[]),
            scratch_of: None,
            scratch_bytes: 0,
            head_block_rows: HEAD_BLOCK_ROWS,
            mem: backend.mem.clone(),
        }
    }

    /// Perturbs and multiplies the LM head `rows` vocabulary rows at a time (default
    /// HEAD_BLOCK_ROWS): fewer rows bound the scratch tighter.
    pub fn with_head_block_rows(mut self, rows: usize) -> Self {
        self.set_head_block_rows(rows);
        self
    }

    pub(super) fn set_head_block_rows(&mut self, rows: usize) {
        self.head_block_rows = rows.max(1);
    }

    /// What this forward adds to parameter `id`: multiple `s` of the returned z. Low-rank z
    /// carries its multiple in its coefficients (virtual update included), so s = 1 there.
    fn perturbation(&self, w: &HostTensor, id: ParamId) -> Result<(TensorZ, f32)> {
        let v = &self.view;
        match v.low_rank(&w.shape) {
            Some(rank) => {
                let coef = v.coefficients(id, rank);
                let z = ZSpec::LowRank { coef: &coef };
                Ok((TensorZ::from_spec(w, id, v.key, z)?, 1.0))
            }
            None => Ok((TensorZ::from_spec(w, id, v.key, v.elem_z(id))?, v.scale)),
        }
    }

    /// What this hook adds to the parameters.
    pub(super) fn view(&self) -> &FusedView<'a, CpuBackend> {
        &self.view
    }

    /// Vocabulary rows per block of the perturbed LM head.
    pub(super) fn head_block_rows(&self) -> usize {
        self.head_block_rows
    }

    /// w + s[0] z in the scratch buffer and w + s[1] z in `other`, from one draw of z: the
    /// bits `param` builds for hooks of those scales. A paired forward's first stream builds
    /// its own copy here and the second stream's beside it.
    pub(super) fn param_pair(
        &mut self,
        w: &HostTensor,
        tz: &TensorZ,
        s: [f32; 2],
        other: &mut [f32],
    ) -> &HostTensor {
        let copy = self.scratch_as(&w.name, &w.shape);
        perturbed_copy_pair(w, tz, s, 0, copy, other);
        &self.scratch
    }

    /// `param_pair` of the LM head's vocabulary rows v0 .. v0 + rows: the bits of
    /// `perturbed_head_block` at each scale.
    pub(super) fn head_block_pair(
        &mut self,
        head: &HostTensor,
        tz: &TensorZ,
        (v0, rows): (usize, usize),
        s: [f32; 2],
        other: &mut [f32],
    ) -> &[f32] {
        let d = head.shape[1];
        let w = self.scratch_as("lm_head block", &[rows, d]);
        perturbed_copy_pair(head, tz, s, v0 * d, w, other);
        w
    }

    /// The scratch buffer as an f32 tensor of `shape`, accounting any growth.
    fn scratch_as(&mut self, name: &str, shape: &[usize]) -> &mut [f32] {
        self.scratch_of = None;
        let bytes = self.scratch.reuse_as_f32(name, shape);
        if bytes > self.scratch_bytes {
            self.mem.add(Tag::Scratch, bytes - self.scratch_bytes);
            self.scratch_bytes = bytes;
        }
        self.scratch.f32s_mut().expect("scratch is f32")
    }

    /// The LM head's vocabulary rows v0 .. v0 + rows, perturbed, in the scratch buffer.
    fn perturbed_head_block(
        &mut self,
        head: &HostTensor,
        tz: &TensorZ,
        s: f32,
        v0: usize,
        rows: usize,
    ) -> &[f32] {
        let d = head.shape[1];
        let w = self.scratch_as("lm_head block", &[rows, d]);
        perturbed_copy(head, tz, s, v0 * d, w);
        w
    }
}

/// Writes w + s z over elements start .. start + out.len() of `t` into `out`, on every
/// thread, with the bits an in-place pass over an f32 `t` would leave. Other dtypes keep the
/// perturbed values in f32 rather than rounding them to their storage (the CPU's GEMMs take
/// f32; the GPU's bf16 GEMMs take the rounded copy an in-place pass would leave).
fn perturbed_copy(t: &HostTensor, tz: &TensorZ, s: f32, start: usize, out: &mut [f32]) {
    out.par_chunks_mut(COPY_CHUNK)
        .enumerate()
        .for_each(|(c, w)| perturbed_range(t, tz, s, start + c * COPY_CHUNK, w));
}

/// `perturbed_copy` of elements at .. at + out.len() on the calling thread: one chunk of a
/// whole copy, or one tile a GEMM builds as it packs it (`WeightRows::Built`).
pub(super) fn perturbed_range(t: &HostTensor, tz: &TensorZ, s: f32, at: usize, out: &mut [f32]) {
    match (t.f32s(), tz) {
        // Straight from the stored weights, without copying them into `out` first.
        (Some(w), TensorZ::Dense(_) | TensorZ::Sparse(..)) => {
            tz.perturbed_from(at, &w[at..at + out.len()], s, out)
        }
        _ => {
            let cols = *t.shape.last().unwrap_or(&1);
            t.read_f32_range(at, out);
            tz.pass_slice(at, out, cols, 0.0, Rule::Move { to: s }, None);
        }
    }
}

/// `perturbed_range` at two scales from one draw of z: w + s[0] z into `out` and w + s[1] z
/// into `other`.
pub(super) fn perturbed_range_pair(
    t: &HostTensor,
    tz: &TensorZ,
    s: [f32; 2],
    at: usize,
    out: &mut [f32],
    other: &mut [f32],
) {
    match t.f32s() {
        Some(w) => tz.perturbed_pair_from(at, &w[at..at + out.len()], s, out, other),
        None => {
            t.read_f32_range(at, other);
            tz.perturbed_pair_in_place(at, s, out, other);
        }
    }
}

/// `perturbed_copy` at two scales from one draw of z (see `perturbed_range_pair`).
fn perturbed_copy_pair(
    t: &HostTensor,
    tz: &TensorZ,
    s: [f32; 2],
    start: usize,
    out: &mut [f32],
    other: &mut [f32],
) {
    assert_eq!(out.len(), other.len(), "{}: copies of two sizes", t.name);
    out.par_chunks_mut(COPY_CHUNK)
        .zip(other.par_chunks_mut(COPY_CHUNK))
        .enumerate()
        .for_each(|(c, (w, o))| perturbed_range_pair(t, tz, s, start + c * COPY_CHUNK, w, o));
}

/// The LM head as a fused forward sees it, perturbed a block at a time: a tile at a time
/// inside the GEMM where it packs tiles, else in the scratch buffer.
struct PerturbedHead<'h, 'a> {
    hook: &'h mut FusedHook<'a>,
    head: &'h HostTensor,
    tz: &'h TensorZ,
    s: f32,
    tiles: bool,
}

impl HeadBlocks for PerturbedHead<'_, '_> {
    fn block(&mut self, v0: usize, rows: usize, _: usize, product: &mut dyn FnMut(WeightRows)) {
        let (head, tz, s) = (self.head, self.tz, self.s);
        if self.tiles {
            let d = head.shape[1];
            let build =
                |r0: usize, out: &mut [f32]| perturbed_range(head, tz, s, (v0 + r0) * d, out);
            return product(WeightRows::Built(&build));
        }
        let block = self.hook.perturbed_head_block(head, tz, s, v0, rows);
        product(WeightRows::Stored(block))
    }
}

impl Drop for FusedHook<'_> {
    fn drop(&mut self) {
        self.mem.sub(Tag::Scratch, self.scratch_bytes);
    }
}

impl LinearHook<CpuBackend> for FusedHook<'_> {
    fn param<'b>(
        &'b mut self,
        _b: &CpuBackend,
        w: &'b HostTensor,
        id: ParamId,
    ) -> Result<&'b HostTensor> {
        if !self.view.moves(id) {
            return Ok(w);
        }
        if self.scratch_of != Some(id) {
            let (tz, s) = self.perturbation(w, id)?;
            let copy = self.scratch_as(&w.name, &w.shape);
            perturbed_copy(w, &tz, s, 0, copy);
            self.scratch_of = Some(id);
        }
        Ok(&self.scratch)
    }

    fn embed(
        &mut self,
        b: &CpuBackend,
        table: &HostTensor,
        ids: &[u32],
        id: ParamId,
        out: &mut CpuAct,
    ) -> Result<()> {
        b.embed(table, ids, out)?;
        if !self.view.moves(id) {
            return Ok(());
        }
        // Only the gathered rows, with the arithmetic of a whole perturbed copy.
        let cols = table.shape[1];
        let (tz, s) = self.perturbation(table, id)?;
        for (row, &t) in out.data.chunks_mut(cols).zip(ids) {
            tz.pass_slice(
                t as usize * cols,
                row,
                cols,
                0.0,
                Rule::Move { to: s },
                None,
            );
        }
        Ok(())
    }

    fn head_logits_rows(
        &mut self,
        b: &CpuBackend,
        hidden: &CpuAct,
        head: &HostTensor,
        id: ParamId,
        rows: &[usize],
    ) -> Result<Vec<f32>> {
        if !self.view.moves(id) {
            return b.logits_rows(hidden, head, rows);
        }
        // z is set up once per call (low-rank factors are drawn here), not once per block.
        let (tz, s) = self.perturbation(head, id)?;
        let block = self.head_block_rows;
        let mut blocks = PerturbedHead {
            hook: self,
            head,
            tz: &tz,
            s,
            tiles: b.packs_weight_tiles(),
        };
        let [logits] =
            head::logits_rows_streams(b, [hidden], rows, head.shape[0], block, &mut blocks)?;
        Ok(logits)
    }

    fn head_target_logprobs(
        &mut self,
        b: &CpuBackend,
        hidden: &CpuAct,
        head: &HostTensor,
        id: ParamId,
        targets: &[i32],
    ) -> Result<Vec<f32>> {
        if !self.view.moves(id) {
            return b.target_logprobs(hidden, head, targets);
        }
        // The vocabulary is the outer loop, so the head is perturbed once per forward.
        let (tz, s) = self.perturbation(head, id)?;
        let block = self.head_block_rows;
        let mut blocks = PerturbedHead {
            hook: self,
            head,
            tz: &tz,
            s,
            tiles: b.packs_weight_tiles(),
        };
        head::target_logprobs(b, hidden, targets, head.shape[0], block, &mut blocks)
    }

    fn linear(
        &mut self,
        b: &CpuBackend,
        x: &CpuAct,
        w: &HostTensor,
        id: ParamId,
        out: &mut CpuAct,
    ) -> Result<()> {
        if self.view.moves(id) && b.packs_weight_tiles() {
            // Each tile of w + s z is built as the GEMM packs it, with the bits of the whole
            // copy `param` would make. A low-rank z too: its rows cost r multiply-adds an
            // element where the tile is packed, against a side product's extra pass over the
            // output (rows x out f32 read and written), which took about a seventh of a TeZO
            // forward on the default model.
            let (tz, s) = self.perturbation(w, id)?;
            let cols = w.shape[1];
            let build = |n0: usize, rows: &mut [f32]| perturbed_range(w, &tz, s, n0 * cols, rows);
            return b.matmul_weight_rows(x, &w.name, &w.shape, WeightRows::Built(&build), out);
        }
        let Some(rank) = self.view.low_rank(&w.shape) else {
            let w = self.param(b, w, id)?;
            return b.matmul(x, w, out);
        };
        b.matmul(x, w, out)?;
        // Beside the GEMM (f32 GEMMs, which pack no weight tiles we could build):
        // out += ((x V) diag(c) / sqrt(r)) U^T, never forming U diag(c) V^T.
        let c = self.view.coefficients(id, rank);
        if c.iter().all(|&v| v == 0.0) {
            return Ok(());
        }
        let (m, n) = (w.shape[0], w.shape[1]);
        let fac = Factors::generate(self.view.key.seed, id, m, n, rank);
        let rows = x.rows;
        let mut xv = vec![0.0f32; rows * rank];
        b.matmul_slices_f32(&x.data, &fac.vt, &mut xv, rows, rank, n, false);
        let norm = 1.0 / (rank as f32).sqrt();
        for row in xv.chunks_mut(rank) {
            for (v, ck) in row.iter_mut().zip(&c) {
                *v *= ck * norm;
            }
        }
        b.matmul_slices_f32(&xv, &fac.u, &mut out.data, rows, m, rank, true);
        Ok(())
    }
}
