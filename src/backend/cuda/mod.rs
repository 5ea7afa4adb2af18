//! The CUDA backend: handwritten kernels (csrc/, embedded as one fatbin and loaded through the
//! driver API) plus cuBLAS GEMMs, on one stream, with every allocation tagged and counted.
//!
//! Storage and precision:
//! - Activations (`CudaAct`) are f32 on the device, like the CPU backend's, so every op has the
//!   same f32 semantics as its CPU twin.
//! - Weight matrices (2-D tensors) are bf16 by default (or f32); vectors (the RMSNorm gains)
//!   are always stored in f32: they are tiny, and a bf16 gain near 1.0 has a resolution of
//!   2^-7, far coarser than a zeroth-order perturbation.
//! - A linear with bf16 weights rounds its input to bf16 in a scratch buffer (cuBLAS needs both
//!   operands in one type), multiplies on tensor cores with f32 accumulation and writes f32.
//!   With f32 weights the GEMM is plain f32 (no TF32), matching the CPU to ~1e-6.
//!
//! The driver library is loaded at run time: a binary built with this backend runs on machines
//! without CUDA and `cuda_available()` says why CUDA cannot be used.

pub mod alloc;
pub mod context;
#[doc(hidden)]
pub mod emulator;
mod fused;
pub mod gemm;
pub mod kernels;
mod paired;
mod weights;
mod zo;

pub use alloc::DevBuf;
pub use context::{cuda_available, driver_version, kernels_embedded};
pub use fused::{CudaFusedHook, CUDA_HEAD_BLOCK_ROWS};
pub use gemm::GemmArgs;
pub use kernels::PhiloxKey;
pub use paired::CudaPairedHook;

use super::mem::{MemCounters, Tag};
use super::{AttnShape, Backend, SeqLayout};
use crate::model::DType;
use anyhow::{bail, ensure, Result};
use context::Device;
use std::sync::{Arc, Mutex};

/// Bytes of f32 logits computed at once by the LM head (bounds the [rows x vocab] scratch).
pub const LOGIT_CHUNK_BYTES: usize = 64 << 20;

/// An activation on the device: row-major f32 [rows, cols], accounted while alive.
pub struct CudaAct {
    buf: DevBuf,
    pub rows: usize,
    pub cols: usize,
}

impl CudaAct {
    pub fn buf(&self) -> &DevBuf {
        &self.buf
    }
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn ptr(&self) -> u64 {
        self.buf.ptr()
    }
}

/// A parameter tensor on the device: bf16 or f32, HF shape ([out, in] for matrices).
pub struct CudaWeight {
    buf: DevBuf,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub name: String,
}

impl CudaWeight {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn buf(&self) -> &DevBuf {
        &self.buf
    }
    fn ptr(&self) -> u64 {
        self.buf.ptr()
    }
}

/// Small host arrays kept on the device while they stay the same (RoPE frequencies, the valid
/// lengths of a batch), so that a forward uploads them once rather than once per layer.
#[derive(Default)]
struct Uploads {
    inv_freq: Option<(Vec<u32>, DevBuf)>,
    kv_valid: Option<(Vec<i32>, DevBuf)>,
}

/// The CUDA backend. Cloning is cheap and shares the device, stream and counters.
#[derive(Clone)]
pub struct CudaBackend {
    dev: Arc<Device>,
    uploads: Arc<Mutex<Uploads>>,
    /// The passes gathered inside `ZoBackend::batch_passes` (src/backend/cuda/zo.rs).
    pass_batch: Arc<Mutex<Option<zo::PassBatch>>>,
}

fn elt(d: DType) -> usize {
    d.size()
}

impl CudaBackend {
    /// Opens device `ordinal` with fresh memory counters.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_counters(ordinal, Arc::new(MemCounters::default()))
    }

    /// Opens device `ordinal`, counting its allocations in `mem`.
    pub fn with_counters(ordinal: usize, mem: Arc<MemCounters>) -> Result<Self> {
        Ok(CudaBackend {
            dev: Arc::new(Device::new(ordinal, mem)?),
            uploads: Arc::default(),
            pass_batch: Arc::default(),
        })
    }

    pub fn mem(&self) -> &Arc<MemCounters> {
        &self.dev.mem
    }

    /// (free, total) bytes of device memory according to the driver.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.dev.mem_info()
    }

    /// Kernels and cuBLAS GEMMs this backend has issued so far.
    pub fn launch_counts(&self) -> (u64, u64) {
        self.dev.launched.get()
    }

    pub fn device_name(&self) -> &str {
        &self.dev.name
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.dev.capability
    }

    /// Waits for all queued work; reports asynchronous errors.
    pub fn synchronize(&self) -> Result<()> {
        self.dev.sync()
    }

    /// Milliseconds of device time taken by the work `f` queues (events around it).
    pub fn time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<f32> {
        use cudarc::driver::sys::CUevent_flags;
        let ctx = &self.dev.ctx;
        let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        start.record(&self.dev.stream)?;
        f()?;
        end.record(&self.dev.stream)?;
        Ok(start.elapsed_ms(&end)?)
    }

    /// A raw device buffer of `bytes`, counted under `tag`.
    pub fn alloc_buf(&self, bytes: usize, tag: Tag, what: &str) -> Result<DevBuf> {
        self.dev.alloc(bytes, tag, || what.to_string())
    }

    /// A device buffer holding `data`.
    pub fn buf_from_host<T: bytemuck::Pod>(
        &self,
        data: &[T],
        tag: Tag,
        what: &str,
    ) -> Result<DevBuf> {
        let buf = self.alloc_buf(std::mem::size_of_val(data), tag, what)?;
        self.dev.htod(data, &buf, 0)?;
        Ok(buf)
    }

    /// The first `n` values of type T in `buf` (waits for queued work).
    pub fn buf_to_host<T: bytemuck::Pod>(&self, buf: &DevBuf, n: usize) -> Result<Vec<T>> {
        let mut v = vec![T::zeroed(); n];
        self.dev.dtoh(buf, 0, &mut v)?;
        Ok(v)
    }

    /// Copies `bytes` from the start of `src` to the start of `dst`.
    pub fn copy_buf(&self, src: &DevBuf, dst: &mut DevBuf, bytes: usize) -> Result<()> {
        ensure!(
            bytes <= src.bytes() && bytes <= dst.bytes(),
            "copy_buf: {bytes} bytes between buffers of {} and {}",
            src.bytes(),
            dst.bytes()
        );
        self.dev.dtod(src.ptr(), dst.ptr(), bytes)
    }

    /// dst[i] = bf16(src[i]) (nearest even) for n elements.
    pub fn f32_to_bf16(&self, src: &DevBuf, dst: &mut DevBuf, n: usize) -> Result<()> {
        ensure!(
            src.bytes() >= n * 4 && dst.bytes() >= n * 2,
            "f32_to_bf16: buffers too small"
        );
        kernels::f32_to_bf16(&self.dev, src.ptr(), dst.ptr(), n)
    }

    /// dst[i] = f32(src[i]) for n elements.
    pub fn bf16_to_f32(&self, src: &DevBuf, dst: &mut DevBuf, n: usize) -> Result<()> {
        ensure!(
            src.bytes() >= n * 2 && dst.bytes() >= n * 4,
            "bf16_to_f32: buffers too small"
        );
        kernels::bf16_to_f32(&self.dev, src.ptr(), dst.ptr(), n)
    }

    /// out[i] = shift + scale * z(start + i) for n elements of `dtype` (shift 0: scale * z),
    /// z the Philox normals of `key` (bit-identical to `rng::Philox::normal`).
    #[allow(clippy::too_many_arguments)]
    pub fn fill_normal(
        &self,
        out: &mut DevBuf,
        dtype: DType,
        n: usize,
        key: PhiloxKey,
        start: u64,
        scale: f32,
        shift: f32,
    ) -> Result<()> {
        ensure!(
            out.bytes() >= n * elt(dtype),
            "fill_normal: buffer too small"
        );
        kernels::fill_normal(&self.dev, out.ptr(), dtype, n, key, start, scale, shift)
    }

    /// Fills an activation with scale * z, z the Philox normals of `key` (tests, benchmarks).
    pub fn fill_act_normal(&self, a: &mut CudaAct, key: PhiloxKey, scale: f32) -> Result<()> {
        kernels::fill_normal(&self.dev, a.ptr(), DType::F32, a.len(), key, 0, scale, 0.0)
    }

    /// out[i] = scale * (+1 or -1) of element start + i of `key` (f32).
    pub fn fill_rademacher(
        &self,
        out: &mut DevBuf,
        n: usize,
        key: PhiloxKey,
        start: u64,
        scale: f32,
    ) -> Result<()> {
        ensure!(out.bytes() >= n * 4, "fill_rademacher: buffer too small");
        kernels::fill_rademacher(&self.dev, out.ptr(), n, key, start, scale)
    }

    /// w += scale * z over the whole tensor, z the Philox normals of `key` by element index.
    /// Computed as w + (scale * z) in f32 (two rounded ops, no fma), then rounded to the
    /// tensor's dtype (nearest even for bf16).
    pub fn axpy_normal(&self, w: &mut CudaWeight, key: PhiloxKey, scale: f32) -> Result<()> {
        kernels::axpy_normal(&self.dev, w.ptr(), w.dtype, w.numel(), key, 0, scale)
    }

    /// The same on n elements of a raw buffer starting at stream element `start`.
    pub fn axpy_normal_buf(
        &self,
        w: &mut DevBuf,
        dtype: DType,
        n: usize,
        key: PhiloxKey,
        start: u64,
        scale: f32,
    ) -> Result<()> {
        ensure!(w.bytes() >= n * elt(dtype), "axpy_normal: buffer too small");
        kernels::axpy_normal(&self.dev, w.ptr(), dtype, n, key, start, scale)
    }

    /// The raw Philox words of blocks [first, first + n) of `key` (4 per block).
    pub fn philox_words(&self, key: PhiloxKey, first: u64, n: usize) -> Result<Vec<u32>> {
        let buf = self.alloc_buf(n * 16, Tag::Scratch, "philox words")?;
        kernels::philox_words(&self.dev, buf.ptr(), n, key, first)?;
        self.buf_to_host(&buf, 4 * n)
    }

    /// Row-major out[m, n] = alpha x[m, k] w[n, k]^T + beta out through cuBLAS.
    ///
    /// # Safety
    /// The addresses in `args` must be live device buffers large enough for the dimensions.
    pub unsafe fn gemm_raw(&self, args: &GemmArgs) -> Result<()> {
        gemm::gemm_xwt(&self.dev, args)
    }

    /// out = x w^T for an f32 activation and a weight of either dtype.
    fn linear(&self, x: &CudaAct, w: &CudaWeight, out: &mut CudaAct) -> Result<()> {
        let (n, k) = (w.shape[0], w.shape[1]);
        let m = x.rows;
        match w.dtype {
            DType::F32 => gemm::gemm_xwt(
                &self.dev,
                &GemmArgs {
                    m,
                    n,
                    k,
                    x: x.ptr(),
                    w: w.ptr(),
                    in_dtype: DType::F32,
                    out: out.ptr(),
                    out_dtype: DType::F32,
                    alpha: 1.0,
                    beta: 0.0,
                },
            ),
            DType::BF16 => {
                let xb = self.dev.alloc(m * k * 2, Tag::Scratch, || {
                    format!("the bf16 copy of the input of {}", w.name)
                })?;
                kernels::f32_to_bf16(&self.dev, x.ptr(), xb.ptr(), m * k)?;
                gemm::gemm_xwt(
                    &self.dev,
                    &GemmArgs {
                        m,
                        n,
                        k,
                        x: xb.ptr(),
                        w: w.ptr(),
                        in_dtype: DType::BF16,
                        out: out.ptr(),
                        out_dtype: DType::F32,
                        alpha: 1.0,
                        beta: 0.0,
                    },
                )
            }
            DType::F16 => bail!("{}: f16 weights are not supported on the GPU", w.name),
        }
    }

    fn check_weight(&self, w: &CudaWeight, shape: &[usize], what: &str) -> Result<()> {
        ensure!(
            w.shape == shape,
            "{what}: weight {} has shape {:?}, expected {shape:?}",
            w.name,
            w.shape
        );
        Ok(())
    }

    /// Runs `launch` with the device copy of a small host array kept in `slot`, uploading it
    /// only when it changed. The lock is held until the launch is queued, so another thread
    /// sharing the backend cannot replace (and free) the buffer ahead of the kernel reading it.
    fn with_upload<T: bytemuck::Pod + PartialEq>(
        &self,
        slot: impl FnOnce(&mut Uploads) -> &mut Option<(Vec<T>, DevBuf)>,
        values: Vec<T>,
        what: &str,
        launch: impl FnOnce(u64) -> Result<()>,
    ) -> Result<()> {
        let mut up = self.uploads.lock().unwrap();
        let slot = slot(&mut up);
        if !matches!(slot, Some((k, _)) if *k == values) {
            let b = self.buf_from_host(&values, Tag::Scratch, what)?;
            *slot = Some((values, b));
        }
        let (_, b) = slot.as_ref().expect("uploaded above");
        launch(b.ptr())
    }

    fn chunk_rows(vocab: usize, rows: usize) -> usize {
        let c = (LOGIT_CHUNK_BYTES / (vocab.max(1) * 4)).max(8) / 8 * 8;
        c.min(rows).max(1)
    }

    /// Logits of the hidden rows `rows` (device indices) into `sink(chunk_start, values)`.
    fn head_chunks(
        &self,
        hidden: &CudaAct,
        head: &CudaWeight,
        rows: &DevBuf,
        n_rows: usize,
        mut each: impl FnMut(usize, usize, &DevBuf) -> Result<()>,
    ) -> Result<()> {
        let (vocab, d) = (head.shape[0], head.shape[1]);
        let chunk = Self::chunk_rows(vocab, n_rows);
        let x = self
            .dev
            .alloc(chunk * d * elt(head.dtype), Tag::Scratch, || {
                format!("the LM head input ({chunk} rows)")
            })?;
        let logits = self.dev.alloc(chunk * vocab * 4, Tag::Scratch, || {
            format!("a chunk of logits ({chunk} x {vocab})")
        })?;
        let mut c0 = 0;
        while c0 < n_rows {
            let m = chunk.min(n_rows - c0);
            kernels::gather_rows(
                &self.dev,
                hidden.ptr(),
                rows.ptr_at(c0 * 4),
                x.ptr(),
                head.dtype,
                m,
                d,
            )?;
            gemm::gemm_xwt(
                &self.dev,
                &GemmArgs {
                    m,
                    n: vocab,
                    k: d,
                    x: x.ptr(),
                    w: head.ptr(),
                    in_dtype: head.dtype,
                    out: logits.ptr(),
                    out_dtype: DType::F32,
                    alpha: 1.0,
                    beta: 0.0,
                },
            )?;
            each(c0, m, &logits)?;
            c0 += m;
        }
        Ok(())
    }
}

/// The LM head's (vocabulary, hidden size), checked against the hidden states it multiplies.
fn check_head(head: &CudaWeight, hidden: &CudaAct, what: &str) -> Result<(usize, usize)> {
    ensure!(
        head.shape.len() == 2,
        "{what}: {} is not a matrix",
        head.name
    );
    let (vocab, d) = (head.shape[0], head.shape[1]);
    ensure!(
        hidden.cols == d,
        "{what}: hidden size {} but the LM head expects {d}",
        hidden.cols
    );
    Ok((vocab, d))
}

/// `check_head` for `logits_rows`, with every requested row inside the hidden states; the
/// vocabulary size.
fn check_logit_rows(head: &CudaWeight, hidden: &CudaAct, rows: &[usize]) -> Result<usize> {
    let (vocab, _) = check_head(head, hidden, "logits_rows")?;
    for &r in rows {
        ensure!(r < hidden.rows, "logits_rows: row {r} out of range");
    }
    Ok(vocab)
}

impl Backend for CudaBackend {
    type Act = CudaAct;
    type Weight = CudaWeight;

    fn name(&self) -> String {
        format!(
            "cuda ({}, compute capability {}.{})",
            self.dev.name, self.dev.capability.0, self.dev.capability.1
        )
    }

    fn alloc(&self, rows: usize, cols: usize, tag: Tag) -> Result<CudaAct> {
        let buf = self.dev.alloc(rows * cols * 4, tag, || {
            format!("a {rows}x{cols} f32 activation")
        })?;
        Ok(CudaAct { buf, rows, cols })
    }

    fn act_rows(&self, a: &CudaAct) -> usize {
        a.rows
    }

    fn to_host(&self, a: &CudaAct) -> Result<Vec<f32>> {
        self.buf_to_host(&a.buf, a.len())
    }

    fn from_host(&self, data: &[f32], rows: usize, cols: usize, tag: Tag) -> Result<CudaAct> {
        ensure!(
            data.len() == rows * cols,
            "from_host: {} values for {rows}x{cols}",
            data.len()
        );
        let a = self.alloc(rows, cols, tag)?;
        self.dev.htod(data, &a.buf, 0)?;
        Ok(a)
    }

    fn embed(&self, table: &CudaWeight, ids: &[u32], out: &mut CudaAct) -> Result<()> {
        ensure!(
            table.shape.len() == 2,
            "embed: {} is not a matrix",
            table.name
        );
        let (vocab, d) = (table.shape[0], table.shape[1]);
        ensure!(
            out.cols == d && out.rows == ids.len(),
            "embed: output shape"
        );
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            bail!("token id {bad} is outside the vocabulary of {vocab} tokens");
        }
        if ids.is_empty() {
            return Ok(());
        }
        let ids_dev = self.buf_from_host(ids, Tag::Scratch, "token ids")?;
        kernels::embed(
            &self.dev,
            table.ptr(),
            table.dtype,
            ids_dev.ptr(),
            out.ptr(),
            ids.len(),
            d,
        )
    }

    fn rmsnorm(&self, x: &CudaAct, w: &CudaWeight, eps: f32, out: &mut CudaAct) -> Result<()> {
        self.check_weight(w, &[x.cols], "rmsnorm")?;
        ensure!(
            out.rows == x.rows && out.cols == x.cols,
            "rmsnorm: output shape"
        );
        kernels::rmsnorm(
            &self.dev,
            x.ptr(),
            w.ptr(),
            w.dtype,
            out.ptr(),
            x.rows,
            x.cols,
            eps,
        )
    }

    fn add_rmsnorm(
        &self,
        residual: &mut CudaAct,
        delta: &CudaAct,
        w: &CudaWeight,
        eps: f32,
        out: &mut CudaAct,
    ) -> Result<()> {
        self.check_weight(w, &[residual.cols], "add_rmsnorm")?;
        ensure!(
            delta.rows == residual.rows
                && delta.cols == residual.cols
                && out.rows == residual.rows
                && out.cols == residual.cols,
            "add_rmsnorm: shapes"
        );
        kernels::add_rmsnorm(
            &self.dev,
            residual.ptr(),
            delta.ptr(),
            w.ptr(),
            w.dtype,
            out.ptr(),
            residual.rows,
            residual.cols,
            eps,
        )
    }

    fn matmul(&self, x: &CudaAct, w: &CudaWeight, out: &mut CudaAct) -> Result<()> {
        crate::backend::check_matmul(&w.name, &w.shape, (x.rows, x.cols), (out.rows, out.cols))?;
        self.linear(x, w, out)
    }

    fn rope(
        &self,
        x: &mut CudaAct,
        n_heads: usize,
        layout: &SeqLayout,
        inv_freq: &[f32],
    ) -> Result<()> {
        ensure!(
            n_heads > 0 && x.cols.is_multiple_of(n_heads),
            "rope: {} columns for {n_heads} heads",
            x.cols
        );
        let hd = x.cols / n_heads;
        ensure!(
            inv_freq.len() == hd / 2 && hd.is_multiple_of(2),
            "rope: {} frequencies for head_dim {hd}",
            inv_freq.len()
        );
        ensure!(layout.q_len > 0, "rope: empty layout");
        ensure!(
            layout.starts.is_none(),
            "rope: packed layouts are not supported by the CUDA backend"
        );
        ensure!(
            x.rows == layout.rows(),
            "rope: {} rows for a layout of {}",
            x.rows,
            layout.rows()
        );
        if x.rows == 0 {
            return Ok(());
        }
        // The frequencies' bits: f32 values compare by bits and upload as the same bytes.
        let bits = inv_freq.iter().map(|f| f.to_bits()).collect();
        self.with_upload(
            |u| &mut u.inv_freq,
            bits,
            "RoPE frequencies",
            |f| {
                kernels::rope(
                    &self.dev,
                    x.ptr(),
                    f,
                    x.rows,
                    n_heads,
                    hd,
                    layout.q_len,
                    layout.q_offset,
                )
            },
        )
    }

    fn attention(
        &self,
        q: &CudaAct,
        k: &CudaAct,
        v: &CudaAct,
        shape: AttnShape,
        layout: &SeqLayout,
        out: &mut CudaAct,
    ) -> Result<()> {
        let AttnShape {
            n_heads,
            n_kv_heads,
            head_dim: hd,
        } = shape;
        ensure!(
            n_kv_heads > 0 && n_heads % n_kv_heads == 0,
            "attention: {n_heads} heads over {n_kv_heads} key/value heads"
        );
        let (qc, kc) = (n_heads * hd, n_kv_heads * hd);
        ensure!(
            q.cols == qc && k.cols == kc && v.cols == kc && out.cols == qc,
            "attention: shapes"
        );
        ensure!(
            layout.starts.is_none(),
            "attention: packed layouts are not supported by the CUDA backend"
        );
        ensure!(
            q.rows == layout.batch * layout.q_len
                && out.rows == q.rows
                && k.rows == layout.batch * layout.kv_len
                && v.rows == k.rows,
            "attention: rows do not match the layout ({} x {} queries, {} keys per sequence)",
            layout.batch,
            layout.q_len,
            layout.kv_len
        );
        ensure!(
            layout.kv_valid.len() == layout.batch,
            "attention: {} valid lengths for a batch of {}",
            layout.kv_valid.len(),
            layout.batch
        );
        if q.rows == 0 {
            return Ok(());
        }
        let valid: Vec<i32> = layout
            .kv_valid
            .iter()
            .map(|&x| i32::try_from(x).unwrap_or(i32::MAX))
            .collect();
        self.with_upload(
            |u| &mut u.kv_valid,
            valid,
            "valid lengths",
            |valid| {
                kernels::attention(
                    &self.dev,
                    q.ptr(),
                    k.ptr(),
                    v.ptr(),
                    out.ptr(),
                    valid,
                    layout.batch,
                    layout.q_len,
                    layout.kv_len,
                    n_heads,
                    n_kv_heads,
                    hd,
                    layout.q_offset,
                )
            },
        )
    }

    fn swiglu(&self, gate: &mut CudaAct, up: &CudaAct) -> Result<()> {
        ensure!(gate.len() == up.len(), "swiglu: shapes");
        kernels::swiglu(&self.dev, gate.ptr(), up.ptr(), gate.len())
    }

    fn target_logprobs(
        &self,
        hidden: &CudaAct,
        head: &CudaWeight,
        targets: &[i32],
    ) -> Result<Vec<f32>> {
        let (vocab, _) = check_head(head, hidden, "target_logprobs")?;
        let rows = crate::backend::cpu::target_rows(targets, hidden.rows, vocab)?;
        let mut out = vec![0.0f32; targets.len()];
        if rows.is_empty() {
            return Ok(out);
        }
        let tgt: Vec<i32> = rows.iter().map(|&r| targets[r]).collect();
        let rows: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
        let rows_dev = self.buf_from_host(&rows, Tag::Scratch, "LM head row indices")?;
        let tgt_dev = self.buf_from_host(&tgt, Tag::Scratch, "target ids")?;
        let out_dev = self.alloc_buf(out.len() * 4, Tag::Scratch, "target log-probabilities")?;
        self.dev.memset0(&out_dev)?;
        self.head_chunks(hidden, head, &rows_dev, rows.len(), |c0, m, logits| {
            kernels::target_logprob(
                &self.dev,
                logits.ptr(),
                vocab,
                tgt_dev.ptr_at(c0 * 4),
                rows_dev.ptr_at(c0 * 4),
                out_dev.ptr(),
                m,
            )
        })?;
        self.dev.dtoh(&out_dev, 0, &mut out)?;
        Ok(out)
    }

    fn logits_rows(&self, hidden: &CudaAct, head: &CudaWeight, rows: &[usize]) -> Result<Vec<f32>> {
        let vocab = check_logit_rows(head, hidden, rows)?;
        let mut out = vec![0.0f32; rows.len() * vocab];
        if rows.is_empty() {
            return Ok(out);
        }
        let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
        let rows_dev = self.buf_from_host(&idx, Tag::Scratch, "LM head row indices")?;
        self.head_chunks(hidden, head, &rows_dev, rows.len(), |c0, m, logits| {
            self.dev
                .dtoh(logits, 0, &mut out[c0 * vocab..(c0 + m) * vocab])
        })?;
        Ok(out)
    }

    fn copy_rows(&self, src: &CudaAct, dst: &mut CudaAct, dst_row: usize) -> Result<()> {
        ensure!(
            src.cols == dst.cols && dst_row + src.rows <= dst.rows,
            "copy_rows: shapes"
        );
        let c = src.cols;
        self.dev
            .dtod(src.ptr(), dst.buf.ptr_at(dst_row * c * 4), src.rows * c * 4)
    }
}
