//! The CPU reference backend: f32 math over f32/f16/bf16 weights, GEMMs through the `gemm`
//! crate, everything else plain Rust over rows (rayon). This is the oracle every CUDA kernel is
//! checked against, so it favours clarity; it is still fast enough to be a product on its own.
//! Opt-in, `Matmul::Bf16` runs the GEMMs with bf16 inputs and f32 accumulation (the GPU's
//! contract) at twice the f32 rate on CPUs with AVX512-BF16.

pub mod gemm_bf16;
pub mod math;

use super::mem::{MemCounters, Tag};
use super::{AttnShape, Backend, SeqLayout};
use crate::model::HostTensor;
use anyhow::{ensure, Result};
use rayon::prelude::*;
use std::sync::Arc;

/// Rows of logits computed at once by the LM head (bounds the [rows x vocab] scratch).
pub const LOGIT_CHUNK_ROWS: usize = 128;

/// An activation tensor: row-major f32, accounted while alive.
pub struct CpuAct {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
    tag: Tag,
    mem: Arc<MemCounters>,
}

impl Drop for CpuAct {
    fn drop(&mut self) {
        self.mem.sub(self.tag, self.data.len() * 4);
    }
}

/// The precision of the CPU's GEMMs (every linear layer and the LM head).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Matmul {
    /// f32 inputs, f32 accumulation: the reference.
    F32,
    /// Inputs rounded to bf16, f32 accumulation; needs AVX512-BF16.
    Bf16,
}

impl Matmul {
    /// `f32`, `bf16`, or `auto`: bf16 where the CPU has AVX512-BF16, f32 elsewhere.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Matmul::F32),
            "bf16" => Ok(Matmul::Bf16),
            "auto" if gemm_bf16::available() => Ok(Matmul::Bf16),
            "auto" => Ok(Matmul::F32),
            _ => anyhow::bail!("unknown matmul precision {s:?}: expected f32, bf16 or auto"),
        }
    }

    /// bf16 is refused on a CPU without AVX512-BF16 rather than emulated slowly.
    pub fn check_supported(self) -> Result<()> {
        ensure!(
            self != Matmul::Bf16 || gemm_bf16::available(),
            "--matmul bf16 needs a CPU with AVX512-BF16 (this one lacks it); use --matmul f32"
        );
        Ok(())
    }

    pub fn name(self) -> &'static str {
        match self {
            Matmul::F32 => "f32",
            Matmul::Bf16 => "bf16",
        }
    }
}

pub struct CpuBackend {
    pub mem: Arc<MemCounters>,
    threads: usize,
    matmul: Matmul,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend {
            mem: Arc::new(MemCounters::default()),
            threads: rayon::current_num_threads(),
            matmul: Matmul::F32,
        }
    }

    /// A backend whose GEMMs run at `matmul` precision (see `Matmul::check_supported`).
    pub fn with_matmul(matmul: Matmul) -> Result<Self> {
        matmul.check_supported()?;
        Ok(CpuBackend {
            matmul,
            ..Self::new()
        })
    }

    fn parallelism(&self, m: usize, n: usize, k: usize) -> gemm::Parallelism {
        // Threads only pay off past a few MFLOP.
        if self.threads > 1 && m * n * k > 1 << 18 {
            gemm::Parallelism::Rayon(self.threads)
        } else {
            gemm::Parallelism::None
        }
    }

    /// Runs `f` on an f32 view of `w`, converting f16/bf16 into a scratch copy first.
    fn with_f32<R>(&self, w: &HostTensor, f: impl FnOnce(&[f32]) -> R) -> R {
        match w.f32s() {
            Some(s) => f(s),
            None => {
                self.mem.add(Tag::Scratch, w.numel() * 4);
                let v = w.to_f32_vec();
                let r = f(&v);
                self.mem.sub(Tag::Scratch, w.numel() * 4);
                r
            }
        }
    }

    /// out[m, n] = x[m, k] · w[n, k]^T over plain slices.
    pub fn matmul_slices(
        &self,
        x: &[f32],
        w: &[f32],
        out: &mut [f32],
        m: usize,
        n: usize,
        k: usize,
    ) {
        assert_eq!(x.len(), m * k);
        assert_eq!(w.len(), n * k);
        assert_eq!(out.len(), m * n);
        if m == 0 || n == 0 {
            return;
        }
        if self.matmul == Matmul::Bf16 {
            return self.matmul_bf16(x, w, out, m, n, k);
        }
        // SAFETY: the strides describe exactly the asserted slice sizes.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                self.parallelism(m, n, k),
            );
        }
    }
}

impl CpuBackend {
    fn matmul_bf16(&self, x: &[f32], w: &[f32], out: &mut [f32], m: usize, n: usize, k: usize) {
        let scratch = gemm_bf16::scratch_bytes(m, k, self.threads);
        self.mem.add(Tag::Scratch, scratch);
        let pairs = gemm_bf16::to_pairs(x, m, k);
        gemm_bf16::matmul(&pairs, w, out, m, n, k, self.threads);
        self.mem.sub(Tag::Scratch, scratch);
    }
}

/// Dot product over 16 partial sums: a single running sum is a dependency chain the compiler
/// may not reorder, so it would stay scalar; 16 lanes map onto vector registers.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let n = a.len().min(b.len()) / LANES * LANES;
    let mut acc = [0.0f32; LANES];
    for (x, y) in a[..n].chunks_exact(LANES).zip(b[..n].chunks_exact(LANES)) {
        for ((s, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    let tail: f32 = a[n..].iter().zip(&b[n..]).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ss + eps).sqrt()
}

/// The rows that carry a target (>= 0), checking there is one target per row of a
/// `hidden_rows`-row batch and that every target is inside the vocabulary.
pub fn target_rows(targets: &[i32], hidden_rows: usize, vocab: usize) -> Result<Vec<usize>> {
    ensure!(
        targets.len() == hidden_rows,
        "target_logprobs: one target per row"
    );
    let rows: Vec<usize> = (0..targets.len()).filter(|&r| targets[r] >= 0).collect();
    if let Some(&r) = rows.iter().find(|&&r| targets[r] as usize >= vocab) {
        anyhow::bail!(
            "target id {} is outside the vocabulary of {vocab} tokens",
            targets[r]
        );
    }
    Ok(rows)
}

/// The listed rows of an activation, back to back.
pub fn gather_rows(a: &CpuAct, rows: &[usize]) -> Result<Vec<f32>> {
    let d = a.cols;
    let mut x = Vec::with_capacity(rows.len() * d);
    for &r in rows {
        ensure!(r < a.rows, "logits_rows: row {r} out of range");
        x.extend_from_slice(&a.data[r * d..(r + 1) * d]);
    }
    Ok(x)
}

/// log-sum-exp of a row: exponentials in f32 against the row's maximum, summed in f64. Both
/// reductions run over 16 partial lanes so they vectorize.
pub fn logsumexp(row: &[f32]) -> f32 {
    const LANES: usize = 16;
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    let mut mx = [f32::NEG_INFINITY; LANES];
    for c in chunks.clone() {
        for (m, &v) in mx.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let m = mx
        .iter()
        .chain(tail)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let mut acc = [0.0f64; LANES];
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += math::exp(v - m) as f64;
        }
    }
    let s: f64 =
        acc.iter().sum::<f64>() + tail.iter().map(|&v| math::exp(v - m) as f64).sum::<f64>();
    m + s.ln() as f32
}

impl Backend for CpuBackend {
    type Act = CpuAct;
    type Weight = HostTensor;

    fn name(&self) -> String {
        format!(
            "cpu ({} threads, {} matmul)",
            self.threads,
            self.matmul.name()
        )
    }

    fn supports_packed(&self) -> bool {
        true
    }

    fn alloc(&self, rows: usize, cols: usize, tag: Tag) -> Result<CpuAct> {
        self.mem.add(tag, rows * cols * 4);
        Ok(CpuAct {
            data: vec![0.0; rows * cols],
            rows,
            cols,
            tag,
            mem: self.mem.clone(),
        })
    }

    fn act_rows(&self, a: &CpuAct) -> usize {
        a.rows
    }

    fn to_host(&self, a: &CpuAct) -> Result<Vec<f32>> {
        Ok(a.data.clone())
    }

    fn from_host(&self, data: &[f32], rows: usize, cols: usize, tag: Tag) -> Result<CpuAct> {
        ensure!(
            data.len() == rows * cols,
            "from_host: {} values for {rows}x{cols}",
            data.len()
        );
        let mut a = self.alloc(rows, cols, tag)?;
        a.data.copy_from_slice(data);
        Ok(a)
    }

    fn embed(&self, table: &HostTensor, ids: &[u32], out: &mut CpuAct) -> Result<()> {
        let d = table.shape[1];
        let vocab = table.shape[0];
        ensure!(
            out.cols == d && out.rows == ids.len(),
            "embed: output shape"
        );
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            anyhow::bail!("token id {bad} is outside the vocabulary of {vocab} tokens");
        }
        out.data
            .par_chunks_mut(d)
            .zip(ids.par_iter())
            .for_each(|(row, &id)| {
                table.read_f32_range(id as usize * d, row);
            });
        Ok(())
    }

    fn rmsnorm(&self, x: &CpuAct, w: &HostTensor, eps: f32, out: &mut CpuAct) -> Result<()> {
        let d = x.cols;
        self.with_f32(w, |w| {
            out.data
                .par_chunks_mut(d)
                .zip(x.data.par_chunks(d))
                .for_each(|(o, xr)| {
                    let s = rms_scale(xr, eps);
                    for ((o, &v), &g) in o.iter_mut().zip(xr).zip(w) {
                        *o = v * s * g;
                    }
                });
        });
        Ok(())
    }

    fn add_rmsnorm(
        &self,
        residual: &mut CpuAct,
        delta: &CpuAct,
        w: &HostTensor,
        eps: f32,
        out: &mut CpuAct,
    ) -> Result<()> {
        let d = residual.cols;
        self.with_f32(w, |w| {
            residual
                .data
                .par_chunks_mut(d)
                .zip(delta.data.par_chunks(d))
                .zip(out.data.par_chunks_mut(d))
                .for_each(|((r, dl), o)| {
                    for (r, &v) in r.iter_mut().zip(dl) {
                        *r += v;
                    }
                    let s = rms_scale(r, eps);
                    for ((o, &v), &g) in o.iter_mut().zip(r.iter()).zip(w) {
                        *o = v * s * g;
                    }
                });
        });
        Ok(())
    }

    fn matmul(&self, x: &CpuAct, w: &HostTensor, out: &mut CpuAct) -> Result<()> {
        let (n, k) =
            super::check_matmul(&w.name, &w.shape, (x.rows, x.cols), (out.rows, out.cols))?;
        self.with_f32(w, |wf| {
            self.matmul_slices(&x.data, wf, &mut out.data, x.rows, n, k)
        });
        Ok(())
    }

    fn rope(
        &self,
        x: &mut CpuAct,
        n_heads: usize,
        layout: &SeqLayout,
        inv_freq: &[f32],
    ) -> Result<()> {
        let hd = x.cols / n_heads;
        let half = hd / 2;
        ensure!(
            inv_freq.len() == half,
            "rope: {} frequencies for head_dim {hd}",
            inv_freq.len()
        );
        ensure!(
            x.rows == layout.rows(),
            "rope: {} rows for a layout of {}",
            x.rows,
            layout.rows()
        );
        x.data
            .par_chunks_mut(x.cols)
            .enumerate()
            .for_each(|(r, row)| {
                let pos = (layout.q_offset + layout.query_row(r).1) as f32;
                for (i, &f) in inv_freq.iter().enumerate() {
                    let (s, c) = (pos * f).sin_cos();
                    for h in 0..n_heads {
                        let a = row[h * hd + i];
                        let b = row[h * hd + i + half];
                        row[h * hd + i] = a * c - b * s;
                        row[h * hd + i + half] = b * c + a * s;
                    }
                }
            });
        Ok(())
    }

    fn attention(
        &self,
        q: &CpuAct,
        k: &CpuAct,
        v: &CpuAct,
        shape: AttnShape,
        layout: &SeqLayout,
        out: &mut CpuAct,
    ) -> Result<()> {
        let AttnShape {
            n_heads,
            n_kv_heads,
            head_dim: hd,
        } = shape;
        let group = n_heads / n_kv_heads;
        let (qc, kc) = (n_heads * hd, n_kv_heads * hd);
        ensure!(
            q.cols == qc && k.cols == kc && v.cols == kc && out.cols == qc,
            "attention: shapes"
        );
        ensure!(
            q.rows == layout.rows(),
            "attention: {} query rows for a layout of {}",
            q.rows,
            layout.rows()
        );
        let scale = 1.0 / (hd as f32).sqrt();
        out.data
            .par_chunks_mut(qc)
            .enumerate()
            .for_each(|(r, orow)| {
                let (b, t) = layout.query_row(r);
                let visible = (t + layout.q_offset + 1).min(layout.kv_valid[b]);
                let mut scores = vec![0.0f32; visible];
                for h in 0..n_heads {
                    let kh = h / group;
                    let qh = &q.data[r * qc + h * hd..r * qc + (h + 1) * hd];
                    let mut m = f32::NEG_INFINITY;
                    for (j, s) in scores.iter_mut().enumerate() {
                        let kr = &k.data[layout.key_row(b, j) * kc + kh * hd..][..hd];
                        *s = dot(qh, kr) * scale;
                        m = m.max(*s);
                    }
                    let mut denom = 0.0f32;
                    for s in scores.iter_mut() {
                        *s = math::exp(*s - m);
                    }
                    for s in &scores {
                        denom += s;
                    }
                    let o = &mut orow[h * hd..(h + 1) * hd];
                    o.fill(0.0);
                    for (j, &p) in scores.iter().enumerate() {
                        let vr = &v.data[layout.key_row(b, j) * kc + kh * hd..][..hd];
                        for (o, &vv) in o.iter_mut().zip(vr) {
                            *o += p * vv;
                        }
                    }
                    let inv = if denom > 0.0 { 1.0 / denom } else { 0.0 };
                    o.iter_mut().for_each(|x| *x *= inv);
                }
            });
        Ok(())
    }

    fn swiglu(&self, gate: &mut CpuAct, up: &CpuAct) -> Result<()> {
        ensure!(gate.data.len() == up.data.len(), "swiglu: shapes");
        gate.data
            .par_chunks_mut(4096)
            .zip(up.data.par_chunks(4096))
            .for_each(|(g, u)| {
                for (g, &u) in g.iter_mut().zip(u) {
                    *g = math::silu(*g) * u;
                }
            });
        Ok(())
    }

    fn target_logprobs(
        &self,
        hidden: &CpuAct,
        head: &HostTensor,
        targets: &[i32],
    ) -> Result<Vec<f32>> {
        let (vocab, d) = (head.shape[0], head.shape[1]);
        let rows = target_rows(targets, hidden.rows, vocab)?;
        let mut out = vec![0.0f32; targets.len()];
        self.with_f32(head, |w| {
            let chunk = LOGIT_CHUNK_ROWS.min(rows.len().max(1));
            self.mem.add(Tag::Scratch, chunk * (vocab + d) * 4);
            let mut logits = vec![0.0f32; chunk * vocab];
            let mut x = vec![0.0f32; chunk * d];
            for rs in rows.chunks(chunk) {
                for (i, &r) in rs.iter().enumerate() {
                    x[i * d..(i + 1) * d].copy_from_slice(&hidden.data[r * d..(r + 1) * d]);
                }
                let m = rs.len();
                self.matmul_slices(&x[..m * d], w, &mut logits[..m * vocab], m, vocab, d);
                let lp: Vec<f32> = logits[..m * vocab]
                    .par_chunks(vocab)
                    .zip(rs.par_iter())
                    .map(|(row, &r)| row[targets[r] as usize] - logsumexp(row))
                    .collect();
                for (&r, l) in rs.iter().zip(lp) {
                    out[r] = l;
                }
            }
            self.mem.sub(Tag::Scratch, chunk * (vocab + d) * 4);
        });
        Ok(out)
    }

    fn logits_rows(&self, hidden: &CpuAct, head: &HostTensor, rows: &[usize]) -> Result<Vec<f32>> {
        let (vocab, d) = (head.shape[0], head.shape[1]);
        let x = gather_rows(hidden, rows)?;
        let mut out = vec![0.0f32; rows.len() * vocab];
        self.with_f32(head, |w| {
            self.matmul_slices(&x, w, &mut out, rows.len(), vocab, d)
        });
        Ok(out)
    }

    fn copy_rows(&self, src: &CpuAct, dst: &mut CpuAct, dst_row: usize) -> Result<()> {
        ensure!(
            src.cols == dst.cols && dst_row + src.rows <= dst.rows,
            "copy_rows: shapes"
        );
        let c = src.cols;
        dst.data[dst_row * c..(dst_row + src.rows) * c].copy_from_slice(&src.data);
        Ok(())
    }
}
