//! The shared perturbation machinery: how the direction z of a step is drawn for each tensor,
//! regenerated from Philox keys (never stored), and the element passes that add it.
//!
//! z for tensor `id` at step `t` of a run with seed `s`:
//! - dense: z[j] = normal(s, t, id)[j];
//! - sparse: the same, but zero where |w0[j]| > h[id] (w0 = the unperturbed weight);
//! - low rank (matrices [m x n]): Z = U diag(tau) V^T / sqrt(r), U [m x r] and V [n x r] fixed for
//!   the run (keys (s, FACTOR_U/V, id)), tau = normal(s, t, id)[0..r]; vectors stay dense.
//!   The 1/sqrt(r) makes Z's entries unit-variance, so eps and lr mean what they mean for MeZO.

use super::passes::{Rule, ZSpec, ZoBackend};
use crate::backend::cpu::simd::wide;
use crate::model::HostTensor;
use crate::rng::Philox;
use anyhow::Result;
use rayon::prelude::*;

/// Elements per parallel work item (a multiple of 4, the Philox block width).
const CHUNK: usize = 1 << 14;
pub const FACTOR_U: u32 = 0xFFFF_FF00;
pub const FACTOR_V: u32 = 0xFFFF_FF01;

#[derive(Clone, Debug, PartialEq)]
pub enum Direction {
    Dense,
    /// Per-tensor thresholds h: only elements with |w0| <= h move.
    Sparse {
        thresholds: Vec<f32>,
    },
    LowRank {
        rank: usize,
    },
}

/// The random keys of one step.
#[derive(Clone, Copy, Debug)]
pub struct StepKey {
    pub seed: u64,
    pub step: u32,
}

impl StepKey {
    pub fn stream(&self, id: usize) -> Philox {
        Philox::new(self.seed, self.step, id as u32)
    }
}

/// Fixed factors of a low-rank direction for one matrix: U [m x r] and V [n x r] (kept
/// transposed, see `vt`).
pub struct Factors {
    /// U, [m][r].
    pub u: Vec<f32>,
    /// V transposed, [r][n]: V is drawn as [n][r] (element b * r + k), stored k-major so a row
    /// of z is r contiguous axpys.
    pub vt: Vec<f32>,
    pub rank: usize,
}

impl Factors {
    pub fn generate(seed: u64, id: usize, m: usize, n: usize, rank: usize) -> Self {
        let mut u = vec![0.0; m * rank];
        let mut v = vec![0.0; n * rank];
        Philox::new(seed, FACTOR_U, id as u32).fill_normal(0, &mut u);
        Philox::new(seed, FACTOR_V, id as u32).fill_normal(0, &mut v);
        let mut vt = vec![0.0; rank * n];
        for (b, vb) in v.chunks_exact(rank).enumerate() {
            for (k, &x) in vb.iter().enumerate() {
                vt[k * n + b] = x;
            }
        }
        Factors { u, vt, rank }
    }

    /// The step's coefficients tau (length r).
    pub fn tau(key: StepKey, id: usize, rank: usize) -> Vec<f32> {
        let mut t = vec![0.0; rank];
        key.stream(id).fill_normal(0, &mut t);
        t
    }

    /// Row `a` of U diag(c) V^T / sqrt(r) into `out` (length n).
    pub fn row(&self, a: usize, c: &[f32], out: &mut [f32]) {
        let r = self.rank;
        let n = out.len();
        let norm = 1.0 / (r as f32).sqrt();
        // Each element is the in-order sum over k of v[b][k] * (u[a][k] c[k] / sqrt(r)),
        // multiply then add, exactly as the CUDA twin adds; running k outermost keeps that
        // order per element while the loop over b vectorizes.
        low_rank_row(&self.u[a * r..(a + 1) * r], c, &self.vt[..r * n], norm, out);
    }
}

wide! {
    /// out = sum over k of vt[k] * (u_row[k] * c[k] * norm), k in order.
    fn low_rank_row(u_row: &[f32], c: &[f32], vt: &[f32], norm: f32, out: &mut [f32]) {
        out.fill(0.0);
        let n = out.len();
        for ((&u, &ck), vk) in u_row.iter().zip(c).zip(vt.chunks_exact(n)) {
            let y = u * ck * norm;
            for (o, &x) in out.iter_mut().zip(vk) {
                *o += x * y;
            }
        }
    }
}

/// Whether a tensor gets a low-rank direction under `Direction::LowRank`.
pub fn is_matrix(t: &HostTensor) -> bool {
    t.shape.len() == 2
}

/// Runs `f(j, w, z)` over elements [start, start + w.len()) of a tensor, held in `w`, with
/// their dense normal z. `f` returns the new weight.
#[inline(always)]
fn dense_slice(stream: Philox, start: usize, w: &mut [f32], f: impl Fn(usize, f32, f32) -> f32) {
    let mut buf = [0.0f32; CHUNK];
    for (c, w) in w.chunks_mut(CHUNK).enumerate() {
        let first = start + c * CHUNK;
        let z = &mut buf[..w.len()];
        stream.fill_normal(first as u64, z);
        for (k, (w, &z)) in w.iter_mut().zip(z.iter()).enumerate() {
            *w = f(first + k, *w, z);
        }
    }
}

/// Runs `f(j, w, z)` over elements [start, start + w.len()) of an [m x n] matrix, held in
/// `w`, with z from the low-rank factors and coefficients `c` (length r).
#[inline(always)]
fn low_rank_slice(
    fac: &Factors,
    c: &[f32],
    n: usize,
    start: usize,
    w: &mut [f32],
    f: impl Fn(usize, f32, f32) -> f32,
) {
    // The range may start and end inside a row, so z is built row by row over it.
    let mut zrow = vec![0.0f32; n];
    let mut k = 0;
    while k < w.len() {
        let j = start + k;
        let (a, b0) = (j / n, j % n);
        fac.row(a, c, &mut zrow);
        let take = (n - b0).min(w.len() - k);
        let span = w[k..k + take].iter_mut().zip(&zrow[b0..b0 + take]);
        for (q, (w, &z)) in span.enumerate() {
            *w = f(j + q, *w, z);
        }
        k += take;
    }
}

/// Splits a tensor into chunks of CHUNK elements and runs `run(start, values)` on each in
/// parallel, through an f32 copy of the chunk when the tensor is not f32.
pub fn for_each_chunk(t: &mut HostTensor, run: impl Fn(usize, &mut [f32]) + Sync) {
    if let Some(w) = t.f32s_mut() {
        w.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, w)| run(c * CHUNK, w));
        return;
    }
    let dtype = t.dtype;
    let bytes = t.bytes_mut();
    let es = dtype.size();
    bytes
        .par_chunks_mut(CHUNK * es)
        .enumerate()
        .for_each(|(c, b)| {
            let n = b.len() / es;
            let mut buf = vec![0.0f32; n];
            crate::model::tensor::decode_into(dtype, b, &mut buf);
            run(c * CHUNK, &mut buf);
            crate::model::tensor::encode_from(dtype, &buf, b);
        });
}

/// A raw pointer to per-element optimizer state, shared by the parallel chunks of one pass.
/// Each element index is touched by exactly one chunk, which is what makes `get` sound.
#[derive(Clone, Copy)]
pub struct ElemState(*mut f32);
unsafe impl Send for ElemState {}
unsafe impl Sync for ElemState {}

impl ElemState {
    pub fn new(v: &mut [f32]) -> Self {
        ElemState(v.as_mut_ptr())
    }
    /// # Safety
    /// `j` is in bounds and no other thread touches element `j` during the pass.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get(&self, j: usize) -> &mut f32 {
        &mut *self.0.add(j)
    }
}

/// The z of one tensor at one step, ready to be generated on the CPU.
pub enum TensorZ {
    Dense(Philox),
    Sparse(Philox, f32),
    /// The matrix's fixed factors and the coefficients of this pass.
    LowRank(Factors, Vec<f32>),
}

impl TensorZ {
    /// The z that `z` describes for tensor `t`, parameter `id`, at `key`.
    pub fn from_spec(t: &HostTensor, id: usize, key: StepKey, z: ZSpec) -> Result<Self> {
        Ok(match z {
            ZSpec::Dense => TensorZ::Dense(key.stream(id)),
            ZSpec::Sparse { threshold } => TensorZ::Sparse(key.stream(id), threshold),
            ZSpec::LowRank { coef } => {
                if !is_matrix(t) {
                    anyhow::bail!("{}: a low-rank direction needs a matrix", t.name);
                }
                let fac = Factors::generate(key.seed, id, t.shape[0], t.shape[1], coef.len());
                TensorZ::LowRank(fac, coef.to_vec())
            }
        })
    }

    /// Runs `f(j, w0, z)` -> new weight over tensor `t`, where the tensor currently holds
    /// w0 + offset * z. For sparse directions z is already zeroed where |w0| > h.
    pub fn pass(&self, t: &mut HostTensor, offset: f32, f: impl Fn(usize, f32, f32) -> f32 + Sync) {
        let cols = *t.shape.last().unwrap_or(&1);
        for_each_chunk(t, |start, w| self.pass_slice(start, w, cols, offset, &f));
    }

    /// `pass` over elements [start, start + w.len()) of a tensor with rows of `cols`
    /// elements, held in `w` as f32 (e.g. a few gathered rows).
    #[inline(always)]
    pub fn pass_slice(
        &self,
        start: usize,
        w: &mut [f32],
        cols: usize,
        offset: f32,
        f: impl Fn(usize, f32, f32) -> f32,
    ) {
        match self {
            TensorZ::Dense(s) => dense_slice(*s, start, w, |j, w, z| f(j, w - offset * z, z)),
            TensorZ::Sparse(s, h) => dense_slice(*s, start, w, |j, w, z| {
                let w0 = w - offset * z;
                // Undo the perturbation only where it was applied: the mask is a function of
                // w0, recomputed here rather than stored.
                if w0.abs() <= *h {
                    f(j, w0, z)
                } else {
                    f(j, w, 0.0)
                }
            }),
            TensorZ::LowRank(fac, c) => {
                low_rank_slice(fac, c, cols, start, w, |j, w, z| f(j, w - offset * z, z))
            }
        }
    }
}

/// In-place perturbation: a tensor at w0 + from*z moves to w0 + to*z.
pub fn perturb_tensor<B: ZoBackend>(
    backend: &B,
    t: &mut B::Weight,
    id: usize,
    key: StepKey,
    dir: &Direction,
    from: f32,
    to: f32,
) -> Result<()> {
    match dir {
        Direction::LowRank { rank } if B::weight_shape(t).len() == 2 => {
            // Low-rank z is linear in its coefficients, so the move is one pass with
            // coefficients (to - from) * tau.
            let c: Vec<f32> = Factors::tau(key, id, *rank)
                .iter()
                .map(|x| (to - from) * x)
                .collect();
            let z = ZSpec::LowRank { coef: &c };
            backend.zo_pass(t, id, key, z, 0.0, Rule::Move { to: 1.0 }, None)
        }
        _ => backend.zo_pass(
            t,
            id,
            key,
            super::elem_spec(dir, id),
            from,
            Rule::Move { to },
            None,
        ),
    }
}
