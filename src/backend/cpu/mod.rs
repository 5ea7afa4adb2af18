//! The CPU reference backend: f32 math over f32/f16/bf16 weights, GEMMs through the `gemm`
//! crate, everything else plain Rust over rows (rayon). This is the oracle every CUDA kernel is
//! checked against, so it favours clarity; it is still fast enough to be a product on its own.
//! Opt-in, `Matmul::Bf16` runs the GEMMs with bf16 inputs and f32 accumulation (the GPU's
//! contract): at twice the f32 rate on CPUs with AVX512-BF16, and on the AMX matrix unit where
//! the CPU has one (`Bf16Kernel`).

pub mod gemm_amx;
pub mod gemm_bf16;
pub mod head;
pub mod math;
pub mod simd;

use super::mem::{MemCounters, Tag};
use super::{AttnShape, Backend, SeqLayout};
use crate::model::HostTensor;
use anyhow::{ensure, Result};
use gemm_bf16::WeightRows;
use rayon::prelude::*;
use simd::wide;
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

/// The kernel behind `Matmul::Bf16`: both round the inputs to bf16 and accumulate in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// `vdpbf16ps` on AVX512-BF16 vector registers (`gemm_bf16`).
    Avx512,
    /// `tdpbf16ps` on AMX tiles (`gemm_amx`), for products of at least `AMX_MIN_ROWS` rows;
    /// thinner ones stay on `Avx512`, where padding to whole tiles would waste the unit.
    Amx,
}

/// The fewest rows of x a GEMM needs for `Bf16Kernel::Amx` to take it.
pub const AMX_MIN_ROWS: usize = 16;

impl Bf16Kernel {
    /// AMX where the CPU and the OS offer it, AVX512-BF16 elsewhere.
    pub fn best() -> Self {
        if gemm_amx::available() {
            Bf16Kernel::Amx
        } else {
            Bf16Kernel::Avx512
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Bf16Kernel::Avx512 => "avx512-bf16",
            Bf16Kernel::Amx => "amx-bf16",
        }
    }
}

pub struct CpuBackend {
    pub mem: Arc<MemCounters>,
    threads: usize,
    matmul: Matmul,
    bf16_kernel: Bf16Kernel,
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
            bf16_kernel: Bf16Kernel::best(),
        }
    }

    /// This backend with its bf16 GEMMs on `kernel` (benchmarks and tests compare the two);
    /// refused where the CPU lacks it.
    pub fn with_bf16_kernel(self, kernel: Bf16Kernel) -> Result<Self> {
        ensure!(
            kernel != Bf16Kernel::Amx || gemm_amx::available(),
            "the AMX bf16 kernel needs a CPU with AMX-BF16 and the OS's tile permission"
        );
        Ok(CpuBackend {
            bf16_kernel: kernel,
            ..self
        })
    }

    pub fn bf16_kernel(&self) -> Bf16Kernel {
        self.bf16_kernel
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
        if self.matmul != Matmul::Bf16 {
            return self.matmul_slices_f32(x, w, out, m, n, k, false);
        }
        if nonempty_product(x, w, out, m, n, k) {
            self.matmul_bf16(x, WeightRows::Stored(w), out, m, n, k);
        }
    }

    /// Whether the GEMMs pack w a tile of rows at a time (`Matmul::Bf16`), so that
    /// `matmul_weight_rows` never holds the whole of a built w.
    pub fn packs_weight_tiles(&self) -> bool {
        self.matmul == Matmul::Bf16
    }

    /// `matmul` for a w of `w_shape` [n][k] that is not a tensor: f32 rows in memory, or rows
    /// that `build(n0, rows)` writes a tile at a time, each tile only while the GEMM packs it
    /// (see `WeightRows::Built`; those need `packs_weight_tiles`). Errors name the weight.
    pub fn matmul_weight_rows(
        &self,
        x: &CpuAct,
        name: &str,
        w_shape: &[usize],
        w: WeightRows,
        out: &mut CpuAct,
    ) -> Result<()> {
        let (n, k) = super::check_matmul(name, w_shape, (x.rows, x.cols), (out.rows, out.cols))?;
        match w {
            WeightRows::Stored(rows) => ensure!(
                rows.len() == n * k,
                "{name}: {} values for a [{n}, {k}] weight",
                rows.len()
            ),
            WeightRows::Built(_) => ensure!(
                self.packs_weight_tiles(),
                "{name}: a weight built by tiles needs the bf16 GEMM"
            ),
        }
        self.matmul_rows(&x.data, w, &mut out.data, x.rows, n, k);
        Ok(())
    }

    /// out[m, n] = x[m, k] · w[n, k]^T over plain slices, for either kind of w. Panics on a
    /// built w unless `packs_weight_tiles`.
    pub fn matmul_rows(
        &self,
        x: &[f32],
        w: WeightRows,
        out: &mut [f32],
        m: usize,
        n: usize,
        k: usize,
    ) {
        match w {
            WeightRows::Stored(w) => self.matmul_slices(x, w, out, m, n, k),
            WeightRows::Built(_) => {
                assert!(
                    self.packs_weight_tiles(),
                    "a weight built by tiles needs the bf16 GEMM"
                );
                assert_eq!((x.len(), out.len()), (m * k, m * n));
                if m > 0 && n > 0 {
                    self.matmul_bf16(x, w, out, m, n, k);
                }
            }
        }
    }

    /// out[m, n] = x[m, k] · w[n, k]^T, or out += that product when `accumulate`, in f32
    /// whatever the matmul mode: for thin products (a low-rank side term, k or n = rank)
    /// where converting to bf16 pairs and packing cost more than the product itself.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_slices_f32(
        &self,
        x: &[f32],
        w: &[f32],
        out: &mut [f32],
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
    ) {
        if !nonempty_product(x, w, out, m, n, k) {
            return;
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
                accumulate,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                if accumulate { 1.0f32 } else { 0.0f32 },
                1.0f32,
                false,
                false,
                false,
                self.parallelism(m, n, k),
            );
        }
    }
}

/// Checks that the slices of out[m, n] = x[m, k] · w[n, k]^T have their shapes' lengths, and
/// says whether there is anything to compute.
fn nonempty_product(x: &[f32], w: &[f32], out: &[f32], m: usize, n: usize, k: usize) -> bool {
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    assert_eq!(out.len(), m * n);
    m > 0 && n > 0
}

impl CpuBackend {
    fn matmul_bf16(&self, x: &[f32], w: WeightRows, out: &mut [f32], m: usize, n: usize, k: usize) {
        if self.bf16_kernel == Bf16Kernel::Amx && m >= AMX_MIN_ROWS {
            let scratch = gemm_amx::scratch_bytes(m, k, self.threads, w);
            self.mem.add(Tag::Scratch, scratch);
            gemm_amx::matmul(x, w, out, m, n, k, self.threads);
            self.mem.sub(Tag::Scratch, scratch);
            return;
        }
        let scratch = gemm_bf16::scratch_bytes(m, k, self.threads, w);
        self.mem.add(Tag::Scratch, scratch);
        let pairs = gemm_bf16::to_pairs(x, m, k);
        gemm_bf16::matmul(&pairs, w, out, m, n, k, self.threads);
        self.mem.sub(Tag::Scratch, scratch);
    }
}

/// Partial sums per reduction (and keys or value columns per attention chunk): a single
/// running sum is a dependency chain the compiler may not reorder, 16 lanes fill a vector.
const LANES: usize = 16;

/// 1 / sqrt(mean(x^2) + eps), the sum over 16 partial lanes so that it vectorizes.
#[inline(always)]
fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    let mut acc = [0.0f32; LANES];
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    let ss = (acc.iter().sum::<f32>() + tail) / x.len() as f32;
    1.0 / (ss + eps).sqrt()
}

wide! {
    /// Rotates the pairs (head[i], head[i + half]) of one head by the angles whose sines and
    /// cosines are given (RoPE in the rotate-half layout of HF LLaMA).
    fn rotate_half(head: &mut [f32], sin: &[f32], cos: &[f32]) {
        let (lo, hi) = head.split_at_mut(sin.len());
        for (((a, b), &s), &c) in lo.iter_mut().zip(hi.iter_mut()).zip(sin).zip(cos) {
            let (x, y) = (*a, *b);
            *a = x * c - y * s;
            *b = y * c + x * s;
        }
    }
}

wide! {
    /// One row of RMSNorm: o = x * rms_scale(x) * g.
    fn rmsnorm_row(o: &mut [f32], x: &[f32], g: &[f32], eps: f32) {
        let s = rms_scale(x, eps);
        for ((o, &v), &g) in o.iter_mut().zip(x).zip(g) {
            *o = v * s * g;
        }
    }
}

wide! {
    /// One row of the residual add and the RMSNorm after it: r += delta; o = rmsnorm(r).
    fn add_rmsnorm_row(r: &mut [f32], delta: &[f32], o: &mut [f32], g: &[f32], eps: f32) {
        for (r, &v) in r.iter_mut().zip(delta) {
            *r += v;
        }
        let s = rms_scale(r, eps);
        for ((o, &v), &g) in o.iter_mut().zip(r.iter()).zip(g) {
            *o = v * s * g;
        }
    }
}

wide! {
    /// gate <- silu(gate) * up over a slice.
    fn swiglu_slice(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = math::silu(*g) * u;
        }
    }
}

/// A raw pointer shared by parallel tasks that write disjoint parts of one buffer (attention
/// heads, bf16 GEMM column tiles).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// One attention work item: the query heads of kv head `kh` over the rows of sequence `b`.
struct AttnTask<'a> {
    q: &'a CpuAct,
    k: &'a CpuAct,
    v: &'a CpuAct,
    /// out.data: [rows][n_heads * head_dim]; each task writes its own heads' columns.
    out: *mut f32,
    shape: AttnShape,
    layout: &'a SeqLayout,
    b: usize,
    kh: usize,
}

/// acc[c][l] = sum over d of a[d] * rows[d * stride + 16 c + l], for C chunks of 16 columns:
/// C independent accumulators stay in registers across the whole sum.
#[inline(always)]
fn weighted_rows<const C: usize>(a: &[f32], rows: &[f32], stride: usize) -> [[f32; LANES]; C] {
    let mut acc = [[0.0f32; LANES]; C];
    for (d, &ad) in a.iter().enumerate() {
        let row = &rows[d * stride..];
        for (c, acc) in acc.iter_mut().enumerate() {
            let x: &[f32; LANES] = row[c * LANES..(c + 1) * LANES].try_into().unwrap();
            for (s, &x) in acc.iter_mut().zip(x) {
                *s += ad * x;
            }
        }
    }
    acc
}

/// out[16 c + l] = sum over d of a[d] * rows[d * stride + 16 c + l] for `chunks` chunks.
#[inline(always)]
fn weighted_sum(a: &[f32], rows: &[f32], stride: usize, chunks: usize, out: &mut [f32]) {
    let mut c0 = 0;
    while c0 < chunks {
        let at = c0 * LANES;
        let (r, o) = (&rows[at..], &mut out[at..]);
        c0 += match chunks - c0 {
            1 => put(o, weighted_rows::<1>(a, r, stride)),
            2 => put(o, weighted_rows::<2>(a, r, stride)),
            3 => put(o, weighted_rows::<3>(a, r, stride)),
            _ => put(o, weighted_rows::<4>(a, r, stride)),
        };
    }
}

/// The largest value, over 16 partial lanes so that it vectorizes (NaN-free input).
#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let chunks = x.chunks_exact(LANES);
    let mut acc = [f32::NEG_INFINITY; LANES];
    for c in chunks.clone() {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&acc)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// The sum over 16 partial lanes, so that it vectorizes.
#[inline(always)]
fn sum_lanes(x: &[f32]) -> f32 {
    let chunks = x.chunks_exact(LANES);
    let mut acc = [0.0f32; LANES];
    for c in chunks.clone() {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[inline(always)]
fn put<const C: usize>(out: &mut [f32], acc: [[f32; LANES]; C]) -> usize {
    for (o, a) in out.chunks_exact_mut(LANES).zip(acc) {
        o.copy_from_slice(&a);
    }
    C
}

wide! {
    /// Causal attention for one task. K is transposed into [head_dim][keys] once per task so
    /// that both products (q . K^T and p . V) run over contiguous rows of 16 keys or 16 value
    /// columns, with no horizontal sums.
    fn attention_task(t: &AttnTask) {
        let AttnTask { q, k, v, shape, layout, b, kh, .. } = *t;
        let hd = shape.head_dim;
        let group = shape.n_heads / shape.n_kv_heads;
        let (qc, kc) = (q.cols, k.cols);
        let scale = 1.0 / (hd as f32).sqrt();
        let n_keys = layout.kv_valid[b];
        // A sequence's keys are consecutive rows in every layout.
        let first_key = layout.key_row(b, 0);
        let padded_keys = n_keys.div_ceil(LANES) * LANES;
        let mut kt = vec![0.0f32; hd * padded_keys];
        for j in 0..n_keys {
            let kr = &k.data[(first_key + j) * kc + kh * hd..][..hd];
            for (d, &x) in kr.iter().enumerate() {
                kt[d * padded_keys + j] = x;
            }
        }
        // V of this head, zero-padded to whole 16-column chunks.
        let padded_hd = hd.div_ceil(LANES) * LANES;
        let mut vh = vec![0.0f32; n_keys * padded_hd];
        for j in 0..n_keys {
            vh[j * padded_hd..j * padded_hd + hd]
                .copy_from_slice(&v.data[(first_key + j) * kc + kh * hd..][..hd]);
        }
        let mut scores = vec![0.0f32; padded_keys];
        let mut o = vec![0.0f32; padded_hd];
        let rows = layout.query_rows(b);
        for r in rows.clone() {
            let visible = (r - rows.start + layout.q_offset + 1).min(n_keys);
            for h in kh * group..(kh + 1) * group {
                let qh = &q.data[r * qc + h * hd..][..hd];
                weighted_sum(qh, &kt, padded_keys, visible.div_ceil(LANES), &mut scores);
                let s = &mut scores[..visible];
                s.iter_mut().for_each(|x| *x *= scale);
                let m = max_lanes(s);
                s.iter_mut().for_each(|x| *x = math::exp(*x - m));
                let denom = sum_lanes(s);
                let inv = if denom > 0.0 { 1.0 / denom } else { 0.0 };
                if visible == 0 {
                    // A row that sees no key (an empty sequence) gets zeros, as on the GPU.
                    o.fill(0.0);
                } else {
                    weighted_sum(s, &vh, padded_hd, padded_hd / LANES, &mut o);
                }
                // SAFETY: row r, columns of head h: written by this task only (see AttnTask).
                let dst = unsafe { std::slice::from_raw_parts_mut(t.out.add(r * qc + h * hd), hd) };
                for (d, &x) in dst.iter_mut().zip(&o) {
                    *d = x * inv;
                }
            }
        }
    }
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

wide! {
    /// A row's maximum m and the sum of exp(x - m) over it: exponentials in f32, summed in
    /// f64. Both reductions run over 16 partial lanes so they vectorize.
    pub fn max_sum_exp(row: &[f32]) -> (f32, f64) {
        let m = max_lanes(row);
        let chunks = row.chunks_exact(LANES);
        let tail = chunks.remainder();
        let mut acc = [0.0f64; LANES];
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += math::exp(v - m) as f64;
            }
        }
        let s: f64 =
            acc.iter().sum::<f64>() + tail.iter().map(|&v| math::exp(v - m) as f64).sum::<f64>();
        (m, s)
    }
}

/// log-sum-exp of a row.
pub fn logsumexp(row: &[f32]) -> f32 {
    let (m, s) = max_sum_exp(row);
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
                .for_each(|(o, xr)| rmsnorm_row(o, xr, w, eps));
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
                .for_each(|((r, dl), o)| add_rmsnorm_row(r, dl, o, w, eps));
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
        // The angles depend only on (position, frequency): one table of them per call instead
        // of one sin_cos per row, with the same values.
        let pos = |r: usize| layout.q_offset + layout.query_row(r).1;
        let first = (0..x.rows).map(pos).min().unwrap_or(0);
        let last = (0..x.rows).map(pos).max().unwrap_or(0);
        let (mut sin, mut cos) = (Vec::new(), Vec::new());
        for p in first..=last {
            for &f in inv_freq {
                let (s, c) = (p as f32 * f).sin_cos();
                sin.push(s);
                cos.push(c);
            }
        }
        x.data
            .par_chunks_mut(x.cols)
            .enumerate()
            .for_each(|(r, row)| {
                let at = (pos(r) - first) * half;
                let (sin, cos) = (&sin[at..at + half], &cos[at..at + half]);
                for head in row.chunks_exact_mut(hd) {
                    rotate_half(head, sin, cos);
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
        // Each running task holds its head's K^T, V and a row of scores and of output.
        let keys = layout.kv_valid.iter().copied().max().unwrap_or(0);
        let (pk, phd) = (keys.div_ceil(LANES) * LANES, hd.div_ceil(LANES) * LANES);
        let scratch = self.threads.max(1) * 4 * (hd * pk + keys * phd + pk + phd);
        self.mem.add(Tag::Scratch, scratch);
        let out_ptr = SendPtr(out.data.as_mut_ptr());
        (0..layout.batch * n_kv_heads)
            .into_par_iter()
            .for_each(|task| {
                let t = AttnTask {
                    q,
                    k,
                    v,
                    out: out_ptr.get(),
                    shape,
                    layout,
                    b: task / n_kv_heads,
                    kh: task % n_kv_heads,
                };
                attention_task(&t);
            });
        self.mem.sub(Tag::Scratch, scratch);
        Ok(())
    }

    fn swiglu(&self, gate: &mut CpuAct, up: &CpuAct) -> Result<()> {
        ensure!(gate.data.len() == up.data.len(), "swiglu: shapes");
        gate.data
            .par_chunks_mut(4096)
            .zip(up.data.par_chunks(4096))
            .for_each(|(g, u)| swiglu_slice(g, u));
        Ok(())
    }

    fn target_logprobs(
        &self,
        hidden: &CpuAct,
        head: &HostTensor,
        targets: &[i32],
    ) -> Result<Vec<f32>> {
        let (vocab, d) = (head.shape[0], head.shape[1]);
        self.with_f32(head, |w| {
            let mut blocks = head::PlainHead { w, d };
            head::target_logprobs(
                self,
                hidden,
                targets,
                vocab,
                head::HEAD_BLOCK_ROWS,
                &mut blocks,
            )
        })
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

    /// Mapped tensors count at their full size, as the pages a forward reads (and a ZO update
    /// copies on write) are all of them.
    fn adopt_weights(&self, weights: &crate::model::LlamaWeights<HostTensor>) {
        self.mem.add(Tag::Weights, weights.byte_size());
    }

    fn release_weights(&self, weights: &crate::model::LlamaWeights<HostTensor>) {
        self.mem.sub(Tag::Weights, weights.byte_size());
    }
}
