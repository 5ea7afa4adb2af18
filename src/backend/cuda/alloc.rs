//! The one device allocator: every buffer is tagged with a `mem::Tag` and counted in the
//! backend's `MemCounters` while it lives. Allocations are stream-ordered (cuMemAllocAsync /
//! cuMemFreeAsync on the backend's single stream) where the device supports memory pools.
//!
//! The pool keeps what is freed (`keep_freed_memory`): with the driver's default release
//! threshold of 0 it would hand every unused byte back to the OS at each synchronization, and a
//! forward synchronizes several times (each read of losses or logits), so every step's scratch
//! would be unmapped and mapped again. What the pool keeps is given back only when an
//! allocation would otherwise fail (`trim_pool`).

use crate::backend::mem::{MemCounters, Tag, TAGS};
use anyhow::{anyhow, Result};
use cudarc::driver::{result, sys, CudaContext, CudaStream, DriverError};
use std::ffi::c_void;
use std::sync::Arc;

/// The device's default stream-ordered pool, the one cuMemAllocAsync draws from.
fn default_pool(ctx: &CudaContext) -> Result<sys::CUmemoryPool, DriverError> {
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: writes one handle for a valid device.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }.result()?;
    Ok(pool)
}

/// Lets the default pool keep freed memory across synchronizations (see the module doc).
pub(crate) fn keep_freed_memory(ctx: &CudaContext) -> Result<()> {
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    let set = || -> Result<(), DriverError> {
        let pool = default_pool(ctx)?;
        let mut threshold = u64::MAX;
        // SAFETY: the release threshold is a u64 attribute; the value outlives the call.
        unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut c_void,
            )
        }
        .result()
    };
    set().map_err(|e| anyhow!("setting the CUDA memory pool's release threshold: {e}"))
}

/// Gives the memory the pool keeps back to the device, once every free queued on `stream`
/// has run; whether that succeeded.
fn trim_pool(stream: &CudaStream) -> bool {
    let trim = || -> Result<(), DriverError> {
        stream.synchronize()?;
        let pool = default_pool(stream.context())?;
        // SAFETY: a valid pool; keeps nothing it does not have to.
        unsafe { sys::cuMemPoolTrimTo(pool, 0) }.result()
    };
    trim().is_ok()
}

/// A device buffer of `bytes` bytes, freed (stream-ordered) and uncounted on drop.
pub struct DevBuf {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    tag: Tag,
    mem: Arc<MemCounters>,
    stream: Arc<CudaStream>,
    async_alloc: bool,
}

// SAFETY: the buffer is plain device memory; every use is ordered on the one stream.
unsafe impl Send for DevBuf {}
unsafe impl Sync for DevBuf {}

impl DevBuf {
    /// Device address of the first byte.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Device address of byte `offset` (checked against the size).
    pub fn ptr_at(&self, offset: usize) -> u64 {
        assert!(
            offset <= self.bytes,
            "offset {offset} past a {}-byte buffer",
            self.bytes
        );
        self.ptr + offset as u64
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn tag(&self) -> Tag {
        self.tag
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        let ctx = self.stream.context();
        ctx.record_err(ctx.bind_to_thread());
        // SAFETY: allocated by `alloc` below on this stream, freed once.
        unsafe {
            if self.async_alloc {
                ctx.record_err(result::free_async(self.ptr, self.stream.cu_stream()));
            } else {
                ctx.record_err(self.stream.synchronize());
                ctx.record_err(result::free_sync(self.ptr));
            }
        }
        self.mem.sub(self.tag, self.bytes);
    }
}

pub(crate) fn human(bytes: usize) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if bytes as f64 >= 1024.0 * MIB {
        format!("{:.2} GiB", bytes as f64 / (1024.0 * MIB))
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB)
    }
}

/// Allocates `bytes` on `stream`, counted under `tag`. `what` names the buffer in errors.
pub(crate) fn alloc(
    stream: &Arc<CudaStream>,
    mem: &Arc<MemCounters>,
    bytes: usize,
    tag: Tag,
    what: &dyn Fn() -> String,
) -> Result<DevBuf> {
    let ctx = stream.context();
    ctx.bind_to_thread()
        .map_err(|e| anyhow!("CUDA context error before allocating {}: {e}", what()))?;
    let async_alloc = ctx.has_async_alloc();
    // Zero-byte requests get a minimal real allocation so every buffer has a valid address.
    let request = bytes.max(256);
    // SAFETY: plain allocation on a live stream; contents are unspecified, as documented.
    let try_alloc = || unsafe {
        if async_alloc {
            result::malloc_async(stream.cu_stream(), request)
        } else {
            result::malloc_sync(request)
        }
    };
    let res = match try_alloc() {
        // Memory the pool keeps may be what is missing (allocations outside the pool, or a
        // request larger than any block it holds): give it back and try once more.
        Err(e) if async_alloc && e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
            if trim_pool(stream) {
                try_alloc()
            } else {
                Err(e)
            }
        }
        res => res,
    };
    match res {
        Ok(ptr) => {
            mem.add(tag, bytes);
            Ok(DevBuf {
                ptr,
                bytes,
                tag,
                mem: mem.clone(),
                stream: stream.clone(),
                async_alloc,
            })
        }
        Err(e) => {
            let held: Vec<String> = TAGS
                .iter()
                .filter(|t| mem.current(**t) > 0)
                .map(|t| format!("{} {}", t.name(), human(mem.current(*t))))
                .collect();
            let device = match result::mem_get_info() {
                Ok((free, total)) => format!("{} free of {}", human(free), human(total)),
                Err(_) => "free memory unknown".to_string(),
            };
            let cause = if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                "out of device memory".to_string()
            } else {
                format!("device allocation failed ({e})")
            };
            Err(anyhow!(
                "{cause}: asked for {} ({bytes} bytes, {}) for {}; the device has {device}; zoft holds {}",
                human(bytes),
                tag.name(),
                what(),
                if held.is_empty() { "nothing".to_string() } else { held.join(", ") }
            ))
        }
    }
}

/// Page-locked host memory (staging for uploads), freed on drop.
pub(crate) struct Pinned {
    ptr: *mut u8,
    len: usize,
    stream: Arc<CudaStream>,
}

impl Pinned {
    pub(crate) fn new(stream: &Arc<CudaStream>, len: usize) -> Result<Self> {
        stream.context().bind_to_thread()?;
        // SAFETY: plain page-locked allocation; freed in Drop.
        let ptr = unsafe { result::malloc_host(len, 0) }
            .map_err(|e| anyhow!("allocating {} of pinned host memory: {e}", human(len)))?
            as *mut u8;
        Ok(Pinned {
            ptr,
            len,
            stream: stream.clone(),
        })
    }

    /// The bytes [offset, offset + len). The caller makes sure no copy from them is in flight.
    pub(crate) fn slice_mut(&mut self, offset: usize, len: usize) -> &mut [u8] {
        assert!(offset + len <= self.len);
        // SAFETY: in bounds of a live allocation, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset), len) }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let ctx = self.stream.context();
        ctx.record_err(ctx.bind_to_thread());
        // Copies out of the buffer must finish before it is released.
        ctx.record_err(self.stream.synchronize());
        // SAFETY: allocated by malloc_host, freed once.
        ctx.record_err(unsafe { result::free_host(self.ptr as _) });
    }
}
