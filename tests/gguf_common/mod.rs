//! Shared helpers for the GGUF import tests: a minimal GGUF writer and a tiny synthetic
//! LLaMA model (2 layers) whose tensors use every type zoft dequantizes.
#![allow(dead_code)]

use half::{bf16, f16};
use std::path::PathBuf;

pub enum Val {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArr(Vec<String>),
    I32Arr(Vec<i32>),
}

/// Writes GGUF v3 files (little-endian, alignment 32) from metadata and raw tensor bytes.
pub struct GgufWriter {
    pub version: u32,
    pub kvs: Vec<(String, Val)>,
    /// name, ggml dims (innermost first), ggml type id, raw bytes
    pub tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl GgufWriter {
    pub fn new() -> Self {
        GgufWriter {
            version: 3,
            kvs: vec![],
            tensors: vec![],
        }
    }

    pub fn kv(&mut self, k: &str, v: Val) -> &mut Self {
        self.kvs.push((k.to_string(), v));
        self
    }

    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, bytes: Vec<u8>) -> &mut Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), ty, bytes));
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut o = b"GGUF".to_vec();
        o.extend(self.version.to_le_bytes());
        o.extend((self.tensors.len() as u64).to_le_bytes());
        o.extend((self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            put_str(&mut o, k);
            match v {
                Val::U32(x) => {
                    o.extend(4u32.to_le_bytes());
                    o.extend(x.to_le_bytes());
                }
                Val::I32(x) => {
                    o.extend(5u32.to_le_bytes());
                    o.extend(x.to_le_bytes());
                }
                Val::F32(x) => {
                    o.extend(6u32.to_le_bytes());
                    o.extend(x.to_le_bytes());
                }
                Val::Bool(x) => {
                    o.extend(7u32.to_le_bytes());
                    o.push(*x as u8);
                }
                Val::Str(s) => {
                    o.extend(8u32.to_le_bytes());
                    put_str(&mut o, s);
                }
                Val::StrArr(a) => {
                    o.extend(9u32.to_le_bytes());
                    o.extend(8u32.to_le_bytes());
                    o.extend((a.len() as u64).to_le_bytes());
                    for s in a {
                        put_str(&mut o, s);
                    }
                }
                Val::I32Arr(a) => {
                    o.extend(9u32.to_le_bytes());
                    o.extend(5u32.to_le_bytes());
                    o.extend((a.len() as u64).to_le_bytes());
                    for x in a {
                        o.extend(x.to_le_bytes());
                    }
                }
            }
        }
        let mut rel = 0u64;
        let mut offsets = vec![];
        for (name, dims, ty, bytes) in &self.tensors {
            put_str(&mut o, name);
            o.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                o.extend(d.to_le_bytes());
            }
            o.extend(ty.to_le_bytes());
            o.extend(rel.to_le_bytes());
            offsets.push(rel);
            rel = (rel + bytes.len() as u64).div_ceil(32) * 32;
        }
        while !o.len().is_multiple_of(32) {
            o.push(0);
        }
        let start = o.len();
        for ((_, _, _, bytes), off) in self.tensors.iter().zip(offsets) {
            o.resize(start + off as usize, 0);
            o.extend(bytes);
        }
        o
    }
}

/// Deterministic pseudo-random numbers for test data.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next_u32(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u32() % 20000) as f32 / 10000.0 - 1.0
    }
}

pub const F32: u32 = 0;
pub const F16: u32 = 1;
pub const Q4_0: u32 = 2;
pub const Q4_1: u32 = 3;
pub const Q8_0: u32 = 8;
pub const BF16: u32 = 30;

/// Random bytes of `n` elements of type `ty`, and the f32 values they stand for, computed from
/// the block formulas (written here independently of zoft's dequantizer).
pub fn random_tensor(ty: u32, n: usize, rng: &mut Lcg) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = vec![];
    let mut vals = vec![];
    match ty {
        F32 => {
            for _ in 0..n {
                let x = rng.unit();
                bytes.extend(x.to_le_bytes());
                vals.push(x);
            }
        }
        F16 => {
            for _ in 0..n {
                let x = f16::from_f32(rng.unit());
                bytes.extend(x.to_le_bytes());
                vals.push(x.to_f32());
            }
        }
        BF16 => {
            for _ in 0..n {
                let x = bf16::from_f32(rng.unit());
                bytes.extend(x.to_le_bytes());
                vals.push(x.to_f32());
            }
        }
        Q8_0 => {
            for _ in 0..n / 32 {
                let d = f16::from_f32(rng.unit() * 0.01);
                bytes.extend(d.to_le_bytes());
                for _ in 0..32 {
                    let q = (rng.next_u32() % 256) as u8 as i8;
                    bytes.push(q as u8);
                    vals.push(d.to_f32() * q as f32);
                }
            }
        }
        Q4_0 | Q4_1 => {
            for _ in 0..n / 32 {
                let d = f16::from_f32(rng.unit() * 0.1);
                let m = f16::from_f32(rng.unit() * 0.5);
                bytes.extend(d.to_le_bytes());
                if ty == Q4_1 {
                    bytes.extend(m.to_le_bytes());
                }
                let nib: Vec<u8> = (0..32).map(|_| (rng.next_u32() % 16) as u8).collect();
                // byte j: low nibble = element j, high nibble = element j + 16
                for j in 0..16 {
                    bytes.push(nib[j] | (nib[j + 16] << 4));
                }
                for q in nib {
                    vals.push(if ty == Q4_0 {
                        d.to_f32() * (q as f32 - 8.0)
                    } else {
                        d.to_f32() * q as f32 + m.to_f32()
                    });
                }
            }
        }
        _ => panic!("no generator for type {ty}"),
    }
    (bytes, vals)
}

pub const DIM: usize = 32;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = 8;
pub const FFN: usize = 64;
pub const LAYERS: usize = 2;

/// A tiny GPT-2 style BPE vocabulary: "hello world" -> [14, 19].
pub fn tiny_vocab() -> (Vec<String>, Vec<String>, Vec<i32>) {
    let tokens = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "h",
        "e",
        "l",
        "o",
        "Ġ",
        "w",
        "r",
        "d",
        "he",
        "ll",
        "hell",
        "hello",
        "Ġw",
        "or",
        "Ġwor",
        "ld",
        "Ġworld",
    ];
    let merges = [
        "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld",
    ];
    let types = (0..tokens.len())
        .map(|i| if i < 3 { 3 } else { 1 })
        .collect();
    (
        tokens.iter().map(|s| s.to_string()).collect(),
        merges.iter().map(|s| s.to_string()).collect(),
        types,
    )
}

/// Expected tensor values by GGUF name, in stored (GGUF) row order.
pub type Expected = Vec<(String, Vec<usize>, Vec<f32>)>;

/// The tiny model as a GGUF writer plus the values each tensor must dequantize to.
/// `untied` adds a BF16 output.weight.
pub fn tiny_model(untied: bool) -> (GgufWriter, Expected) {
    let (tokens, merges, types) = tiny_vocab();
    let vocab = tokens.len();
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Val::Str("llama".into()))
        .kv("general.name", Val::Str("tiny".into()))
        .kv("llama.block_count", Val::U32(LAYERS as u32))
        .kv("llama.context_length", Val::U32(256))
        .kv("llama.embedding_length", Val::U32(DIM as u32))
        .kv("llama.feed_forward_length", Val::U32(FFN as u32))
        .kv("llama.attention.head_count", Val::U32(HEADS as u32))
        .kv("llama.attention.head_count_kv", Val::U32(KV_HEADS as u32))
        .kv("llama.rope.freq_base", Val::F32(100000.0))
        .kv("llama.attention.layer_norm_rms_epsilon", Val::F32(1e-5))
        .kv("llama.rope.dimension_count", Val::U32(HEAD_DIM as u32))
        .kv("tokenizer.ggml.model", Val::Str("gpt2".into()))
        .kv("tokenizer.ggml.pre", Val::Str("smollm".into()))
        .kv("tokenizer.ggml.tokens", Val::StrArr(tokens))
        .kv("tokenizer.ggml.token_type", Val::I32Arr(types))
        .kv("tokenizer.ggml.merges", Val::StrArr(merges))
        .kv("tokenizer.ggml.bos_token_id", Val::U32(1))
        .kv("tokenizer.ggml.eos_token_id", Val::U32(2))
        .kv("tokenizer.ggml.unknown_token_id", Val::U32(0))
        .kv("tokenizer.ggml.padding_token_id", Val::U32(2))
        .kv("tokenizer.ggml.add_bos_token", Val::Bool(false))
        .kv(
            "tokenizer.chat_template",
            Val::Str("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into()),
        );
    let mut rng = Lcg(42);
    let mut expected = vec![];
    let mut add = |w: &mut GgufWriter, name: String, shape_hf: Vec<usize>, ty: u32| {
        let n = shape_hf.iter().product();
        let (bytes, vals) = random_tensor(ty, n, &mut rng);
        let dims: Vec<u64> = shape_hf.iter().rev().map(|&d| d as u64).collect();
        w.tensor(&name, &dims, ty, bytes);
        expected.push((name, shape_hf, vals));
    };
    add(&mut w, "token_embd.weight".into(), vec![vocab, DIM], Q8_0);
    let kv = KV_HEADS * HEAD_DIM;
    for l in 0..LAYERS {
        let b = |s: &str| format!("blk.{l}.{s}.weight");
        add(&mut w, b("attn_norm"), vec![DIM], F32);
        add(&mut w, b("attn_q"), vec![DIM, DIM], Q8_0);
        add(&mut w, b("attn_k"), vec![kv, DIM], Q4_0);
        add(&mut w, b("attn_v"), vec![kv, DIM], Q4_1);
        add(&mut w, b("attn_output"), vec![DIM, DIM], F16);
        add(&mut w, b("ffn_norm"), vec![DIM], F32);
        add(&mut w, b("ffn_gate"), vec![FFN, DIM], Q4_1);
        add(&mut w, b("ffn_up"), vec![FFN, DIM], Q8_0);
        add(&mut w, b("ffn_down"), vec![DIM, FFN], Q4_0);
    }
    add(&mut w, "output_norm.weight".into(), vec![DIM], F32);
    if untied {
        add(&mut w, "output.weight".into(), vec![vocab, DIM], BF16);
    }
    (w, expected)
}

/// A fresh, empty scratch directory under the system temp dir (removed by the caller).
pub fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("zoft-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
