//! The fused perturbation: weights stay as the update left them and every parameter use sees
//! w + scale * z (plus any virtual low-rank update), built on the fly. Restore is exact by
//! construction because nothing is ever subtracted back.

use super::direction::{is_matrix, Direction, Factors, StepKey, TensorZ};
use super::ZoOptimizer;
use crate::backend::cpu::{CpuAct, CpuBackend};
use crate::backend::mem::{MemCounters, Tag};
use crate::backend::{Backend, LinearHook, ParamId};
use crate::model::HostTensor;
use anyhow::Result;
use std::sync::Arc;

pub struct FusedHook<'a> {
    opt: &'a ZoOptimizer,
    key: StepKey,
    /// The signed perturbation size (+eps, -eps, or 0 for evaluation).
    scale: f32,
    /// One tensor's perturbed copy, kept so a tied LM head reuses the embedding's.
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
        let virt = self.opt.method.virtual_coefficients(id).is_some();
        if self.scale == 0.0 && !virt {
            return Ok(w);
        }
        if self.scratch.as_ref().map(|s| s.0) != Some(id) {
            self.drop_scratch();
            let mut t = HostTensor::from_f32(w.name.clone(), w.shape.clone(), &w.to_f32_vec());
            self.mem.add(Tag::Scratch, t.bytes().len());
            let dir = self.opt.method.direction();
            let scale = self.scale;
            match self.low_rank(w) {
                Some(rank) => {
                    let c = self.coefficients(id, rank);
                    TensorZ::of(&t, id, self.key, dir, &c).pass(&mut t, 0.0, |_, w, z| w + z);
                }
                None => TensorZ::of(&t, id, self.key, dir, &[])
                    .pass(&mut t, 0.0, |_, w0, z| w0 + scale * z),
            }
            self.scratch = Some((id, t));
        }
        Ok(&self.scratch.as_ref().unwrap().1)
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
        let mut vt = vec![0.0f32; rank * n];
        for bi in 0..n {
            for k in 0..rank {
                vt[k * n + bi] = fac.v[bi * rank + k];
            }
        }
        let mut xv = vec![0.0f32; rows * rank];
        b.matmul_slices(&x.data, &vt, &mut xv, rows, rank, n);
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
