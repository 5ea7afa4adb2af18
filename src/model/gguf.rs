//! GGUF (v2/v3, little-endian) reader: header, metadata, tensor infos, and dequantization of
//! the tensor types zoft imports (F32, F16, BF16, Q8_0, Q4_0, Q4_1) to f32.
//!
//! Layout (llama.cpp's `gguf` format): magic "GGUF", u32 version, u64 tensor count, u64
//! metadata count, the metadata key/values, the tensor infos, padding to the alignment, then
//! the tensor data. Tensor offsets are relative to the start of the data section.

use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// One metadata value. Arrays hold values of a single type.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// Any integer value that is non-negative (GGUF writers use different widths for ids and
    /// counts, so readers should not insist on one).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v as i64),
            GgufValue::I16(v) => Some(v as i64),
            GgufValue::I32(v) => Some(v as i64),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Floats as f64. An f32 is converted through its shortest decimal spelling, so a stored
    /// 1e-5f32 reads as 1e-5 (what the writer meant) rather than 9.99999974e-6.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => v.to_string().parse().ok(),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::F32(_) => "f32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F64(_) => "f64",
        }
    }
}

/// Short human-readable form: long strings and arrays are abbreviated (for `zoft info`).
impl fmt::Display for GgufValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgufValue::String(s) if s.chars().count() > 60 => {
                let head: String = s.chars().take(57).collect();
                write!(f, "{head:?}... ({} chars)", s.chars().count())
            }
            GgufValue::String(s) => write!(f, "{s:?}"),
            GgufValue::Array(a) if a.len() > 4 => {
                write!(
                    f,
                    "[{}, {}, ... ({} {})]",
                    a[0],
                    a[1],
                    a.len(),
                    a[0].type_name()
                )
            }
            GgufValue::Array(a) => {
                let items: Vec<String> = a.iter().map(|v| v.to_string()).collect();
                write!(f, "[{}]", items.join(", "))
            }
            GgufValue::U8(v) => write!(f, "{v}"),
            GgufValue::I8(v) => write!(f, "{v}"),
            GgufValue::U16(v) => write!(f, "{v}"),
            GgufValue::I16(v) => write!(f, "{v}"),
            GgufValue::U32(v) => write!(f, "{v}"),
            GgufValue::I32(v) => write!(f, "{v}"),
            GgufValue::U64(v) => write!(f, "{v}"),
            GgufValue::I64(v) => write!(f, "{v}"),
            GgufValue::F32(v) => write!(f, "{v}"),
            GgufValue::F64(v) => write!(f, "{v}"),
            GgufValue::Bool(v) => write!(f, "{v}"),
        }
    }
}

/// ggml tensor type ids (ggml.h `enum ggml_type`); the ones zoft dequantizes have constants.
pub const GGML_F32: u32 = 0;
pub const GGML_F16: u32 = 1;
pub const GGML_Q4_0: u32 = 2;
pub const GGML_Q4_1: u32 = 3;
pub const GGML_Q8_0: u32 = 8;
pub const GGML_BF16: u32 = 30;

/// Name of a ggml type id, for messages.
pub fn ggml_type_name(t: u32) -> String {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
    ];
    NAMES
        .get(t as usize)
        .map_or_else(|| format!("unknown type {t}"), |s| s.to_string())
}

/// (elements per block, bytes per block) of a ggml type, where known. Used to bound-check
/// tensor data even for types zoft cannot dequantize.
fn block_layout(t: u32) -> Option<(usize, usize)> {
    Some(match t {
        0 => (1, 4),
        1 | 30 => (1, 2),
        2 => (32, 18),
        3 => (32, 20),
        6 => (32, 22),
        7 => (32, 24),
        8 => (32, 34),
        9 => (32, 36),
        10 => (256, 84),
        11 => (256, 110),
        12 => (256, 144),
        13 => (256, 176),
        14 => (256, 210),
        15 => (256, 292),
        24 => (1, 1),
        25 => (1, 2),
        26 => (1, 4),
        27 | 28 => (1, 8),
        _ => return None,
    })
}

pub fn is_supported_type(t: u32) -> bool {
    matches!(
        t,
        GGML_F32 | GGML_F16 | GGML_BF16 | GGML_Q8_0 | GGML_Q4_0 | GGML_Q4_1
    )
}

pub const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1";

/// Where one tensor lives in the file.
#[derive(Clone, Debug)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension, the row length.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    /// Data size in bytes, when the type's block layout is known.
    pub n_bytes: Option<usize>,
}

impl GgufTensorInfo {
    pub fn numel(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }

    /// Shape in row-major (PyTorch/HF) order: the ggml dims reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn type_name(&self) -> String {
        ggml_type_name(self.ggml_type)
    }
}

/// An open, memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub alignment: usize,
    /// Absolute offset of the tensor data section.
    pub data_offset: usize,
    /// Metadata in file order.
    pub metadata: Vec<(String, GgufValue)>,
    pub tensors: Vec<GgufTensorInfo>,
    index: HashMap<String, usize>,
    map: Mmap,
}

/// Opens a GGUF file and reads its header, metadata and tensor infos (no tensor data is
/// touched). Useful for `zoft info`.
pub fn read_gguf_metadata(path: &Path) -> Result<GgufFile> {
    GgufFile::open(path)
}

/// Bounds-checked little-endian reader over the mapped bytes. Every failure is a truncation
/// (or a corrupt length field), reported with what was being read.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.buf.len() - self.pos {
            bail!(
                "truncated file: reading {what} needs {n} bytes at offset {} but the file is {} bytes",
                self.pos,
                self.buf.len()
            );
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().unwrap())
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        let bytes = self.take(len, what)?;
        // Token strings are sometimes not valid UTF-8 (byte tokens); keep them readable.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, ty: u32, what: &str) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(what)?[0]),
            1 => GgufValue::I8(self.array::<1>(what)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => GgufValue::U32(self.u32(what)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => bail!("{what}: invalid bool byte {b}"),
            },
            8 => GgufValue::String(self.string(what)?),
            9 => {
                let elem = self.u32(what)?;
                let n = self.u64(what)?;
                // Every element takes at least one byte: a count beyond the remaining bytes is
                // a corrupt or truncated file, caught before allocating for it.
                if n > (self.buf.len() - self.pos) as u64 {
                    bail!(
                        "truncated file: {what} claims {n} array elements at offset {} but the file is {} bytes",
                        self.pos,
                        self.buf.len()
                    );
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem, what)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64(what)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            t => bail!("{what}: unknown metadata value type {t} (corrupt file?)"),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("opening GGUF file {}", path.display()))?;
        // SAFETY: a read-only map; the file must not be truncated by another process while
        // mapped, the same contract as every mmap-based loader.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("memory-mapping {}", path.display()))?;
        // Flattened into one message so that printing just the top-level error names the file.
        Self::parse(path, map).map_err(|e| anyhow::anyhow!("GGUF file {}: {e:#}", path.display()))
    }

    fn parse(path: &Path, map: Mmap) -> Result<Self> {
        let mut c = Cursor {
            buf: &map[..],
            pos: 0,
        };
        let magic = c.array::<4>("the magic number")?;
        if &magic != b"GGUF" {
            bail!("bad magic {magic:02x?}: not a GGUF file (expected the bytes \"GGUF\")");
        }
        let version = c.u32("the version")?;
        match version {
            2 | 3 => {}
            1 => bail!("GGUF version 1 is not supported (only versions 2 and 3); re-convert the model with a current llama.cpp"),
            v if v.swap_bytes() <= 3 => bail!("big-endian GGUF files are not supported"),
            v => bail!("unsupported GGUF version {v} (zoft reads versions 2 and 3)"),
        }
        let n_tensors = c.u64("the tensor count")?;
        let n_kv = c.u64("the metadata count")?;
        let mut metadata = Vec::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&format!("the type of metadata {key}"))?;
            let value = c.value(ty, &format!("metadata {key}"))?;
            metadata.push((key, value));
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => 32,
            Some((_, v)) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a as usize,
                _ => bail!("general.alignment {v} is not a positive power of two"),
            },
        };
        let mut infos = Vec::new();
        for i in 0..n_tensors {
            let name = c.string(&format!("the name of tensor #{i}"))?;
            let n_dims = c.u32(&format!("the rank of tensor {name}"))?;
            if n_dims > 4 {
                bail!("tensor {name} has {n_dims} dimensions (GGUF allows at most 4)");
            }
            let mut dims = Vec::new();
            for _ in 0..n_dims {
                dims.push(c.u64(&format!("the shape of tensor {name}"))?);
            }
            let ggml_type = c.u32(&format!("the type of tensor {name}"))?;
            let rel = c.u64(&format!("the data offset of tensor {name}"))?;
            infos.push((name, dims, ggml_type, rel));
        }
        let data_offset = c.pos.div_ceil(alignment) * alignment;
        let file_len = map.len();
        let mut tensors = Vec::with_capacity(infos.len());
        let mut index = HashMap::new();
        for (name, dims, ggml_type, rel) in infos {
            if rel % alignment as u64 != 0 {
                bail!("tensor {name}: data offset {rel} is not a multiple of the alignment {alignment}");
            }
            let numel = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let numel =
                numel.with_context(|| format!("tensor {name}: shape {dims:?} overflows"))?;
            let n_bytes = match block_layout(ggml_type) {
                Some((blk, bytes)) => {
                    let row = dims.first().copied().unwrap_or(1);
                    if row % blk as u64 != 0 {
                        bail!(
                            "tensor {name}: row length {row} is not a multiple of the {} block size {blk}",
                            ggml_type_name(ggml_type)
                        );
                    }
                    Some((numel / blk as u64 * bytes as u64) as usize)
                }
                None => None,
            };
            let offset = data_offset as u64 + rel;
            let end = offset + n_bytes.unwrap_or(0) as u64;
            if end > file_len as u64 {
                bail!(
                    "truncated file: tensor {name} data (bytes {offset}..{end}) lies past the end of the file ({file_len} bytes)"
                );
            }
            if index.insert(name.clone(), tensors.len()).is_some() {
                bail!("tensor {name} appears twice");
            }
            tensors.push(GgufTensorInfo {
                name,
                dims,
                ggml_type,
                offset: offset as usize,
                n_bytes,
            });
        }
        if !tensors.is_empty() && data_offset > file_len {
            bail!("truncated file: tensor data would start at {data_offset} but the file is {file_len} bytes");
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            alignment,
            data_offset,
            metadata,
            tensors,
            index,
            map,
        })
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw data bytes of a tensor whose type layout is known.
    pub fn tensor_bytes(&self, t: &GgufTensorInfo) -> Result<&[u8]> {
        let Some(n) = t.n_bytes else {
            bail!("{}: {}", self.path.display(), unsupported_msg(t));
        };
        Ok(&self.map[t.offset..t.offset + n])
    }

    /// Dequantizes a tensor to f32 in its stored (row-major, ggml) order.
    pub fn tensor_f32(&self, t: &GgufTensorInfo) -> Result<Vec<f32>> {
        if !is_supported_type(t.ggml_type) {
            bail!("{}: {}", self.path.display(), unsupported_msg(t));
        }
        let bytes = self.tensor_bytes(t)?;
        let mut out = vec![0f32; t.numel()];
        dequantize(t.ggml_type, bytes, &mut out);
        Ok(out)
    }
}

pub fn unsupported_msg(t: &GgufTensorInfo) -> String {
    format!(
        "tensor {} has GGUF type {} ({}); zoft imports {SUPPORTED_TYPES}",
        t.name,
        t.type_name(),
        t.ggml_type
    )
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `src` (whole blocks of a supported type) into `out`. Panics on a length
/// mismatch, which callers rule out from the tensor info.
pub fn dequantize(ggml_type: u32, src: &[u8], out: &mut [f32]) {
    match ggml_type {
        GGML_F32 => out
            .par_iter_mut()
            .zip(src.par_chunks_exact(4))
            .for_each(|(o, b)| *o = f32::from_le_bytes(b.try_into().unwrap())),
        GGML_F16 => out
            .par_iter_mut()
            .zip(src.par_chunks_exact(2))
            .for_each(|(o, b)| *o = f16::from_le_bytes([b[0], b[1]]).to_f32()),
        GGML_BF16 => out
            .par_iter_mut()
            .zip(src.par_chunks_exact(2))
            .for_each(|(o, b)| *o = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        // Q8_0: f16 scale d, then 32 signed bytes q; x = d * q.
        GGML_Q8_0 => out
            .par_chunks_mut(32)
            .zip(src.par_chunks_exact(34))
            .for_each(|(o, b)| {
                let d = f16_at(b, 0);
                for (x, &q) in o.iter_mut().zip(&b[2..34]) {
                    *x = d * (q as i8) as f32;
                }
            }),
        // Q4_0: f16 scale d, 16 bytes of nibbles; element j is the low nibble of byte j,
        // element j + 16 the high nibble; x = d * (nibble - 8).
        GGML_Q4_0 => out
            .par_chunks_mut(32)
            .zip(src.par_chunks_exact(18))
            .for_each(|(o, b)| {
                let d = f16_at(b, 0);
                for (j, &q) in b[2..18].iter().enumerate() {
                    o[j] = d * ((q & 0x0f) as i32 - 8) as f32;
                    o[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
                }
            }),
        // Q4_1: f16 scale d, f16 minimum m, 16 bytes of nibbles (same order); x = d * nibble + m.
        GGML_Q4_1 => out
            .par_chunks_mut(32)
            .zip(src.par_chunks_exact(20))
            .for_each(|(o, b)| {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for (j, &q) in b[4..20].iter().enumerate() {
                    o[j] = d * (q & 0x0f) as f32 + m;
                    o[j + 16] = d * (q >> 4) as f32 + m;
                }
            }),
        t => panic!(
            "dequantize called with unsupported type {}",
            ggml_type_name(t)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_block_order_and_formula() {
        let mut b = vec![0u8; 20];
        b[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        for j in 0..16 {
            b[4 + j] = (j as u8) | ((15 - j as u8) << 4);
        }
        let mut out = [0f32; 32];
        dequantize(GGML_Q4_1, &b, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], 0.5 * j as f32 - 1.0);
            assert_eq!(out[j + 16], 0.5 * (15 - j) as f32 - 1.0);
        }
    }

    #[test]
    fn f32_metadata_reads_as_intended_decimal() {
        assert_eq!(GgufValue::F32(1e-5).as_f64(), Some(1e-5));
        assert_eq!(GgufValue::I32(-1).as_u64(), None);
        assert_eq!(GgufValue::U8(7).as_u64(), Some(7));
    }

    #[test]
    fn type_names() {
        assert_eq!(ggml_type_name(14), "Q6_K");
        assert_eq!(ggml_type_name(30), "BF16");
        assert_eq!(ggml_type_name(99), "unknown type 99");
    }
}
