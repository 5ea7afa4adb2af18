//! GEMMs through cuBLAS: row-major out[m, n] = alpha * x[m, k] w[n, k]^T + beta * out, with
//! x and w of one storage type (bf16 or f32), out f32 or bf16, f32 accumulation.
//!
//! cuBLAS is column-major: a row-major [r, c] matrix is its column-major transpose, so
//! out^T [n, m] = w_cm^T [n, k] * x_cm [k, m] with w_cm = w viewed column-major [k, n] (ld k),
//! i.e. cublasGemmEx(op_T, op_N, n, m, k, w, ld k, x, ld k, out, ld n).

use super::context::Device;
use crate::model::DType;
use anyhow::{anyhow, bail, Result};
use cudarc::cublas::sys as cb;
use std::ffi::c_void;

fn cuda_type(d: DType) -> Result<cb::cudaDataType_t> {
    Ok(match d {
        DType::F32 => cb::cudaDataType_t::CUDA_R_32F,
        DType::BF16 => cb::cudaDataType_t::CUDA_R_16BF,
        DType::F16 => cb::cudaDataType_t::CUDA_R_16F,
    })
}

/// The operands of one GEMM, as raw device addresses.
pub struct GemmArgs {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// x [m, k] row-major.
    pub x: u64,
    /// w [n, k] row-major, same dtype as x.
    pub w: u64,
    pub in_dtype: DType,
    /// out [m, n] row-major.
    pub out: u64,
    pub out_dtype: DType,
    pub alpha: f32,
    pub beta: f32,
}

pub(crate) fn gemm_xwt(dev: &Device, a: &GemmArgs) -> Result<()> {
    gemm(dev, a, false)
}

/// The same product with w stored as [k, n] row-major (out = x w): a column-major [n, k] w,
/// so cuBLAS takes it untransposed with leading dimension n.
pub(crate) fn gemm_xw(dev: &Device, a: &GemmArgs) -> Result<()> {
    gemm(dev, a, true)
}

fn gemm(dev: &Device, a: &GemmArgs, w_is_k_by_n: bool) -> Result<()> {
    if a.m == 0 || a.n == 0 {
        return Ok(());
    }
    let lim = i32::MAX as usize;
    if a.m > lim || a.n > lim || a.k > lim {
        bail!(
            "GEMM {}x{}x{} exceeds cuBLAS's 32-bit dimensions",
            a.m,
            a.n,
            a.k
        );
    }
    let (m, n, k) = (a.m as i32, a.n as i32, a.k as i32);
    let in_t = cuda_type(a.in_dtype)?;
    let out_t = cuda_type(a.out_dtype)?;
    // Plain f32 compute for f32 inputs (no TF32), tensor cores for bf16 inputs.
    let compute = cb::cublasComputeType_t::CUBLAS_COMPUTE_32F;
    // k = 0 leaves out = beta out; cuBLAS still wants every leading dimension >= 1.
    let (w_op, ldw) = if w_is_k_by_n {
        (cb::cublasOperation_t::CUBLAS_OP_N, n)
    } else {
        (cb::cublasOperation_t::CUBLAS_OP_T, k.max(1))
    };
    dev.bind()?;
    // SAFETY: the callers size x, w and out for the dimensions; alpha/beta are host scalars
    // (the handle's default pointer mode).
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *dev.blas.handle(),
            w_op,
            cb::cublasOperation_t::CUBLAS_OP_N,
            n,
            m,
            k,
            &a.alpha as *const f32 as *const c_void,
            a.w as *const c_void,
            in_t,
            ldw,
            a.x as *const c_void,
            in_t,
            k.max(1),
            &a.beta as *const f32 as *const c_void,
            a.out as *mut c_void,
            out_t,
            n,
            compute,
            cb::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
        )
    }
    .map_err(|e| {
        anyhow!(
            "cuBLAS GEMM {}x{}x{} ({} in, {} out) failed: {e}",
            a.m,
            a.n,
            a.k,
            a.in_dtype.name(),
            a.out_dtype.name()
        )
    })?;
    dev.launched
        .gemms
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}
