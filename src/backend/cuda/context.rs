//! The device side of the backend: context, the one stream, the kernel module loaded from the
//! embedded fatbin, cuBLAS, and checked kernel launches.

use super::alloc::{self, DevBuf};
use crate::backend::mem::{MemCounters, Tag};
use anyhow::{anyhow, bail, Context as _, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{result, sys, CudaContext, CudaStream};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[cfg(target_endian = "big")]
compile_error!("kernel arguments are passed as little-endian 8-byte slots");

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/cuda_kernels.rs"));
}

/// Every kernel of csrc/ (extern "C" names), loaded when the backend starts.
pub(crate) const KERNELS: &[&str] = &[
    "f32_to_bf16",
    "bf16_to_f32",
    "gather_rows_f32",
    "gather_rows_bf16",
    "embed_f32",
    "embed_bf16",
    "rmsnorm_f32w",
    "rmsnorm_bf16w",
    "add_rmsnorm_f32w",
    "add_rmsnorm_bf16w",
    "rope_f32",
    "attention_f32_nt1",
    "attention_f32_nt2",
    "attention_f32_nt4",
    "attention_f32_nt8",
    "swiglu_f32",
    "target_logprob_f32",
    "fill_normal_f32",
    "fill_normal_bf16",
    "fill_rademacher_f32",
    "axpy_normal_f32",
    "axpy_normal_bf16",
    "philox_words",
    "zo_pass_f32",
    "zo_pass_bf16",
    "zo_pass_jobs",
    "zo_adam_pass_f32",
    "zo_adam_pass_bf16",
    "zo_low_rank_move_f32",
    "zo_low_rank_move_bf16",
    "zo_low_rank_move_jobs",
    "zo_decay_f32",
    "zo_decay_bf16",
    "zo_perturbed_copy_f32",
    "zo_perturbed_copy_bf16",
    "zo_perturbed_copy_jobs",
    "zo_factor_jobs",
    "zo_perturb_gathered_f32",
    "zo_perturb_gathered_bf16",
    "scale_cols_f32",
    "lse_block_f32",
];

/// Whether the kernels were compiled into this build, and if not, why and how to get them.
pub fn kernels_embedded() -> Result<&'static [u8], String> {
    embedded::FATBIN.ok_or_else(|| {
        format!(
            "this build of zoft has no CUDA kernels ({}); install nvcc with tools/install-nvcc, \
             then rebuild with NVCC set to the path it prints \
             (e.g. NVCC=$(tools/install-nvcc | tail -n1) cargo build --release)",
            embedded::FATBIN_MISSING
        )
    })
}

/// Why CUDA cannot be used on this machine, or Ok. Never panics: the driver library is probed
/// before anything calls into it.
///
/// With ZOFT_CUDA_EMULATOR=1 the CUDA device is the kernel emulator, which runs the kernels of
/// csrc/ on the CPU (see `emulator`): a development aid for running the CUDA paths end to end
/// where there is no GPU. It compiles the sources of the tree zoft was built from with the
/// system C++ compiler, and it is slow.
pub fn cuda_available() -> Result<(), String> {
    if std::env::var("ZOFT_CUDA_EMULATOR").is_ok_and(|v| v == "1") && !super::emulator::install() {
        return Err(
            "ZOFT_CUDA_EMULATOR=1, but there is no C++ compiler to build the kernel emulator with"
                .into(),
        );
    }
    // SAFETY: only tries to open the shared library.
    if !unsafe { sys::is_culib_present() } {
        return Err("the CUDA driver library (libcuda.so) was not found".into());
    }
    result::init().map_err(|e| format!("the CUDA driver did not initialise: {e}"))?;
    let n = CudaContext::device_count().map_err(|e| format!("cannot count CUDA devices: {e}"))?;
    if n <= 0 {
        return Err("the CUDA driver reports no device".into());
    }
    Ok(())
}

/// CUDA version the driver supports, as (major, minor).
pub fn driver_version() -> Result<(i32, i32)> {
    let mut v = 0i32;
    // SAFETY: writes one int.
    unsafe { sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(|e| anyhow!("cuDriverGetVersion: {e}"))?;
    Ok((v / 1000, (v % 1000) / 10))
}

/// What runs kernels: the GPU (`Device`), or in tests the CPU emulation of csrc/ (see
/// emulator/), so that the launchers in kernels.rs serve both.
pub(crate) trait Launch {
    /// Launches kernel `name` with `args` (its C signature, in order) over `grid` x `block`
    /// threads and `smem` bytes of dynamic shared memory.
    fn launch(
        &self,
        name: &'static str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: usize,
        args: Args,
    ) -> Result<()>;
}

impl Launch for Device {
    /// Launch errors (and with ZOFT_CUDA_SYNC=1 execution errors) name the kernel.
    fn launch(
        &self,
        name: &'static str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: usize,
        args: Args,
    ) -> Result<()> {
        let f = *self
            .funcs
            .get(name)
            .ok_or_else(|| anyhow!("unknown kernel {name}"))?;
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(()); // nothing to do
        }
        if grid.1 > 65535 || grid.2 > 65535 {
            bail!("kernel {name}: grid {grid:?} exceeds the device limits");
        }
        // The opt-in below is a driver call too, and needs the context current.
        self.bind()?;
        if smem > 48 * 1024 {
            if smem > self.max_smem_optin {
                bail!(
                    "kernel {name} needs {smem} bytes of shared memory; {} has {}",
                    self.name,
                    self.max_smem_optin
                );
            }
            // SAFETY: valid function handle and attribute.
            unsafe {
                sys::cuFuncSetAttribute(
                    f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
            }
            .result()
            .map_err(|e| anyhow!("kernel {name}: setting {smem} bytes of shared memory: {e}"))?;
        }
        // SAFETY: the argument list matches the kernel's signature (each launcher in kernels.rs
        // mirrors its csrc declaration); the slots outlive the call, which copies them.
        args.with_params(|params| unsafe {
            result::launch_kernel(f, grid, block, smem as u32, self.stream.cu_stream(), params)
        })
        .map_err(|e| {
            anyhow!("CUDA kernel {name} (grid {grid:?}, block {block:?}) failed to launch: {e}")
        })?;
        self.launched.kernels.fetch_add(1, Ordering::Relaxed);
        if self.sync_each_launch {
            self.stream
                .synchronize()
                .map_err(|e| anyhow!("CUDA kernel {name} failed: {e}"))?;
        }
        Ok(())
    }
}

impl<L: Launch + ?Sized> Launch for Arc<L> {
    fn launch(
        &self,
        name: &'static str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: usize,
        args: Args,
    ) -> Result<()> {
        (**self).launch(name, grid, block, smem, args)
    }
}

/// Kernel arguments, each in its own 8-byte slot (cuLaunchKernel reads sizeof(param) bytes from
/// each pointer, so 4-byte values sit in the low half of a little-endian slot).
#[derive(Default)]
pub(crate) struct Args {
    slots: Vec<u64>,
}

impl Args {
    pub(crate) fn new() -> Self {
        Args {
            slots: Vec::with_capacity(16),
        }
    }
    pub(crate) fn ptr(mut self, p: u64) -> Self {
        self.slots.push(p);
        self
    }
    pub(crate) fn u64(mut self, v: u64) -> Self {
        self.slots.push(v);
        self
    }
    pub(crate) fn u32(mut self, v: u32) -> Self {
        self.slots.push(v as u64);
        self
    }
    pub(crate) fn i32(mut self, v: i32) -> Self {
        self.slots.push(v as u32 as u64);
        self
    }
    pub(crate) fn f32(mut self, v: f32) -> Self {
        self.slots.push(v.to_bits() as u64);
        self
    }
    /// Calls `f` with the kernel parameter array a launch takes (kernelParams): one pointer to
    /// each slot, valid for the call.
    pub(crate) fn with_params<R>(mut self, f: impl FnOnce(&mut Vec<*mut c_void>) -> R) -> R {
        let mut params: Vec<*mut c_void> = self
            .slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        f(&mut params)
    }
}

pub(crate) struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    pub mem: Arc<MemCounters>,
    module: sys::CUmodule,
    funcs: HashMap<&'static str, sys::CUfunction>,
    /// Synchronize after every launch so that asynchronous faults name their kernel
    /// (ZOFT_CUDA_SYNC=1).
    sync_each_launch: bool,
    /// Largest dynamic shared memory a block may opt into.
    pub max_smem_optin: usize,
    /// cuBLAS workspace, accounted as scratch.
    _blas_workspace: Option<DevBuf>,
    /// Kernels and cuBLAS GEMMs issued so far (benchmarks: where launches, not work, set the
    /// time of a small model's forward).
    pub launched: LaunchCounts,
    pub name: String,
    pub capability: (i32, i32),
}

// SAFETY: the raw module and function handles are immutable after construction and only used
// with the context bound; all work goes to the one stream.
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

const BLAS_WORKSPACE: usize = 32 << 20;

/// Work issued to the stream, counted as it is issued.
#[derive(Debug, Default)]
pub struct LaunchCounts {
    pub kernels: AtomicU64,
    pub gemms: AtomicU64,
}

impl LaunchCounts {
    /// (kernels, GEMMs) so far.
    pub fn get(&self) -> (u64, u64) {
        (
            self.kernels.load(Ordering::Relaxed),
            self.gemms.load(Ordering::Relaxed),
        )
    }
}

impl Device {
    pub(crate) fn new(ordinal: usize, mem: Arc<MemCounters>) -> Result<Self> {
        // Kernels first: whether they were built is a property of this binary, not the machine.
        let fatbin = kernels_embedded().map_err(|e| anyhow!(e))?;
        cuda_available().map_err(|e| anyhow!("CUDA is not available: {e}"))?;
        // SAFETY: only tries to open the shared library.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            bail!(
                "the cuBLAS library (libcublas.so.13) was not found; install it (e.g. the \
                 nvidia-cublas wheel or a CUDA toolkit) and add its lib directory to LD_LIBRARY_PATH"
            );
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| anyhow!("creating a CUDA context on device {ordinal}: {e}"))?;
        // One stream: no cross-stream event bookkeeping is needed.
        // SAFETY: every buffer of this backend is used on `stream` only.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| anyhow!("creating a CUDA stream: {e}"))?;
        super::alloc::keep_freed_memory(&ctx)?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let capability = ctx.compute_capability().unwrap_or((0, 0));
        let max_smem_optin = ctx
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .unwrap_or(48 * 1024) as usize;

        // cuModuleLoadData wants an aligned image; include_bytes! gives no alignment guarantee.
        let mut image = vec![0u64; fatbin.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut image)[..fatbin.len()].copy_from_slice(fatbin);
        // SAFETY: a complete fatbin image, kept alive for the call.
        let module = unsafe { result::module::load_data(image.as_ptr() as *const c_void) }
            .map_err(|e| {
                let drv = driver_version()
                    .map(|(a, b)| format!("{a}.{b}"))
                    .unwrap_or_else(|_| "unknown".into());
                anyhow!(
                    "loading zoft's CUDA kernels on {name} (compute capability {}.{}) failed: {e}; \
                     the kernels are built by nvcc 13.0 for sm_80/sm_90 (+ compute_80 PTX) and need \
                     a driver for CUDA 13.0 or newer (this driver supports CUDA {drv}); \
                     set ZOFT_CUDA_ARCHS at build time for other GPUs",
                    capability.0,
                    capability.1
                )
            })?;
        let mut funcs = HashMap::new();
        for &k in KERNELS {
            // SAFETY: the module is loaded; the name is a valid C string.
            let f = unsafe { result::module::get_function(module, CString::new(k).unwrap()) }
                .map_err(|e| anyhow!("kernel {k} is missing from the embedded fatbin: {e}"))?;
            funcs.insert(k, f);
        }

        let blas = CudaBlas::new(stream.clone()).map_err(|e| anyhow!("creating cuBLAS: {e}"))?;
        let mut dev = Device {
            ctx,
            stream,
            blas,
            mem,
            module,
            funcs,
            sync_each_launch: std::env::var("ZOFT_CUDA_SYNC").is_ok_and(|v| v == "1"),
            max_smem_optin,
            _blas_workspace: None,
            launched: LaunchCounts::default(),
            name,
            capability,
        };
        // Give cuBLAS an accounted workspace of our own (it would allocate one otherwise).
        let ws = dev.alloc(BLAS_WORKSPACE, Tag::Scratch, || {
            "the cuBLAS workspace".into()
        })?;
        // SAFETY: the workspace outlives the handle: `blas` is declared (so dropped) before
        // `_blas_workspace`, and Drop synchronizes the stream first.
        unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(
                *dev.blas.handle(),
                ws.ptr() as *mut c_void,
                BLAS_WORKSPACE,
            )
        }
        .result()
        .map_err(|e| anyhow!("cublasSetWorkspace: {e}"))?;
        dev._blas_workspace = Some(ws);
        Ok(dev)
    }

    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| anyhow!("CUDA error (from earlier asynchronous work): {e}"))
    }

    pub(crate) fn alloc(
        &self,
        bytes: usize,
        tag: Tag,
        what: impl Fn() -> String,
    ) -> Result<DevBuf> {
        alloc::alloc(&self.stream, &self.mem, bytes, tag, &what)
    }

    pub(crate) fn sync(&self) -> Result<()> {
        self.bind()?;
        self.stream
            .synchronize()
            .map_err(|e| anyhow!("CUDA error while waiting for the device: {e}"))
    }

    pub(crate) fn htod<T: bytemuck::Pod>(
        &self,
        src: &[T],
        dst: &DevBuf,
        offset: usize,
    ) -> Result<()> {
        let bytes = std::mem::size_of_val(src);
        if bytes == 0 {
            return Ok(());
        }
        if offset + bytes > dst.bytes() {
            bail!(
                "host-to-device copy of {bytes} bytes at {offset} past a {}-byte buffer",
                dst.bytes()
            );
        }
        self.bind()?;
        // SAFETY: in bounds; pageable source memory is staged by the driver before the call
        // returns, so `src` may be dropped afterwards.
        unsafe { result::memcpy_htod_async(dst.ptr_at(offset), src, self.stream.cu_stream()) }
            .context("host-to-device copy")?;
        Ok(())
    }

    pub(crate) fn dtoh<T: bytemuck::Pod>(
        &self,
        src: &DevBuf,
        offset: usize,
        dst: &mut [T],
    ) -> Result<()> {
        let bytes = std::mem::size_of_val(dst);
        if bytes == 0 {
            return Ok(());
        }
        if offset + bytes > src.bytes() {
            bail!(
                "device-to-host copy of {bytes} bytes at {offset} past a {}-byte buffer",
                src.bytes()
            );
        }
        self.bind()?;
        // SAFETY: in bounds; we wait for the copy before returning.
        unsafe { result::memcpy_dtoh_async(dst, src.ptr_at(offset), self.stream.cu_stream()) }
            .context("device-to-host copy")?;
        self.sync()
    }

    pub(crate) fn dtod(&self, src: u64, dst: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: callers check both ranges.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .context("device-to-device copy")?;
        Ok(())
    }

    pub(crate) fn memset0(&self, dst: &DevBuf) -> Result<()> {
        self.bind()?;
        // SAFETY: the whole buffer.
        unsafe { sys::cuMemsetD8Async(dst.ptr(), 0, dst.bytes(), self.stream.cu_stream()) }
            .result()
            .context("device memset")?;
        Ok(())
    }

    /// (free, total) bytes of device memory, from the driver.
    pub(crate) fn mem_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        result::mem_get_info().map_err(|e| anyhow!("cuMemGetInfo: {e}"))
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.bind();
        let _ = self.stream.synchronize();
        // SAFETY: loaded in `new`, unloaded once; no launch is in flight after the sync.
        unsafe {
            let _ = result::module::unload(self.module);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::KERNELS;

    #[test]
    fn every_kernel_in_csrc_is_loaded_and_every_loaded_kernel_exists() {
        // A kernel missing from KERNELS is never loaded ("unknown kernel" at its first
        // launch); a name without a kernel fails the backend's start. Both show only on a GPU,
        // so the list is checked against the sources here.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("csrc");
        let mut defined = vec![];
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "cu") {
                let src = std::fs::read_to_string(&path).unwrap();
                for part in src.split("extern \"C\" __global__").skip(1) {
                    // `void [__launch_bounds__(..)] name(`
                    let head = &part[..part.find('(').unwrap()];
                    let head = if head.contains("__launch_bounds__") {
                        let after = &part[part.find(')').unwrap() + 1..];
                        &after[..after.find('(').unwrap()]
                    } else {
                        head
                    };
                    let name = head.split_whitespace().last().unwrap();
                    match name.split_once("##") {
                        None => defined.push(name.to_string()),
                        // Defined inside `#define MACRO(P)` as prefix##P: one kernel per
                        // `MACRO(arg)` line of the file.
                        Some((prefix, _)) => {
                            let at = src.find(prefix).unwrap();
                            let def = src[..at].rfind("#define ").unwrap() + "#define ".len();
                            let mac = &src[def..def + src[def..].find('(').unwrap()];
                            for line in src.lines().filter(|l| l.starts_with(&format!("{mac}("))) {
                                let arg = &line[mac.len() + 1..line.find(')').unwrap()];
                                defined.push(format!("{prefix}{arg}"));
                            }
                        }
                    }
                }
            }
        }
        for k in KERNELS {
            assert!(
                defined.iter().any(|d| d == k),
                "{k} is loaded but not defined in csrc/"
            );
        }
        for d in &defined {
            assert!(
                KERNELS.contains(&d.as_str()),
                "{d} is defined in csrc/ but never loaded"
            );
        }
    }
}
