//! Weights onto the device: uploads from host tensors (often memory-mapped files) through a
//! small pinned staging buffer, converting chunk by chunk on the host (never a whole host copy),
//! and random models made directly on the device.

use super::alloc::Pinned;
use super::kernels::{self, PhiloxKey};
use super::{CudaBackend, CudaWeight};
use crate::backend::mem::Tag;
use crate::model::weights::expected_tensors;
use crate::model::{DType, HostTensor, LlamaConfig, LlamaWeights, ParamKind};
use anyhow::{anyhow, bail, Result};
use cudarc::driver::{sys::CUevent_flags, CudaEvent};
use half::bf16;
use rayon::prelude::*;

/// Bytes of each of the two pinned staging halves.
const STAGE_BYTES: usize = 16 << 20;
/// Elements converted per host task.
const PIECE: usize = 1 << 16;

/// The "step" word of the Philox key of `LlamaWeights::random`.
const RANDOM_INIT_STEP: u32 = 0xC0FFEE;

/// Double-buffered host-to-device staging: while one half is being copied, the other is filled.
struct Stager<'a> {
    be: &'a CudaBackend,
    pinned: Pinned,
    done: [CudaEvent; 2],
    next: usize,
}

impl<'a> Stager<'a> {
    fn new(be: &'a CudaBackend) -> Result<Self> {
        let dev = &be.dev;
        let pinned = Pinned::new(&dev.stream, 2 * STAGE_BYTES)?;
        let ev = || {
            dev.ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
                .map_err(|e| anyhow!("creating a CUDA event: {e}"))
        };
        Ok(Stager {
            be,
            pinned,
            done: [ev()?, ev()?],
            next: 0,
        })
    }

    /// Uploads `t` as `dtype` (BF16 or F32) into a new weight.
    fn upload(&mut self, t: &HostTensor, dtype: DType) -> Result<CudaWeight> {
        if dtype == DType::F16 {
            bail!(
                "{}: f16 device weights are not supported (use bf16 or f32)",
                t.name
            );
        }
        let dev = &self.be.dev;
        let n = t.numel();
        let esz = dtype.size();
        let buf = dev.alloc(n * esz, Tag::Weights, || {
            format!("weight {} {:?} {}", t.name, t.shape, dtype.name())
        })?;
        let per_chunk = STAGE_BYTES / esz;
        let mut start = 0;
        while start < n {
            let len = per_chunk.min(n - start);
            let half = self.next;
            self.next ^= 1;
            // The previous copy out of this half must be finished before we overwrite it.
            self.done[half]
                .synchronize()
                .map_err(|e| anyhow!("uploading {}: {e}", t.name))?;
            let stage = self.pinned.slice_mut(half * STAGE_BYTES, len * esz);
            convert_into(t, start, dtype, stage);
            dev.bind()?;
            // SAFETY: `stage` is page-locked and stays untouched until `done[half]` completes;
            // the destination range lies inside `buf`.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    buf.ptr_at(start * esz),
                    &*stage,
                    dev.stream.cu_stream(),
                )
            }
            .map_err(|e| anyhow!("uploading {}: {e}", t.name))?;
            self.done[half]
                .record(&dev.stream)
                .map_err(|e| anyhow!("uploading {}: {e}", t.name))?;
            start += len;
        }
        Ok(CudaWeight {
            buf,
            dtype,
            shape: t.shape.clone(),
            name: t.name.clone(),
        })
    }
}

/// Writes elements [start, start + out.len() / dtype.size()) of `t`, converted to `dtype`, into
/// `out` (raw little-endian bytes).
fn convert_into(t: &HostTensor, start: usize, dtype: DType, out: &mut [u8]) {
    let esz = dtype.size();
    if t.dtype == dtype {
        let src = &t.bytes()[start * esz..start * esz + out.len()];
        out.par_chunks_mut(PIECE * esz)
            .zip(src.par_chunks(PIECE * esz))
            .for_each(|(o, s)| o.copy_from_slice(s));
        return;
    }
    out.par_chunks_mut(PIECE * esz)
        .enumerate()
        .for_each(|(i, o)| {
            let mut tmp = vec![0.0f32; o.len() / esz];
            t.read_f32_range(start + i * PIECE, &mut tmp);
            match dtype {
                DType::F32 => o.copy_from_slice(bytemuck::cast_slice(&tmp)),
                DType::BF16 => {
                    for (dst, v) in o.chunks_exact_mut(2).zip(&tmp) {
                        dst.copy_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
                    }
                }
                DType::F16 => unreachable!("rejected by the caller"),
            }
        });
}

/// Storage dtype on the device of a tensor: matrices in `dtype`, vectors in f32.
pub(crate) fn device_dtype(shape: &[usize], dtype: DType) -> DType {
    if shape.len() >= 2 {
        dtype
    } else {
        DType::F32
    }
}

impl CudaBackend {
    /// Uploads a model: matrices as `dtype` (BF16 or F32), vectors (norm gains) as F32.
    /// Host tensors of any dtype are converted chunk by chunk through pinned staging memory.
    pub fn upload_weights(
        &self,
        w: &LlamaWeights<HostTensor>,
        dtype: DType,
    ) -> Result<LlamaWeights<CudaWeight>> {
        let mut st = Stager::new(self)?;
        let out = w.try_map(|_, t| st.upload(t, device_dtype(&t.shape, dtype)))?;
        self.dev.sync()?;
        Ok(out)
    }

    /// Uploads one tensor exactly as `dtype` (BF16 or F32).
    pub fn upload_tensor(&self, t: &HostTensor, dtype: DType) -> Result<CudaWeight> {
        let mut st = Stager::new(self)?;
        let w = st.upload(t, dtype)?;
        self.dev.sync()?;
        Ok(w)
    }

    /// A weight's values as f32 on the host (waits for queued work).
    pub fn weight_to_host(&self, w: &CudaWeight) -> Result<Vec<f32>> {
        match w.dtype {
            DType::F32 => self.buf_to_host(&w.buf, w.numel()),
            DType::BF16 => Ok(self
                .buf_to_host::<u16>(&w.buf, w.numel())?
                .into_iter()
                .map(|b| bf16::from_bits(b).to_f32())
                .collect()),
            DType::F16 => bail!("{}: f16 device weights are not supported", w.name),
        }
    }

    /// A weight as a host tensor in its device dtype (bf16 stays bf16, bit for bit).
    pub fn weight_to_host_tensor(&self, w: &CudaWeight) -> Result<HostTensor> {
        let n = w.numel();
        Ok(match w.dtype {
            DType::F32 => HostTensor::from_f32(
                w.name.clone(),
                w.shape.clone(),
                &self.buf_to_host::<f32>(&w.buf, n)?,
            ),
            DType::BF16 => HostTensor::from_bytes(
                w.name.clone(),
                w.shape.clone(),
                DType::BF16,
                bytemuck::cast_slice(&self.buf_to_host::<u16>(&w.buf, n)?),
            ),
            DType::F16 => bail!("{}: f16 device weights are not supported", w.name),
        })
    }

    /// A model of `cfg`'s shape with random weights made on the device (for `zoft init` and
    /// benchmarks): the same values as `LlamaWeights::random(cfg, seed, _)` (normal(0, 0.05)
    /// matrices, gains 1 + 0.1 z, Philox keyed by (seed, 0xC0FFEE, tensor id)), matrices stored
    /// as `dtype`, vectors as f32.
    pub fn random_weights(
        &self,
        cfg: &LlamaConfig,
        seed: u64,
        dtype: DType,
    ) -> Result<LlamaWeights<CudaWeight>> {
        let mut tensors = Vec::new();
        for (i, (name, shape, kind)) in expected_tensors(cfg).into_iter().enumerate() {
            let n: usize = shape.iter().product();
            let dt = device_dtype(&shape, dtype);
            let buf = self.dev.alloc(n * dt.size(), Tag::Weights, || {
                format!("weight {name} {shape:?} {}", dt.name())
            })?;
            let (scale, shift) = match kind {
                ParamKind::Norm => (0.1f32, 1.0f32),
                _ => (0.05f32, 0.0f32),
            };
            let key = PhiloxKey {
                seed,
                step: RANDOM_INIT_STEP,
                tensor: i as u32,
            };
            kernels::fill_normal(&self.dev, buf.ptr(), dt, n, key, 0, scale, shift)?;
            tensors.push(CudaWeight {
                buf,
                dtype: dt,
                shape,
                name,
            });
        }
        self.dev.sync()?;
        Ok(LlamaWeights::from_ordered(cfg, tensors))
    }
}
