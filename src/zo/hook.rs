//! The fused perturbation: weights stay as the update left them and every parameter use sees
//! w + scale * z (plus any virtual low-rank update), built on the fly. Restore is exact by
//! construction because nothing is ever subtracted back.
//!
//! Scratch stays at one layer's largest matrix: linear layers get a perturbed copy of their
//! weight (or, for low-rank z, a side product beside the GEMM); the embedding perturbs only the
//! rows it gathers, and the LM head is perturbed and applied a block of vocabulary rows at a
//! time.

use super::direction::{is_matrix, Direction, Factors, StepKey, TensorZ};
use super::passes::{Rule, ZSpec};
use super::{elem_spec, ZoOptimizer};
use crate::backend::cpu::{
    gather_rows, logsumexp, target_rows, CpuAct, CpuBackend, LOGIT_CHUNK_ROWS,
};
use crate::backend::mem::{MemCounters, Tag};
use crate::backend::{Backend, LinearHook, ParamId};
use crate::model::HostTensor;
use anyhow::Result;
use std::sync::Arc;

/// Vocabulary rows of the LM head perturbed and multiplied at once.
const HEAD_BLOCK_ROWS: usize = 4096;

pub struct FusedHook<'a> {
    opt: &'a ZoOptimizer,
    key: StepKey,
    /// The signed perturbation size (+eps, -eps, or 0 for evaluation).
    scale: f32,
    /// The perturbed copy of the tensor in use.
    scratch: Option<(ParamId, HostTensor)>,
    mem: Arc<MemCounters>,
}

impl<'a> FusedHook<'a> {
    pub fn new(opt: &'a ZoOptimizer, key: StepKey, scale: f32, backend: &CpuBackend) -> Self {
        FusedHook {
            opt,
            key,
            scale,
            scratch: None,
            mem: backend.mem.clone(),
        }
    }

    fn low_rank(&self, w: &HostTensor) -> Option<usize> {
        match self.opt.method.direction() {
            Direction::LowRank { rank } if is_matrix(w) => Some(*rank),
            _ => None,
        }
    }

    /// The low-rank coefficients seen by this forward: the virtual update plus scale * tau.
    fn coefficients(&self, id: ParamId, rank: usize) -> Vec<f32> {
        let tau = Factors::tau(self.key, id, rank);
        let virt = self.opt.method.virtual_coefficients(id);
        (0..rank)
            .map(|k| virt.map_or(0.0, |v| v[k]) + self.scale * tau[k])
            .collect()
    }

    /// Whether parameter `id` differs from the stored weights in this forward.
    fn moves(&self, id: ParamId) -> bool {
        self.scale != 0.0 || self.opt.method.virtual_coefficients(id).is_some()
    }

    /// What this forward adds to parameter `id`: multiple `s` of the returned z. Low-rank z
    /// carries its multiple in its coefficients (virtual update included), so s = 1 there.
    fn perturbation(&self, w: &HostTensor, id: ParamId) -> Result<(TensorZ, f32)> {
        match self.low_rank(w) {
            Some(rank) => {
                let coef = self.coefficients(id, rank);
                let z = ZSpec::LowRank { coef: &coef };
                Ok((TensorZ::from_spec(w, id, self.key, z)?, 1.0))
            }
            None => {
                let z = elem_spec(self.opt.method.direction(), id);
                Ok((TensorZ::from_spec(w, id, self.key, z)?, self.scale))
            }
        }
    }

    fn drop_scratch(&mut self) {
        if let Some((_, t)) = self.scratch.take() {
            self.mem.sub(Tag::Scratch, t.bytes().len());
        }
    }
}

impl Drop for FusedHook<'_> {
    fn drop(&mut self) {
        self.drop_scratch();
    }
}

impl LinearHook<CpuBackend> for FusedHook<'_> {
    fn param<'b>(
        &'b mut self,
        _b: &CpuBackend,
        w: &'b HostTensor,
        id: ParamId,
    ) -> Result<&'b HostTensor> {
        if !self.moves(id) {
            return Ok(w);
        }
        if self.scratch.as_ref().map(|s| s.0) != Some(id) {
            self.drop_scratch();
            let mut t = HostTensor::from_f32(w.name.clone(), w.shape.clone(), &w.to_f32_vec());
            self.mem.add(Tag::Scratch, t.bytes().len());
            let (tz, s) = self.perturbation(w, id)?;
            tz.pass(&mut t, 0.0, Rule::Move { to: s }, None);
            self.scratch = Some((id, t));
        }
        Ok(&self.scratch.as_ref().unwrap().1)
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
        if !self.moves(id) {
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
        if !self.moves(id) {
            return b.logits_rows(hidden, head, rows);
        }
        let (vocab, d) = (head.shape[0], head.shape[1]);
        let x = gather_rows(hidden, rows)?;
        let block = HEAD_BLOCK_ROWS.min(vocab);
        let scratch = (block * d + rows.len() * block) * 4;
        self.mem.add(Tag::Scratch, scratch);
        // z is set up once per call (low-rank factors are drawn here), not once per block.
        let (tz, s) = self.perturbation(head, id)?;
        let mut out = vec![0.0f32; rows.len() * vocab];
        let mut w = vec![0.0f32; block * d];
        let mut part = vec![0.0f32; rows.len() * block];
        let es = head.dtype.size();
        for v0 in (0..vocab).step_by(block) {
            let nv = block.min(vocab - v0);
            let w = &mut w[..nv * d];
            match head.f32s() {
                Some(all) => w.copy_from_slice(&all[v0 * d..(v0 + nv) * d]),
                None => crate::model::tensor::decode_into(
                    head.dtype,
                    &head.bytes()[v0 * d * es..(v0 + nv) * d * es],
                    w,
                ),
            }
            tz.pass_slice(v0 * d, w, d, 0.0, Rule::Move { to: s }, None);
            let part = &mut part[..rows.len() * nv];
            b.matmul_slices(&x, w, part, rows.len(), nv, d);
            for (o, p) in out.chunks_mut(vocab).zip(part.chunks(nv)) {
                o[v0..v0 + nv].copy_from_slice(p);
            }
        }
        self.mem.sub(Tag::Scratch, scratch);
        Ok(out)
    }

    fn head_target_logprobs(
        &mut self,
        b: &CpuBackend,
        hidden: &CpuAct,
        head: &HostTensor,
        id: ParamId,
        targets: &[i32],
    ) -> Result<Vec<f32>> {
        if !self.moves(id) {
            return b.target_logprobs(hidden, head, targets);
        }
        let vocab = head.shape[0];
        let rows = target_rows(targets, hidden.rows, vocab)?;
        let mut out = vec![0.0f32; targets.len()];
        for rs in rows.chunks(LOGIT_CHUNK_ROWS) {
            let logits = self.head_logits_rows(b, hidden, head, id, rs)?;
            for (row, &r) in logits.chunks(vocab).zip(rs) {
                out[r] = row[targets[r] as usize] - logsumexp(row);
            }
        }
        Ok(out)
    }

    fn linear(
        &mut self,
        b: &CpuBackend,
        x: &CpuAct,
        w: &HostTensor,
        id: ParamId,
        out: &mut CpuAct,
    ) -> Result<()> {
        let Some(rank) = self.low_rank(w) else {
            let w = self.param(b, w, id)?;
            return b.matmul(x, w, out);
        };
        b.matmul(x, w, out)?;
        // Beside the GEMM: out += ((x V) diag(c) / sqrt(r)) U^T, never forming U diag(c) V^T.
        let c = self.coefficients(id, rank);
        if c.iter().all(|&v| v == 0.0) {
            return Ok(());
        }
        let (m, n) = (w.shape[0], w.shape[1]);
        let fac = Factors::generate(self.key.seed, id, m, n, rank);
        let rows = x.rows;
        let mut xv = vec![0.0f32; rows * rank];
        b.matmul_slices(&x.data, &fac.vt, &mut xv, rows, rank, n);
        let norm = 1.0 / (rank as f32).sqrt();
        for row in xv.chunks_mut(rank) {
            for (v, ck) in row.iter_mut().zip(&c) {
                *v *= ck * norm;
            }
        }
        let mut side = b.alloc(rows, m, Tag::Scratch)?;
        b.matmul_slices(&xv, &fac.u, &mut side.data, rows, m, rank);
        for (o, s) in out.data.iter_mut().zip(&side.data) {
            *o += s;
        }
        Ok(())
    }
}
