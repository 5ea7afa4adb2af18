//! The forward's kernels (csrc/{convert,embed,norm,rope,attention,swiglu,logits}.cu), emulated on
//! the CPU, against the CPU backend.
//!
//! Each test calls the launcher of kernels.rs the way CudaBackend (src/backend/cuda/mod.rs) does,
//! with the same argument meanings and layouts, and the CPU backend's twin of the op on the same
//! fresh random inputs. Copies and conversions must give the CPU's bits; ops whose kernels reduce
//! in another order or call libm (expf, sincosf) where the CPU has its own must come within a
//! relative norm error justified at each bound. Output buffers are poisoned with NaN first, so an
//! element the kernel skips fails the comparison; in-place ops, which cannot be poisoned, are
//! checked on inputs their result moves far from. Each check also names the kernel the launcher
//! picked, so a test of one variant cannot silently run another.

use super::{addr, addr_mut, emulator, rel_err, same_bits, Emulator};
use crate::backend::cpu::{self, CpuAct, CpuBackend};
use crate::backend::cuda::context::{Args, Launch};
use crate::backend::cuda::kernels;
use crate::backend::mem::Tag;
use crate::backend::{AttnShape, Backend, SeqLayout};
use crate::model::{DType, HostTensor};
use crate::rng::Philox;
use anyhow::Result;
use half::bf16;
use std::cell::RefCell;

/// A bf16 NaN, to poison bf16 outputs: not what f32::NAN converts to (0x7fc0 on the host, the
/// canonical 0x7fff on the device), so a written NaN differs from an unwritten one.
const BF16_POISON: u16 = 0x7fc1;

/// RMSNorm's epsilon in LLaMA checkpoints.
const EPS: f32 = 1e-5;

/// n normals of scale `scale`; each tensor of a test takes its own seed.
fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let p = Philox::new(seed, 7, 3);
    (0..n).map(|i| scale * p.normal(i as u64)).collect()
}

/// The address of a buffer the kernel moves 16 bytes at a time (float4), which the device's
/// allocations always satisfy and a misaligned host buffer would turn into a crash.
fn aligned16(a: u64) -> u64 {
    assert_eq!(a % 16, 0, "host buffer not 16-byte aligned");
    a
}

/// bf16 bits as the f32 values they widen to (exactly: a shift), for `same_bits` and `rel_err`.
fn widen(bits: &[u16]) -> Vec<f32> {
    bits.iter()
        .map(|&b| f32::from_bits((b as u32) << 16))
        .collect()
}

fn act(cpu: &CpuBackend, data: &[f32], rows: usize, cols: usize) -> CpuAct {
    cpu.from_host(data, rows, cols, Tag::Scratch).unwrap()
}

/// A `Launch` that runs the emulator and remembers which kernels were launched.
struct Recorder<'a> {
    emu: &'a Emulator,
    launched: RefCell<Vec<&'static str>>,
}

impl Launch for Recorder<'_> {
    fn launch(
        &self,
        name: &'static str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: usize,
        args: Args,
    ) -> Result<()> {
        self.launched.borrow_mut().push(name);
        self.emu.launch(name, grid, block, smem, args)
    }
}

/// Runs `f` on the emulator and returns the names of the kernels it launched (one per launch).
fn launches(emu: &Emulator, f: impl FnOnce(&dyn Launch) -> Result<()>) -> Vec<&'static str> {
    let rec = Recorder {
        emu,
        launched: RefCell::new(Vec::new()),
    };
    f(&rec).unwrap();
    rec.launched.into_inner()
}

/// Asserts that every launch of `f` ran kernel `name` and that there was at least one.
fn run_kernel(emu: &Emulator, name: &str, f: impl FnOnce(&dyn Launch) -> Result<()>) {
    let ran = launches(emu, f);
    assert!(
        !ran.is_empty() && ran.iter().all(|&k| k == name),
        "expected {name}, launched {ran:?}"
    );
}

#[test]
fn f32_to_bf16_rounds_to_nearest_even_as_the_host_does() {
    let Some(emu) = emulator() else { return };
    // Normals at three magnitudes (subnormal bf16 included), then what random values almost
    // never hit: exact ties going down and up to even, just past a tie, overflow to infinity,
    // infinities, a subnormal, the smallest normal, signed zero, and a NaN.
    let mut src = randn(1001, 101, 1.0);
    src.extend(randn(257, 102, 1e-39));
    src.extend(randn(257, 103, 1e30));
    src.extend([
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
        f32::from_bits(0xbf80_8001),
        f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-40,
        f32::MIN_POSITIVE,
        -0.0,
        f32::NAN,
    ]);
    let n = src.len();
    let mut got = vec![BF16_POISON; n];
    run_kernel(emu, "f32_to_bf16", |dev| {
        kernels::f32_to_bf16(dev, addr(&src), addr_mut(&mut got), n)
    });
    let want: Vec<u16> = src.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
    // A NaN's payload is the shim's (the device gives the canonical 0x7fff): only that it is a
    // NaN, and a written one, is the kernel's contract.
    let nan = n - 1;
    assert!(f32::from_bits((got[nan] as u32) << 16).is_nan() && got[nan] != BF16_POISON);
    same_bits(&widen(&got[..nan]), &widen(&want[..nan]), "f32 -> bf16");
}

#[test]
fn bf16_to_f32_widens_every_bit_pattern_exactly() {
    let Some(emu) = emulator() else { return };
    // All 65536 patterns: the whole domain costs less than a random sample would need to
    // reach the subnormals, infinities and NaNs.
    let src: Vec<u16> = (0..=u16::MAX).collect();
    let n = src.len();
    // A NaN no widening produces (its low half is not zero), so a skipped NaN pattern shows.
    let mut got = vec![f32::from_bits(0x7fc0_0001); n];
    run_kernel(emu, "bf16_to_f32", |dev| {
        kernels::bf16_to_f32(dev, addr(&src), addr_mut(&mut got), n)
    });
    // half quiets signalling NaNs while widening; the kernel, like the device's conversion,
    // only shifts, which the NaN patterns are held to.
    let want: Vec<f32> = src
        .iter()
        .map(|&b| {
            if b & 0x7fff > 0x7f80 {
                f32::from_bits((b as u32) << 16)
            } else {
                bf16::from_bits(b).to_f32()
            }
        })
        .collect();
    same_bits(&got, &want, "bf16 -> f32");
}

/// The LM head's gather (CudaBackend::head_chunks): hidden rows listed by i32 indices, taken a
/// chunk at a time with the index pointer advanced to the chunk, stored as the head's dtype.
/// Returns the gathered rows as f32 (bf16 widened) and the CPU's f32 rows.
fn gather_case(emu: &Emulator, dtype: DType, cols: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let cpu = CpuBackend::new();
    let n_src = 9;
    let src = randn(n_src * cols, seed, 1.5);
    // Out of order, repeated, the first and the last row.
    let rows: Vec<i32> = vec![4, 0, 8, 4, 7, 2, 3];
    let n = rows.len();
    let chunk = 3;
    let hidden = act(&cpu, &src, n_src, cols);
    let listed: Vec<usize> = rows.iter().map(|&r| r as usize).collect();
    let want = cpu::gather_rows(&hidden, &listed).unwrap();
    let kernel = match dtype {
        DType::F32 => "gather_rows_f32",
        _ => "gather_rows_bf16",
    };
    let mut out_f32 = vec![f32::NAN; n * cols];
    let mut out_bf16 = vec![BF16_POISON; n * cols];
    for c0 in (0..n).step_by(chunk) {
        let m = chunk.min(n - c0);
        let out = match dtype {
            DType::F32 => addr_mut(&mut out_f32[c0 * cols..]),
            _ => addr_mut(&mut out_bf16[c0 * cols..]),
        };
        run_kernel(emu, kernel, |dev| {
            kernels::gather_rows(dev, addr(&src), addr(&rows[c0..]), out, dtype, m, cols)
        });
    }
    match dtype {
        DType::F32 => (out_f32, want),
        _ => (widen(&out_bf16), want),
    }
}

#[test]
fn gather_rows_f32_copies_the_listed_rows_bit_for_bit() {
    let Some(emu) = emulator() else { return };
    // 100 columns: fewer than the block's threads; 300: more, so threads loop.
    for (cols, seed) in [(100, 201), (300, 202)] {
        let (got, want) = gather_case(emu, DType::F32, cols, seed);
        same_bits(&got, &want, &format!("gather_rows f32, {cols} columns"));
    }
}

#[test]
fn gather_rows_bf16_rounds_the_listed_rows_as_the_host_does() {
    let Some(emu) = emulator() else { return };
    for (cols, seed) in [(100, 211), (300, 212)] {
        let (got, rows) = gather_case(emu, DType::BF16, cols, seed);
        let want: Vec<f32> = rows.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        same_bits(&got, &want, &format!("gather_rows bf16, {cols} columns"));
    }
}

/// CudaBackend::embed against CpuBackend::embed: u32 ids into a [vocab x d] table of `dtype`.
fn check_embed(emu: &Emulator, dtype: DType, d: usize, seed: u64) {
    let cpu = CpuBackend::new();
    let vocab = 37;
    let table = HostTensor::from_f32_as(
        "embed_tokens",
        vec![vocab, d],
        &randn(vocab * d, seed, 0.7),
        dtype,
    );
    // Repeated ids, and both ends of the table.
    let ids: Vec<u32> = vec![5, 36, 0, 5, 17, 29, 36];
    let rows = ids.len();
    let mut want = act(&cpu, &vec![f32::NAN; rows * d], rows, d);
    cpu.embed(&table, &ids, &mut want).unwrap();
    let mut got = vec![f32::NAN; rows * d];
    let kernel = match dtype {
        DType::F32 => "embed_f32",
        _ => "embed_bf16",
    };
    run_kernel(emu, kernel, |dev| {
        kernels::embed(
            dev,
            addr(table.bytes()),
            dtype,
            addr(&ids),
            addr_mut(&mut got),
            rows,
            d,
        )
    });
    same_bits(&got, &want.data, &format!("{kernel}, d = {d}"));
}

#[test]
fn embed_f32_table_copies_rows_bit_for_bit() {
    let Some(emu) = emulator() else { return };
    check_embed(emu, DType::F32, 100, 301);
    check_embed(emu, DType::F32, 300, 302);
}

#[test]
fn embed_bf16_table_widens_rows_bit_for_bit() {
    let Some(emu) = emulator() else { return };
    check_embed(emu, DType::BF16, 100, 311);
    check_embed(emu, DType::BF16, 300, 312);
}

/// Hidden sizes of the norms: multiples of 4 take the float4 path (100: one warp; 4100: more
/// float4s than 1024 threads, so threads loop), the others the scalar path (99: four warps;
/// 1001: one block of 1024 threads, some idle).
const NORM_DIMS: [usize; 4] = [100, 4100, 99, 1001];

/// The norm kernel for gains stored as `dtype`, with the gain as CudaBackend passes it.
fn norm_gain(d: usize, dtype: DType, seed: u64) -> HostTensor {
    let g: Vec<f32> = randn(d, seed, 0.1).iter().map(|z| 1.0 + z).collect();
    HostTensor::from_f32_as("norm.weight", vec![d], &g, dtype)
}

/// The gain's address: bf16 gains are read 4 at a time (8 bytes), f32 gains as float4.
fn gain_addr(w: &HostTensor) -> u64 {
    match w.dtype {
        DType::F32 => aligned16(addr(w.bytes())),
        _ => {
            assert_eq!(addr(w.bytes()) % 8, 0, "bf16 gain not 8-byte aligned");
            addr(w.bytes())
        }
    }
}

#[test]
fn rmsnorm_matches_the_cpu_for_f32_and_bf16_gains() {
    let Some(emu) = emulator() else { return };
    let cpu = CpuBackend::new();
    let rows = 7;
    for (i, &d) in NORM_DIMS.iter().enumerate() {
        for (dtype, kernel) in [(DType::F32, "rmsnorm_f32w"), (DType::BF16, "rmsnorm_bf16w")] {
            let seed = 400 + 10 * i as u64;
            let x = randn(rows * d, seed, 2.0);
            let w = norm_gain(d, dtype, seed + 1);
            let xa = act(&cpu, &x, rows, d);
            let mut want = act(&cpu, &vec![f32::NAN; rows * d], rows, d);
            cpu.rmsnorm(&xa, &w, EPS, &mut want).unwrap();
            let mut got = vec![f32::NAN; rows * d];
            run_kernel(emu, kernel, |dev| {
                kernels::rmsnorm(
                    dev,
                    aligned16(addr(&x)),
                    gain_addr(&w),
                    dtype,
                    addr_mut(&mut got),
                    rows,
                    d,
                    EPS,
                )
            });
            let err = rel_err(&got, &want.data);
            eprintln!("{kernel} d = {d}: relative error {err:.2e}");
            // Every operation is rounded f32 on both sides; only the sum of squares runs in
            // another order (a block tree against 16 lanes), which moves the scale by an ulp
            // or two.
            assert!(err < 1e-6, "{kernel} d = {d}: relative error {err:.2e}");
        }
    }
}

#[test]
fn add_rmsnorm_updates_the_residual_exactly_and_matches_the_cpu_norm() {
    let Some(emu) = emulator() else { return };
    let cpu = CpuBackend::new();
    let rows = 7;
    for (i, &d) in NORM_DIMS.iter().enumerate() {
        for (dtype, kernel) in [
            (DType::F32, "add_rmsnorm_f32w"),
            (DType::BF16, "add_rmsnorm_bf16w"),
        ] {
            let seed = 500 + 10 * i as u64;
            let residual = randn(rows * d, seed, 2.0);
            let delta = randn(rows * d, seed + 1, 0.5);
            let w = norm_gain(d, dtype, seed + 2);
            let mut ra = act(&cpu, &residual, rows, d);
            let da = act(&cpu, &delta, rows, d);
            let mut want = act(&cpu, &vec![f32::NAN; rows * d], rows, d);
            cpu.add_rmsnorm(&mut ra, &da, &w, EPS, &mut want).unwrap();
            let mut r = residual.clone();
            let mut got = vec![f32::NAN; rows * d];
            run_kernel(emu, kernel, |dev| {
                kernels::add_rmsnorm(
                    dev,
                    aligned16(addr_mut(&mut r)),
                    aligned16(addr(&delta)),
                    gain_addr(&w),
                    dtype,
                    addr_mut(&mut got),
                    rows,
                    d,
                    EPS,
                )
            });
            // The residual add is one rounded f32 add per element on both sides.
            same_bits(&r, &ra.data, &format!("{kernel} d = {d}: residual"));
            let err = rel_err(&got, &want.data);
            eprintln!("{kernel} d = {d}: relative error {err:.2e}");
            // As for rmsnorm: only the order of the sum of squares differs.
            assert!(err < 1e-6, "{kernel} d = {d}: relative error {err:.2e}");
        }
    }
}

/// RoPE's inverse frequencies for head_dim `hd` (LlamaConfig::rope_inv_freq, theta 10000, no
/// scaling), rounded to f32 as Llama keeps them.
fn inv_freq(hd: usize) -> Vec<f32> {
    (0..hd / 2)
        .map(|i| (1.0 / 10000f64.powf((2 * i) as f64 / hd as f64)) as f32)
        .collect()
}

#[test]
fn rope_matches_the_cpu_on_padded_batches_and_cache_offsets() {
    let Some(emu) = emulator() else { return };
    let cpu = CpuBackend::new();
    // (heads, head_dim, batch, q_len, q_offset). The CUDA backend takes padded layouts only
    // (it refuses packed ones), so positions restart every q_len rows: a batch of 3 sequences
    // of 5 after 7 cached tokens; 2 sequences of 33 from 0; single-token decoding deep into a
    // cache. 5 heads of 128 give 320 pairs, more than the block's 256 threads.
    let cases = [
        (3, 64, 3, 5, 7),
        (5, 128, 2, 33, 0),
        (2, 32, 1, 1, 900),
        (4, 96, 2, 3, 61),
    ];
    for (i, &(heads, hd, batch, q_len, q_offset)) in cases.iter().enumerate() {
        let rows = batch * q_len;
        let cols = heads * hd;
        let freq = inv_freq(hd);
        let x = randn(rows * cols, 600 + i as u64, 1.0);
        let layout = SeqLayout {
            batch,
            q_len,
            kv_len: q_offset + q_len,
            kv_valid: vec![q_offset + q_len; batch],
            q_offset,
            starts: None,
        };
        let mut want = act(&cpu, &x, rows, cols);
        cpu.rope(&mut want, heads, &layout, &freq).unwrap();
        // In place, so nothing to poison: every row past position 0 rotates, and a skipped pair
        // would keep its input, off by at least its slowest turn (about 1e-3 rad at position
        // 7), far beyond the bound even diluted over all elements.
        let mut got = x.clone();
        run_kernel(emu, "rope_f32", |dev| {
            kernels::rope(
                dev,
                addr_mut(&mut got),
                addr(&freq),
                rows,
                heads,
                hd,
                layout.q_len,
                layout.q_offset,
            )
        });
        let err = rel_err(&got, &want.data);
        eprintln!("rope heads {heads} hd {hd} batch {batch} q_len {q_len} offset {q_offset}: relative error {err:.2e}");
        // The angles are the same f32 products; their sines and cosines come from sincosf
        // here (the device's libm on a GPU) and from the Rust's sin/cos on the CPU, which may
        // differ in the last place.
        assert!(err < 1e-6, "rope case {i}: relative error {err:.2e}");
    }
}

/// One attention call: shapes and a padded layout as CudaBackend::attention passes them.
struct AttnCase {
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    batch: usize,
    q_len: usize,
    kv_len: usize,
    kv_valid: Vec<usize>,
    q_offset: usize,
}

impl AttnCase {
    /// Full sequences, right-padded to `seq` rows (training and evaluation).
    fn full(n_heads: usize, n_kv: usize, hd: usize, seq: usize, lens: &[usize]) -> Self {
        AttnCase {
            n_heads,
            n_kv,
            hd,
            batch: lens.len(),
            q_len: seq,
            kv_len: seq,
            kv_valid: lens.to_vec(),
            q_offset: 0,
        }
    }

    /// `q_len` new rows per sequence over a cache of `capacity` rows holding `past` tokens
    /// before them; `valid` keys per sequence.
    #[allow(clippy::too_many_arguments)]
    fn decode(
        n_heads: usize,
        n_kv: usize,
        hd: usize,
        q_len: usize,
        capacity: usize,
        past: usize,
        valid: &[usize],
    ) -> Self {
        AttnCase {
            n_heads,
            n_kv,
            hd,
            batch: valid.len(),
            q_len,
            kv_len: capacity,
            kv_valid: valid.to_vec(),
            q_offset: past,
        }
    }
}

/// Runs `c` through the launcher (asserting it picks `kernel`) and CpuBackend::attention; the
/// relative error of the output.
fn attention_err(emu: &Emulator, c: &AttnCase, kernel: &str, seed: u64) -> f64 {
    let cpu = CpuBackend::new();
    let (qc, kc) = (c.n_heads * c.hd, c.n_kv * c.hd);
    let (q_rows, kv_rows) = (c.batch * c.q_len, c.batch * c.kv_len);
    let q = randn(q_rows * qc, seed, 1.0);
    let mut k = randn(kv_rows * kc, seed + 1, 1.5);
    let mut v = randn(kv_rows * kc, seed + 2, 1.0);
    // Key rows past a sequence's valid length are padding or stale cache: NaN there, which
    // must never reach an output (both sides promise never to read them as data).
    for (b, &valid) in c.kv_valid.iter().enumerate() {
        let stale = (b * c.kv_len + valid) * kc..(b + 1) * c.kv_len * kc;
        k[stale.clone()].fill(f32::NAN);
        v[stale].fill(f32::NAN);
    }
    let layout = SeqLayout {
        batch: c.batch,
        q_len: c.q_len,
        kv_len: c.kv_len,
        kv_valid: c.kv_valid.clone(),
        q_offset: c.q_offset,
        starts: None,
    };
    let shape = AttnShape {
        n_heads: c.n_heads,
        n_kv_heads: c.n_kv,
        head_dim: c.hd,
    };
    let mut want = act(&cpu, &vec![f32::NAN; q_rows * qc], q_rows, qc);
    cpu.attention(
        &act(&cpu, &q, q_rows, qc),
        &act(&cpu, &k, kv_rows, kc),
        &act(&cpu, &v, kv_rows, kc),
        shape,
        &layout,
        &mut want,
    )
    .unwrap();
    let valid: Vec<i32> = c.kv_valid.iter().map(|&x| x as i32).collect();
    let mut got = vec![f32::NAN; q_rows * qc];
    run_kernel(emu, kernel, |dev| {
        kernels::attention(
            dev,
            addr(&q),
            addr(&k),
            addr(&v),
            addr_mut(&mut got),
            addr(&valid),
            layout.batch,
            layout.q_len,
            layout.kv_len,
            c.n_heads,
            c.n_kv,
            c.hd,
            layout.q_offset,
        )
    });
    let err = rel_err(&got, &want.data);
    eprintln!(
        "{kernel} hd {} heads {}/{} batch {} q_len {} kv_len {} valid {:?} offset {}: relative error {err:.2e}",
        c.hd, c.n_heads, c.n_kv, c.batch, c.q_len, c.kv_len, c.kv_valid, c.q_offset
    );
    err
}

/// Scores are fma dot products here and lane sums on the CPU, the exponentials are expf here
/// (the device's on a GPU) and the CPU's polynomial (2 ulp) there, and the softmax is online
/// over key tiles rather than in one pass: each output is a convex combination of values
/// whose weights agree to a few ulp, so errors stay a few times f32 epsilon.
const ATTN_BOUND: f64 = 2e-6;

fn check_attention(emu: &Emulator, cases: &[AttnCase], kernel: &str, seed: u64) {
    for (i, c) in cases.iter().enumerate() {
        let err = attention_err(emu, c, kernel, seed + 10 * i as u64);
        assert!(
            err < ATTN_BOUND,
            "{kernel} case {i}: relative error {err:.2e}"
        );
    }
}

// Every case has q_len and valid lengths off the 16-row query and 32-key tiles. Full layouts
// mask causally inside each sequence and pad shorter ones; decoding masks by the cache
// offset. Sequences of 33 and caches of 65 or 70 keys span two or three key tiles, so the
// online softmax rescales its running sums.

#[test]
fn attention_nt1_head_dims_24_and_32_full_sequences_with_mqa_and_padding() {
    let Some(emu) = emulator() else { return };
    let cases = [
        // Lanes 24..31 hold no dimension; the empty sequence sees no key at all (zeros out).
        AttnCase::full(3, 1, 24, 5, &[5, 2, 0, 4]),
        AttnCase::full(2, 2, 32, 33, &[33]),
    ];
    check_attention(emu, &cases, "attention_f32_nt1", 700);
}

#[test]
fn attention_nt2_head_dims_64_and_40_gqa_padding_and_decoding() {
    let Some(emu) = emulator() else { return };
    let cases = [
        AttnCase::full(4, 2, 64, 33, &[33, 20]),
        AttnCase::decode(2, 1, 40, 5, 40, 30, &[35]),
    ];
    check_attention(emu, &cases, "attention_f32_nt2", 800);
}

#[test]
fn attention_nt4_head_dims_80_and_128_gqa_padding_and_decoding() {
    let Some(emu) = emulator() else { return };
    let cases = [
        // Three of the four accumulator slots in use.
        AttnCase::full(2, 1, 80, 33, &[33, 17]),
        // An empty sequence beside a full one: both sides write zeros for its rows.
        AttnCase::full(2, 2, 128, 5, &[5, 0]),
        // The second sequence's cache holds fewer keys than the first's offset: every row of
        // it sees exactly its 43 valid keys.
        AttnCase::decode(4, 2, 128, 5, 72, 60, &[65, 43]),
    ];
    check_attention(emu, &cases, "attention_f32_nt4", 900);
}

#[test]
fn attention_nt8_head_dims_200_and_256_full_and_decoding() {
    let Some(emu) = emulator() else { return };
    let cases = [
        AttnCase::full(2, 2, 200, 33, &[33]),
        AttnCase::decode(2, 1, 256, 1, 80, 69, &[70]),
    ];
    check_attention(emu, &cases, "attention_f32_nt8", 1000);
}

#[test]
fn swiglu_matches_the_cpu_over_the_vector_body_and_the_tail() {
    let Some(emu) = emulator() else { return };
    let cpu = CpuBackend::new();
    // 1250 float4s over 5 blocks, and a tail of 3 for the scalar loop.
    let n = 5003;
    // A wide gate (sd 3) reaches where silu saturates at both ends.
    let gate = randn(n, 1101, 3.0);
    let up = randn(n, 1102, 1.0);
    let mut want = act(&cpu, &gate, 1, n);
    cpu.swiglu(&mut want, &act(&cpu, &up, 1, n)).unwrap();
    // In place: an element left alone keeps gate, nowhere near silu(gate) * up.
    let mut got = gate.clone();
    run_kernel(emu, "swiglu_f32", |dev| {
        kernels::swiglu(dev, aligned16(addr_mut(&mut got)), aligned16(addr(&up)), n)
    });
    let err = rel_err(&got, &want.data);
    eprintln!("swiglu n = {n}: relative error {err:.2e}");
    // expf (the device's on a GPU) against the CPU's 2-ulp exp; the rest is the same rounded
    // f32 operations in the same order.
    assert!(err < 1e-6, "swiglu: relative error {err:.2e}");
}

/// CudaBackend::target_logprobs with the GEMM done by the CPU: the rows with a target are
/// gathered by the kernel, multiplied by the head a chunk at a time, and each chunk's
/// log-probabilities are scattered by the kernel to their hidden rows through the chunk's
/// slice of the target and row-index buffers.
fn target_logprob_case(emu: &Emulator, vocab: usize, seed: u64) {
    let cpu = CpuBackend::new();
    let (n, d, chunk) = (11, 64, 4);
    let hidden = randn(n * d, seed, 1.0);
    let head_w = randn(vocab * d, seed + 1, 0.4);
    let head = HostTensor::from_f32("lm_head.weight", vec![vocab, d], &head_w);
    // Rows without a target (-1), both ends of the vocabulary, a repeated target.
    let t = vocab as i32;
    let targets: Vec<i32> = vec![3, -1, t - 1, 0, 17, -1, 17, t / 2, -1, 5, t - 2];
    let ha = act(&cpu, &hidden, n, d);
    let want = cpu.target_logprobs(&ha, &head, &targets).unwrap();

    let rows = cpu::target_rows(&targets, n, vocab).unwrap();
    let tgt: Vec<i32> = rows.iter().map(|&r| targets[r]).collect();
    let rows: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
    let mut x = vec![f32::NAN; chunk * d];
    let mut logits = vec![f32::NAN; chunk * vocab];
    let mut got = vec![f32::NAN; n];
    let mut c0 = 0;
    while c0 < rows.len() {
        let m = chunk.min(rows.len() - c0);
        x.fill(f32::NAN);
        run_kernel(emu, "gather_rows_f32", |dev| {
            kernels::gather_rows(
                dev,
                addr(&hidden),
                addr(&rows[c0..]),
                addr_mut(&mut x),
                DType::F32,
                m,
                d,
            )
        });
        logits.fill(f32::NAN);
        cpu.matmul_slices(&x[..m * d], &head_w, &mut logits[..m * vocab], m, vocab, d);
        run_kernel(emu, "target_logprob_f32", |dev| {
            kernels::target_logprob(
                dev,
                addr(&logits),
                vocab,
                addr(&tgt[c0..]),
                addr(&rows[c0..]),
                addr_mut(&mut got),
                m,
            )
        });
        c0 += m;
    }
    // The backend zeroes the output first; the kernel must write the targeted rows only.
    for (r, &tg) in targets.iter().enumerate() {
        assert_eq!(
            got[r].is_nan(),
            tg < 0,
            "vocab {vocab}: row {r} (target {tg}) is {}",
            got[r]
        );
    }
    let pick = |v: &[f32]| rows.iter().map(|&r| v[r as usize]).collect::<Vec<f32>>();
    let err = rel_err(&pick(&got), &pick(&want));
    eprintln!("target_logprob vocab {vocab}: relative error {err:.2e}");
    // The exponentials are expf here (the device's on a GPU) and the CPU's 2-ulp polynomial
    // there, summed in f64 in another order: the log-sum-exp agrees to about an ulp of f32.
    assert!(
        err < 1e-6,
        "target_logprob vocab {vocab}: relative error {err:.2e}"
    );
}

#[test]
fn target_logprob_matches_the_cpu_and_scatters_each_chunk_to_its_rows() {
    let Some(emu) = emulator() else { return };
    // Fewer columns than the block's 1024 threads, then enough that every thread loops.
    target_logprob_case(emu, 1000, 1201);
    target_logprob_case(emu, 2500, 1211);
}
