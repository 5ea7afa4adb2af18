//! Host tensors: a named, shaped view of f32/f16/bf16 bytes that lives either inside a
//! copy-on-write memory map of a safetensors file (zero-copy) or in an owned buffer.

use anyhow::{bail, Result};
use half::{bf16, f16};
use memmap2::MmapMut;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }

    /// The name HF transformers gives it (config.json's `torch_dtype`).
    pub fn hf_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => DType::F32,
            "f16" | "float16" => DType::F16,
            "bf16" | "bfloat16" => DType::BF16,
            other => bail!("unknown dtype {other:?} (expected f32, f16 or bf16)"),
        })
    }
}

enum Storage {
    /// A range inside a copy-on-write map. Writes never reach the file.
    Mapped { map: Arc<MmapMut>, offset: usize },
    /// 8-byte aligned owned bytes.
    Owned(Vec<u64>),
}

/// A tensor in host memory. The byte range is exclusively owned by this value (no two
/// tensors of a model overlap), which is what makes `bytes_mut` sound on shared maps.
pub struct HostTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    storage: Storage,
    byte_len: usize,
}

// SAFETY: the mapped byte range is disjoint from every other tensor's, and the map is kept
// alive by the Arc; mutation requires &mut self.
unsafe impl Send for HostTensor {}
unsafe impl Sync for HostTensor {}

impl HostTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// A tensor backed by a range of a copy-on-write map. The caller guarantees that the
    /// range lies inside the map and that no other tensor uses it.
    pub(crate) fn mapped(
        name: String,
        shape: Vec<usize>,
        dtype: DType,
        map: Arc<MmapMut>,
        offset: usize,
    ) -> Self {
        let byte_len = shape.iter().product::<usize>() * dtype.size();
        assert!(offset + byte_len <= map.len());
        if !(map.as_ptr() as usize + offset).is_multiple_of(dtype.size()) {
            // Unaligned in the file: fall back to an owned copy.
            let bytes = &map[offset..offset + byte_len];
            return Self::from_bytes(name, shape, dtype, bytes);
        }
        HostTensor {
            name,
            shape,
            dtype,
            storage: Storage::Mapped { map, offset },
            byte_len,
        }
    }

    pub fn from_bytes(name: String, shape: Vec<usize>, dtype: DType, bytes: &[u8]) -> Self {
        let byte_len = shape.iter().product::<usize>() * dtype.size();
        assert_eq!(
            bytes.len(),
            byte_len,
            "tensor {name}: byte length does not match shape"
        );
        let mut buf = vec![0u64; byte_len.div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut buf)[..byte_len].copy_from_slice(bytes);
        HostTensor {
            name,
            shape,
            dtype,
            storage: Storage::Owned(buf),
            byte_len,
        }
    }

    pub fn from_f32(name: impl Into<String>, shape: Vec<usize>, data: &[f32]) -> Self {
        Self::from_bytes(name.into(), shape, DType::F32, bytemuck::cast_slice(data))
    }

    /// Turns this owned tensor into an f32 tensor of `shape` over the same buffer, grown if
    /// it must be and never shrunk, so one scratch tensor serves tensors of every shape
    /// without a fresh allocation (and its page faults) each time. The contents are stale.
    /// Returns the buffer's size in bytes.
    pub(crate) fn reuse_as_f32(&mut self, name: &str, shape: &[usize]) -> usize {
        let Storage::Owned(buf) = &mut self.storage else {
            panic!("{}: a mapped tensor cannot be reused as scratch", self.name);
        };
        let byte_len = shape.iter().product::<usize>() * 4;
        if buf.len() * 8 < byte_len {
            buf.resize(byte_len.div_ceil(8), 0);
        }
        self.name.clear();
        self.name.push_str(name);
        self.shape.clear();
        self.shape.extend_from_slice(shape);
        self.dtype = DType::F32;
        self.byte_len = byte_len;
        buf.len() * 8
    }

    /// Converts f32 values into a tensor of `dtype` (round to nearest even).
    pub fn from_f32_as(
        name: impl Into<String>,
        shape: Vec<usize>,
        data: &[f32],
        dtype: DType,
    ) -> Self {
        match dtype {
            DType::F32 => Self::from_f32(name, shape, data),
            DType::F16 => {
                let v: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
                Self::from_bytes(name.into(), shape, dtype, bytemuck::cast_slice(&v))
            }
            DType::BF16 => {
                let v: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                Self::from_bytes(name.into(), shape, dtype, bytemuck::cast_slice(&v))
            }
        }
    }

    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Mapped { map, offset } => &map[*offset..*offset + self.byte_len],
            Storage::Owned(v) => &bytemuck::cast_slice(v)[..self.byte_len],
        }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.byte_len;
        match &mut self.storage {
            Storage::Mapped { map, offset } => {
                // SAFETY: see the type's invariant: this range belongs to this tensor only.
                unsafe {
                    let ptr = (map.as_ptr() as *mut u8).add(*offset);
                    std::slice::from_raw_parts_mut(ptr, len)
                }
            }
            Storage::Owned(v) => &mut bytemuck::cast_slice_mut(v)[..len],
        }
    }

    pub fn f32s(&self) -> Option<&[f32]> {
        (self.dtype == DType::F32).then(|| bytemuck::cast_slice(self.bytes()))
    }

    pub fn f32s_mut(&mut self) -> Option<&mut [f32]> {
        (self.dtype == DType::F32).then(|| bytemuck::cast_slice_mut(self.bytes_mut()))
    }

    pub fn bf16s_mut(&mut self) -> Option<&mut [bf16]> {
        (self.dtype == DType::BF16).then(|| bytemuck::cast_slice_mut(self.bytes_mut()))
    }

    pub fn f16s_mut(&mut self) -> Option<&mut [f16]> {
        (self.dtype == DType::F16).then(|| bytemuck::cast_slice_mut(self.bytes_mut()))
    }

    /// Converts elements [start, start + out.len()) to f32.
    pub fn read_f32_range(&self, start: usize, out: &mut [f32]) {
        let b = self.bytes();
        match self.dtype {
            DType::F32 => {
                out.copy_from_slice(&bytemuck::cast_slice::<u8, f32>(b)[start..start + out.len()])
            }
            DType::F16 => {
                let s: &[f16] = bytemuck::cast_slice(b);
                for (o, v) in out.iter_mut().zip(&s[start..]) {
                    *o = v.to_f32();
                }
            }
            DType::BF16 => {
                let s: &[bf16] = bytemuck::cast_slice(b);
                for (o, v) in out.iter_mut().zip(&s[start..]) {
                    *o = v.to_f32();
                }
            }
        }
    }

    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut v = vec![0.0; self.numel()];
        self.read_f32_range(0, &mut v);
        v
    }

    /// Overwrites elements [start, ..) from f32 values, rounding to this tensor's dtype.
    pub fn write_f32_range(&mut self, start: usize, src: &[f32]) {
        match self.dtype {
            DType::F32 => self.f32s_mut().unwrap()[start..start + src.len()].copy_from_slice(src),
            DType::F16 => {
                for (o, v) in self.f16s_mut().unwrap()[start..].iter_mut().zip(src) {
                    *o = f16::from_f32(*v);
                }
            }
            DType::BF16 => {
                for (o, v) in self.bf16s_mut().unwrap()[start..].iter_mut().zip(src) {
                    *o = bf16::from_f32(*v);
                }
            }
        }
    }
}

impl std::fmt::Debug for HostTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HostTensor({} {:?} {})",
            self.name,
            self.shape,
            self.dtype.name()
        )
    }
}

/// Decodes raw little-endian bytes of `dtype` into f32.
pub fn decode_into(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => out.copy_from_slice(bytemuck::cast_slice(bytes)),
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
    }
}

/// Encodes f32 values into raw little-endian bytes of `dtype` (round to nearest even).
pub fn encode_from(dtype: DType, src: &[f32], bytes: &mut [u8]) {
    match dtype {
        DType::F32 => bytes.copy_from_slice(bytemuck::cast_slice(src)),
        DType::F16 => {
            for (c, v) in bytes.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        DType::BF16 => {
            for (c, v) in bytes.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
            }
        }
    }
}
