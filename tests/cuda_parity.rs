//! Every CUDA kernel against its CPU twin, on fresh random inputs with outputs poisoned first,
//! compared by relative norm error (f32 < 1e-5, bf16 < 1e-2), plus bit-identity of the Philox
//! generator with src/rng.rs and of the ZO weight passes with their CPU twins, and whole-model
//! parity. Without a CUDA device they run on the kernel emulator (zoft::backend::cuda::emulator:
//! the kernels of csrc/ compiled for the CPU behind a stand-in for the CUDA driver and cuBLAS),
//! which checks everything but timing, races and the device's last-place rounding; without a
//! C++ compiler or without compiled kernels, each test prints "skipped: ..." and passes.
#![cfg(feature = "cuda")]

mod common;

use half::bf16;
use zoft::backend::cpu::CpuBackend;
use zoft::backend::cuda::{
    cuda_available, kernels_embedded, CudaAct, CudaBackend, CudaFusedHook, CudaWeight, PhiloxKey,
};
use zoft::backend::mem::Tag;
use zoft::backend::{AttnShape, Backend, NoHook, SeqLayout};
use zoft::model::{DType, HostTensor, Llama, LlamaConfig, LlamaWeights};
use zoft::rng::{philox4x32_10, Philox};
use zoft::zo::direction::StepKey;
use zoft::zo::hook::FusedHook;
use zoft::zo::passes::{AdamArgs, Rule, ZSpec, ZoBackend};
use zoft::zo::{Method, Perturb, ZoConfig, ZoOptimizer};

const F32_TOL: f64 = 1e-5;
const BF16_TOL: f64 = 1e-2;

fn gpu() -> Option<CudaBackend> {
    common::cuda_or_emulator()
}

fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let p = Philox::new(seed, 17, 3);
    (0..n).map(|i| scale * p.normal(i as u64)).collect()
}

/// ||a - b|| / ||b||, checking both are finite.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    assert!(
        a.iter().all(|v| v.is_finite()),
        "non-finite value in the GPU result"
    );
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel(got, want);
    println!("{what}: relative error {e:.3e}");
    assert!(e < tol, "{what}: relative error {e:.3e} >= {tol:e}");
}

/// An activation filled with NaN (so unwritten outputs show).
fn poisoned(g: &CudaBackend, rows: usize, cols: usize) -> CudaAct {
    g.from_host(&vec![f32::NAN; rows * cols], rows, cols, Tag::Activations)
        .unwrap()
}

fn host(name: &str, shape: Vec<usize>, data: &[f32], dtype: DType) -> HostTensor {
    HostTensor::from_f32_as(name, shape, data, dtype)
}

fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| bf16::from_f32(*x).to_f32()).collect()
}

#[test]
fn cuda_available_explains_itself() {
    match cuda_available() {
        Ok(()) => println!("CUDA device present"),
        Err(r) => {
            assert!(!r.is_empty());
            println!("skipped: no CUDA device ({r})");
        }
    }
}

#[test]
fn missing_kernels_are_explained() {
    match kernels_embedded() {
        Ok(fatbin) => println!("kernels embedded ({} bytes)", fatbin.len()),
        Err(_) => {
            let err = CudaBackend::new(0)
                .err()
                .expect("no backend without kernels");
            let msg = err.to_string();
            assert!(
                msg.contains("tools/install-nvcc") && msg.contains("NVCC"),
                "{msg}"
            );
        }
    }
}

#[test]
fn embed_parity() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new();
    let (vocab, d) = (300, 72);
    let table = randn(vocab * d, 1, 1.0);
    let ids: Vec<u32> = (0..41u32)
        .map(|i| (i * 97 + 5) % vocab as u32)
        .chain([0, 299])
        .collect();
    for dtype in [DType::F32, DType::BF16] {
        let t = host("embed", vec![vocab, d], &table, dtype);
        let tw = g.upload_tensor(&t, dtype).unwrap();
        let mut want = cpu.alloc(ids.len(), d, Tag::Activations).unwrap();
        cpu.embed(&t, &ids, &mut want).unwrap();
        let mut got = poisoned(&g, ids.len(), d);
        g.embed(&tw, &ids, &mut got).unwrap();
        assert_close(
            &format!("embed {dtype:?}"),
            &g.to_host(&got).unwrap(),
            &want.data,
            1e-7,
        );
        let err = g
            .embed(&tw, &[vocab as u32], &mut poisoned(&g, 1, d))
            .unwrap_err();
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    }
}

#[test]
fn rmsnorm_and_add_rmsnorm_parity() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new();
    for (rows, d) in [(37, 64), (5, 70), (9, 4096), (3, 8)] {
        let x = randn(rows * d, 2, 1.5);
        let delta = randn(rows * d, 3, 0.7);
        let wv: Vec<f32> = randn(d, 4, 0.1).iter().map(|v| 1.0 + v).collect();
        for dtype in [DType::F32, DType::BF16] {
            let wt = host("norm", vec![d], &wv, dtype);
            let ww = g.upload_tensor(&wt, dtype).unwrap();
            let eps = 1e-5;
            // rmsnorm
            let xc = cpu.from_host(&x, rows, d, Tag::Activations).unwrap();
            let mut want = cpu.alloc(rows, d, Tag::Activations).unwrap();
            cpu.rmsnorm(&xc, &wt, eps, &mut want).unwrap();
            let xg = g.from_host(&x, rows, d, Tag::Activations).unwrap();
            let mut got = poisoned(&g, rows, d);
            g.rmsnorm(&xg, &ww, eps, &mut got).unwrap();
            let what = format!("rmsnorm {rows}x{d} {dtype:?}");
            assert_close(&what, &g.to_host(&got).unwrap(), &want.data, F32_TOL);
            // add_rmsnorm
            let mut rc = cpu.from_host(&x, rows, d, Tag::Activations).unwrap();
            let dc = cpu.from_host(&delta, rows, d, Tag::Activations).unwrap();
            cpu.add_rmsnorm(&mut rc, &dc, &wt, eps, &mut want).unwrap();
            let mut rg = g.from_host(&x, rows, d, Tag::Activations).unwrap();
            let dg = g.from_host(&delta, rows, d, Tag::Activations).unwrap();
            let mut got = poisoned(&g, rows, d);
            g.add_rmsnorm(&mut rg, &dg, &ww, eps, &mut got).unwrap();
            let what = format!("add_rmsnorm {rows}x{d} {dtype:?}");
            assert_close(
                &format!("{what} out"),
                &g.to_host(&got).unwrap(),
                &want.data,
                F32_TOL,
            );
            assert_close(
                &format!("{what} residual"),
                &g.to_host(&rg).unwrap(),
                &rc.data,
                F32_TOL,
            );
        }
    }
}

#[test]
fn matmul_parity() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new();
    for (m, k, n) in [(37, 96, 80), (1, 64, 33), (130, 256, 300)] {
        let x = randn(m * k, 5, 1.0);
        let w = randn(n * k, 6, 0.05);
        let xc = cpu.from_host(&x, m, k, Tag::Activations).unwrap();
        let xg = g.from_host(&x, m, k, Tag::Activations).unwrap();
        // f32 weights: plain f32 GEMM.
        let wt = host("w", vec![n, k], &w, DType::F32);
        let mut want = cpu.alloc(m, n, Tag::Activations).unwrap();
        cpu.matmul(&xc, &wt, &mut want).unwrap();
        let mut got = poisoned(&g, m, n);
        g.matmul(&xg, &g.upload_tensor(&wt, DType::F32).unwrap(), &mut got)
            .unwrap();
        assert_close(
            &format!("matmul f32 {m}x{k}x{n}"),
            &g.to_host(&got).unwrap(),
            &want.data,
            F32_TOL,
        );
        // bf16 weights: the input is rounded to bf16 for the tensor-core GEMM.
        let wt = host("w", vec![n, k], &w, DType::BF16);
        let ww = g.upload_tensor(&wt, DType::BF16).unwrap();
        let mut got = poisoned(&g, m, n);
        g.matmul(&xg, &ww, &mut got).unwrap();
        let got = g.to_host(&got).unwrap();
        cpu.matmul(&xc, &wt, &mut want).unwrap();
        assert_close(
            &format!("matmul bf16 {m}x{k}x{n} vs f32 input"),
            &got,
            &want.data,
            BF16_TOL,
        );
        // Its exact twin: the CPU product of the bf16-rounded input.
        let xr = cpu
            .from_host(&round_bf16(&x), m, k, Tag::Activations)
            .unwrap();
        cpu.matmul(&xr, &wt, &mut want).unwrap();
        assert_close(
            &format!("matmul bf16 {m}x{k}x{n} vs rounded input"),
            &got,
            &want.data,
            F32_TOL,
        );
    }
}

#[test]
fn rope_parity() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new();
    for (n_heads, hd, batch, q_len, q_offset) in
        [(4, 16, 3, 10, 0), (2, 128, 1, 5, 2000), (3, 64, 2, 7, 13)]
    {
        let layout = SeqLayout {
            batch,
            q_len,
            kv_len: q_len + q_offset,
            kv_valid: vec![q_len + q_offset; batch],
            q_offset,
            starts: None,
        };
        let rows = batch * q_len;
        let cols = n_heads * hd;
        let x = randn(rows * cols, 7, 1.0);
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / 10000f64.powf(2.0 * i as f64 / hd as f64) as f32)
            .collect();
        let mut xc = cpu.from_host(&x, rows, cols, Tag::Activations).unwrap();
        cpu.rope(&mut xc, n_heads, &layout, &inv).unwrap();
        let mut xg = g.from_host(&x, rows, cols, Tag::Activations).unwrap();
        g.rope(&mut xg, n_heads, &layout, &inv).unwrap();
        assert_close(
            &format!("rope h{n_heads} hd{hd} offset {q_offset}"),
            &g.to_host(&xg).unwrap(),
            &xc.data,
            F32_TOL,
        );
    }
}

fn attention_case(
    g: &CudaBackend,
    shape: AttnShape,
    layout: &SeqLayout,
    poison_tail: bool,
    what: &str,
) {
    let cpu = CpuBackend::new();
    let (qc, kc) = (
        shape.n_heads * shape.head_dim,
        shape.n_kv_heads * shape.head_dim,
    );
    let qr = layout.batch * layout.q_len;
    let kr = layout.batch * layout.kv_len;
    let q = randn(qr * qc, 8, 1.0);
    let mut k = randn(kr * kc, 9, 1.0);
    let mut v = randn(kr * kc, 10, 1.0);
    if poison_tail {
        // Cache rows past the valid length hold garbage that must never be read.
        for b in 0..layout.batch {
            for j in layout.kv_valid[b]..layout.kv_len {
                let r = (b * layout.kv_len + j) * kc;
                k[r..r + kc].fill(f32::NAN);
                v[r..r + kc].fill(f32::NAN);
            }
        }
    }
    let qh = cpu.from_host(&q, qr, qc, Tag::Activations).unwrap();
    let kh = cpu.from_host(&k, kr, kc, Tag::Activations).unwrap();
    let vh = cpu.from_host(&v, kr, kc, Tag::Activations).unwrap();
    let mut want = cpu.alloc(qr, qc, Tag::Activations).unwrap();
    cpu.attention(&qh, &kh, &vh, shape, layout, &mut want)
        .unwrap();
    let qg = g.from_host(&q, qr, qc, Tag::Activations).unwrap();
    let kg = g.from_host(&k, kr, kc, Tag::Activations).unwrap();
    let vg = g.from_host(&v, kr, kc, Tag::Activations).unwrap();
    let mut got = poisoned(g, qr, qc);
    g.attention(&qg, &kg, &vg, shape, layout, &mut got).unwrap();
    assert_close(what, &g.to_host(&got).unwrap(), &want.data, F32_TOL);
}

#[test]
fn attention_parity_full_padded_gqa() {
    let Some(g) = gpu() else { return };
    for (h, hkv, hd) in [
        (8, 2, 16),
        (4, 4, 64),
        (6, 3, 80),
        (4, 1, 128),
        (2, 2, 256),
        (2, 1, 8),
    ] {
        let shape = AttnShape {
            n_heads: h,
            n_kv_heads: hkv,
            head_dim: hd,
        };
        for (seq, lens) in [(37, vec![37, 20, 1]), (70, vec![70, 33]), (5, vec![5])] {
            let layout = SeqLayout::full(lens.len(), seq, &lens);
            attention_case(
                &g,
                shape,
                &layout,
                false,
                &format!("attention h{h}/{hkv} hd{hd} T{seq} {lens:?}"),
            );
        }
    }
}

#[test]
fn attention_parity_decode() {
    let Some(g) = gpu() else { return };
    let shape = AttnShape {
        n_heads: 8,
        n_kv_heads: 2,
        head_dim: 64,
    };
    for (q_len, past, capacity, batch) in [
        (1, 20, 64, 1),
        (5, 20, 64, 1),
        (1, 0, 16, 1),
        (3, 40, 100, 2),
        (1, 63, 64, 1),
    ] {
        let layout = SeqLayout {
            batch,
            q_len,
            kv_len: capacity,
            kv_valid: vec![past + q_len; batch],
            q_offset: past,
            starts: None,
        };
        attention_case(
            &g,
            shape,
            &layout,
            true,
            &format!("attention decode q_len {q_len} past {past} capacity {capacity}"),
        );
    }
}

#[test]
fn swiglu_parity() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new();
    for (rows, cols) in [(37, 101), (16, 256)] {
        let gate = randn(rows * cols, 11, 3.0);
        let up = randn(rows * cols, 12, 1.0);
        let mut gc = cpu.from_host(&gate, rows, cols, Tag::Activations).unwrap();
        let uc = cpu.from_host(&up, rows, cols, Tag::Activations).unwrap();
        cpu.swiglu(&mut gc, &uc).unwrap();
        let mut gg = g.from_host(&gate, rows, cols, Tag::Activations).unwrap();
        let ug = g.from_host(&up, rows, cols, Tag::Activations).unwrap();
        g.swiglu(&mut gg, &ug).unwrap();
        assert_close(
            &format!("swiglu {rows}x{cols}"),
            &g.to_host(&gg).unwrap(),
            &gc.data,
            F32_TOL,
        );
    }
}

#[test]
fn lm_head_parity() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new();
    // The second case has more rows than one logits chunk holds.
    for (rows, d, vocab) in [(45, 64, 1000), (700, 64, 50_000)] {
        let hidden = randn(rows * d, 13, 1.0);
        let head = randn(vocab * d, 14, 0.2);
        let targets: Vec<i32> = (0..rows)
            .map(|r| {
                if r % 7 == 3 {
                    -1
                } else {
                    ((r * 7919) % vocab) as i32
                }
            })
            .collect();
        let hc = cpu.from_host(&hidden, rows, d, Tag::Activations).unwrap();
        let hg = g.from_host(&hidden, rows, d, Tag::Activations).unwrap();
        for (dtype, tol) in [(DType::F32, F32_TOL), (DType::BF16, BF16_TOL)] {
            let ht = host("lm_head.weight", vec![vocab, d], &head, dtype);
            let hw = g.upload_tensor(&ht, dtype).unwrap();
            let want = cpu.target_logprobs(&hc, &ht, &targets).unwrap();
            let got = g.target_logprobs(&hg, &hw, &targets).unwrap();
            assert_close(
                &format!("target_logprobs {rows}x{d}x{vocab} {dtype:?}"),
                &got,
                &want,
                tol,
            );
            for (r, t) in targets.iter().enumerate() {
                if *t < 0 {
                    assert_eq!(got[r], 0.0, "row {r} without a target must be 0");
                }
            }
            let pick: Vec<usize> = vec![0, rows - 1, rows / 2, 3];
            let want = cpu.logits_rows(&hc, &ht, &pick).unwrap();
            let got = g.logits_rows(&hg, &hw, &pick).unwrap();
            assert_close(&format!("logits_rows {dtype:?}"), &got, &want, tol);
        }
        let bad = vec![vocab as i32; rows];
        let ht = host("lm_head.weight", vec![vocab, d], &head, DType::BF16);
        let hw = g.upload_tensor(&ht, DType::BF16).unwrap();
        assert!(g.target_logprobs(&hg, &hw, &bad).is_err());
    }
}

#[test]
fn copy_rows_parity() {
    let Some(g) = gpu() else { return };
    let src = randn(5 * 24, 15, 1.0);
    let s = g.from_host(&src, 5, 24, Tag::Activations).unwrap();
    let mut d = poisoned(&g, 12, 24);
    g.copy_rows(&s, &mut d, 4).unwrap();
    let out = g.to_host(&d).unwrap();
    assert_eq!(&out[4 * 24..9 * 24], &src[..]);
    assert!(out[..4 * 24].iter().all(|v| v.is_nan()));
    assert!(out[9 * 24..].iter().all(|v| v.is_nan()));
    assert!(g.copy_rows(&s, &mut d, 8).is_err());
}

#[test]
fn philox_bit_identical() {
    let Some(g) = gpu() else { return };
    for (seed, step, tensor) in [
        (0u64, 0u32, 0u32),
        (0xDEAD_BEEF_1234_5678, 7, 123),
        (42, u32::MAX, 9),
    ] {
        let key = PhiloxKey { seed, step, tensor };
        let p = Philox::new(seed, step, tensor);
        // Raw words, including blocks across the 32-bit boundary of the counter.
        for first in [0u64, (1 << 32) - 3] {
            let words = g.philox_words(key, first, 1000).unwrap();
            for (i, w) in words.chunks(4).enumerate() {
                assert_eq!(w, p.block(first + i as u64), "block {}", first + i as u64);
            }
        }
        // Normals in f32 from aligned and unaligned starts, and past 2^32 elements.
        for start in [0u64, 5, (1 << 33) + 1] {
            let n = 100_003;
            let mut buf = g.alloc_buf(n * 4, Tag::Scratch, "normals").unwrap();
            g.fill_normal(&mut buf, DType::F32, n, key, start, 1.0, 0.0)
                .unwrap();
            let got: Vec<f32> = g.buf_to_host(&buf, n).unwrap();
            let mut want = vec![0.0f32; n];
            p.fill_normal(start, &mut want);
            for i in 0..n {
                assert_eq!(
                    got[i].to_bits(),
                    want[i].to_bits(),
                    "normal {} of {key:?}",
                    start + i as u64
                );
            }
            // Scaled and shifted, as LlamaWeights::random computes them, in bf16.
            let mut bb = g.alloc_buf(n * 2, Tag::Scratch, "normals bf16").unwrap();
            g.fill_normal(&mut bb, DType::BF16, n, key, start, 0.1, 1.0)
                .unwrap();
            let got: Vec<u16> = g.buf_to_host(&bb, n).unwrap();
            for i in 0..n {
                let v = 1.0 + 0.1 * want[i];
                assert_eq!(
                    got[i],
                    bf16::from_f32(v).to_bits(),
                    "shifted normal {}",
                    start + i as u64
                );
            }
            // Rademacher signs.
            g.fill_rademacher(&mut buf, n, key, start, 1.0).unwrap();
            let got: Vec<f32> = g.buf_to_host(&buf, n).unwrap();
            for (i, v) in got.iter().enumerate() {
                assert_eq!(v.to_bits(), p.rademacher(start + i as u64).to_bits());
            }
        }
    }
    // The block function itself against the published known answer.
    assert_eq!(
        philox4x32_10([0, 0, 0, 0], [0, 0]),
        g.philox_words(
            PhiloxKey {
                seed: 0,
                step: 0,
                tensor: 0
            },
            0,
            1
        )
        .unwrap()[..]
    );
}

#[test]
fn axpy_normal_matches_cpu_twin() {
    let Some(g) = gpu() else { return };
    let key = PhiloxKey {
        seed: 99,
        step: 4,
        tensor: 17,
    };
    let p = Philox::new(99, 4, 17);
    let n = 50_001;
    let w0 = randn(n, 16, 0.05);
    let scale = 1e-3f32;
    // f32 storage: w + scale * z, two rounded ops.
    let mut wb = g.buf_from_host(&w0, Tag::Weights, "w").unwrap();
    g.axpy_normal_buf(&mut wb, DType::F32, n, key, 0, scale)
        .unwrap();
    let got: Vec<f32> = g.buf_to_host(&wb, n).unwrap();
    for i in 0..n {
        let want = w0[i] + scale * p.normal(i as u64);
        assert_eq!(got[i].to_bits(), want.to_bits(), "f32 element {i}");
    }
    // bf16 storage: widen, add, round to nearest even.
    let wbf: Vec<u16> = w0.iter().map(|v| bf16::from_f32(*v).to_bits()).collect();
    let t = HostTensor::from_bytes("w".into(), vec![n], DType::BF16, bytemuck::cast_slice(&wbf));
    let mut w = g.upload_tensor(&t, DType::BF16).unwrap();
    g.axpy_normal(&mut w, key, -scale).unwrap();
    let got: Vec<u16> = g.buf_to_host(w.buf(), n).unwrap();
    for i in 0..n {
        let want = bf16::from_f32(bf16::from_bits(wbf[i]).to_f32() + -scale * p.normal(i as u64));
        assert_eq!(got[i], want.to_bits(), "bf16 element {i}");
    }
}

#[test]
fn conversions_bit_exact() {
    let Some(g) = gpu() else { return };
    let mut v = randn(10_007, 18, 100.0);
    v.extend([
        0.0,
        -0.0,
        1e-40,
        -3.4e38,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
    ]);
    let n = v.len();
    let src = g.buf_from_host(&v, Tag::Scratch, "f32").unwrap();
    let mut mid = g.alloc_buf(n * 2, Tag::Scratch, "bf16").unwrap();
    g.f32_to_bf16(&src, &mut mid, n).unwrap();
    let got: Vec<u16> = g.buf_to_host(&mid, n).unwrap();
    for i in 0..n {
        assert_eq!(
            got[i],
            bf16::from_f32(v[i]).to_bits(),
            "f32 -> bf16 of {}",
            v[i]
        );
    }
    let mut back = g.alloc_buf(n * 4, Tag::Scratch, "f32 back").unwrap();
    g.bf16_to_f32(&mid, &mut back, n).unwrap();
    let got: Vec<f32> = g.buf_to_host(&back, n).unwrap();
    for i in 0..n {
        assert_eq!(got[i].to_bits(), bf16::from_f32(v[i]).to_f32().to_bits());
    }
}

#[test]
fn upload_converts_every_dtype_in_chunks() {
    let Some(g) = gpu() else { return };
    // More elements than one 16 MiB staging half holds, in every conversion.
    let n = 9_000_001;
    let v = randn(n, 19, 1.0);
    for src in [DType::F32, DType::F16, DType::BF16] {
        let t = host("big", vec![n], &v, src);
        let exact = t.to_f32_vec();
        for dst in [DType::F32, DType::BF16] {
            let w = g.upload_tensor(&t, dst).unwrap();
            assert_eq!(w.dtype, dst);
            let got = g.weight_to_host(&w).unwrap();
            let want: Vec<f32> = match dst {
                DType::F32 => exact.clone(),
                _ => round_bf16(&exact),
            };
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "upload {src:?} -> {dst:?} differs"
            );
        }
    }
}

#[test]
fn random_weights_on_device_match_host() {
    let Some(g) = gpu() else { return };
    let cfg = common::small_config(false);
    let host_w = LlamaWeights::random(&cfg, 7, DType::F32);
    for dtype in [DType::F32, DType::BF16] {
        let dev_w = g.random_weights(&cfg, 7, dtype).unwrap();
        for (h, d) in host_w.tensors().iter().zip(dev_w.tensors()) {
            assert_eq!(h.name, d.name);
            assert_eq!(h.shape, d.shape);
            let want = h.to_f32_vec();
            let want = if d.dtype == DType::BF16 {
                round_bf16(&want)
            } else {
                want
            };
            let got = g.weight_to_host(d).unwrap();
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{} differs from LlamaWeights::random",
                h.name
            );
        }
    }
}

#[test]
fn memory_is_accounted_and_oom_is_explained() {
    let Some(g) = gpu() else { return };
    let before = g.mem().current(Tag::Activations);
    let a = g.alloc(1000, 250, Tag::Activations).unwrap();
    assert_eq!(g.mem().current(Tag::Activations), before + 1_000_000);
    assert!(g.mem().peak(Tag::Activations) >= before + 1_000_000);
    drop(a);
    assert_eq!(g.mem().current(Tag::Activations), before);
    let (free, total) = g.mem_info().unwrap();
    assert!(free <= total && total > 0);
    let err = g
        .alloc_buf(1 << 52, Tag::Optimizer, "an impossible buffer")
        .err()
        .expect("4 PiB cannot be allocated");
    let msg = err.to_string();
    println!("{msg}");
    assert!(
        msg.contains("asked for") && msg.contains("an impossible buffer") && msg.contains("free"),
        "{msg}"
    );
    assert!(msg.contains("optimizer"), "{msg}");
    // The failed request left no trace in the counters.
    assert_eq!(g.mem().current(Tag::Optimizer), 0);
}

#[test]
fn whole_model_parity() {
    let Some(g) = gpu() else { return };
    for tied in [false, true] {
        let cfg = common::small_config(tied);
        for (dtype, tol) in [(DType::F32, F32_TOL), (DType::BF16, BF16_TOL)] {
            let host_w = LlamaWeights::random(&cfg, 11, dtype);
            let dev_w = g.upload_weights(&host_w, dtype).unwrap();
            let cpu = Llama::new(cfg.clone(), host_w, CpuBackend::new());
            let gm = Llama::new(cfg.clone(), dev_w, g.clone());
            let (ids, layout, targets) = lm_batch(&cfg);
            let what = format!("model tied={tied} {dtype:?}");
            let want = cpu
                .target_logprobs(&ids, &layout, &targets, &mut NoHook)
                .unwrap();
            let got = gm
                .target_logprobs(&ids, &layout, &targets, &mut NoHook)
                .unwrap();
            assert_close(&format!("{what} target_logprobs"), &got, &want, tol);
            let rows: Vec<usize> = (0..layout.rows()).collect();
            let want = cpu.logits_at(&ids, &layout, &rows, &mut NoHook).unwrap();
            let got = gm.logits_at(&ids, &layout, &rows, &mut NoHook).unwrap();
            assert_close(&format!("{what} logits"), &got, &want, tol);

            // Generation: prefill then single tokens through the KV cache.
            let mut cc = cpu.new_cache(32).unwrap();
            let mut gc = gm.new_cache(32).unwrap();
            let prompt = &ids[..6];
            let want = cpu.forward_cached(prompt, &mut cc).unwrap();
            let got = gm.forward_cached(prompt, &mut gc).unwrap();
            assert_close(&format!("{what} prefill"), &got, &want, tol);
            for step in 0..4u32 {
                let tok = [(step * 37 + 3) % cfg.vocab_size as u32];
                let want = cpu.forward_cached(&tok, &mut cc).unwrap();
                let got = gm.forward_cached(&tok, &mut gc).unwrap();
                assert_close(&format!("{what} decode {step}"), &got, &want, tol);
            }
        }
    }
}

// The ZO weight passes (ZoBackend) against the CPU implementation: bit for bit, for f32 and bf16
// weights, on fresh random weights.

const ZO_KEY: StepKey = StepKey {
    seed: 0x5EED_0F2E_400D_0E77,
    step: 41,
};
const ZO_ID: usize = 7;

/// Random weights as a host tensor and their device copy in the same dtype.
fn zo_tensor(
    g: &CudaBackend,
    shape: &[usize],
    dtype: DType,
    seed: u64,
) -> (HostTensor, CudaWeight) {
    let n: usize = shape.iter().product();
    let t = host("zo.weight", shape.to_vec(), &randn(n, seed, 0.05), dtype);
    let w = g.upload_tensor(&t, dtype).unwrap();
    (t, w)
}

fn assert_same_bits(what: &str, g: &CudaBackend, got: &CudaWeight, want: &HostTensor) {
    assert_eq!(got.dtype, want.dtype, "{what}: dtype");
    let bytes: Vec<u8> = g.buf_to_host(got.buf(), want.bytes().len()).unwrap();
    if bytes != want.bytes() {
        let es = want.dtype.size();
        let i = bytes
            .chunks(es)
            .zip(want.bytes().chunks(es))
            .position(|(a, b)| a != b)
            .unwrap();
        let (gv, wv) = (g.weight_to_host(got).unwrap()[i], want.to_f32_vec()[i]);
        panic!("{what}: element {i} differs: GPU {gv:e}, CPU {wv:e}");
    }
}

fn assert_same_f32(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!(
            "{what}: element {i} differs: GPU {:e}, CPU {:e}",
            got[i], want[i]
        );
    }
}

fn adam_args() -> AdamArgs {
    AdamArgs {
        g: 3.7,
        lr: 5e-4,
        wd: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        c1: 1.0 - 0.9f32.powi(3),
        c2: 1.0 - 0.999f32.powi(3),
        eps: 1e-8,
    }
}

#[test]
fn zo_element_passes_bit_identical() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new();
    let rules = [
        ("move", Rule::Move { to: -1e-3 }),
        (
            "sgd",
            Rule::Sgd {
                lr: 1e-2,
                g: -2.5,
                wd: 0.1,
            },
        ),
        ("adam", Rule::Adam(adam_args())),
    ];
    // More elements than one CPU chunk (2^14), an odd matrix, a vector.
    for (si, shape) in [vec![300, 71], vec![37, 53], vec![101]]
        .into_iter()
        .enumerate()
    {
        let n: usize = shape.iter().product();
        for dtype in [DType::F32, DType::BF16] {
            for sparse in [false, true] {
                for (ri, (rname, rule)) in rules.iter().enumerate() {
                    let seed = 20 + (si * 12 + ri * 4 + 2 * sparse as usize) as u64;
                    let (mut t, mut w) = zo_tensor(&g, &shape, dtype, seed);
                    let offset = if sparse { -1e-3 } else { 1e-3 };
                    let z = if sparse {
                        // The median of |w|: half the elements take each branch of the mask.
                        let h = cpu.zo_threshold(&t, 0.5).unwrap();
                        let hg = g.zo_threshold(&w, 0.5).unwrap();
                        assert_eq!(h.to_bits(), hg.to_bits(), "threshold {shape:?} {dtype:?}");
                        let p = ZO_KEY.stream(ZO_ID);
                        let wv = t.to_f32_vec();
                        let inside = (0..n)
                            .filter(|&j| (wv[j] - offset * p.normal(j as u64)).abs() <= h)
                            .count();
                        assert!(
                            inside > n / 4 && inside < 3 * n / 4,
                            "{inside} of {n} inside the mask"
                        );
                        ZSpec::Sparse { threshold: h }
                    } else {
                        ZSpec::Dense
                    };
                    let what = format!(
                        "{} {rname} {shape:?} {dtype:?}",
                        if sparse { "sparse" } else { "dense" }
                    );
                    if let Rule::Adam(_) = rule {
                        let m0 = randn(n, seed + 1, 1e-3);
                        let v0: Vec<f32> = randn(n, seed + 2, 1e-3).iter().map(|x| x * x).collect();
                        let (mut mc, mut vc) =
                            (cpu.zo_state(&m0).unwrap(), cpu.zo_state(&v0).unwrap());
                        cpu.zo_pass(
                            &mut t,
                            ZO_ID,
                            ZO_KEY,
                            z,
                            offset,
                            *rule,
                            Some((&mut mc, &mut vc)),
                        )
                        .unwrap();
                        let mut mg = g.zo_state(&m0).unwrap();
                        let mut vg = g.zo_state(&v0).unwrap();
                        assert_eq!(mg.tag(), Tag::Optimizer);
                        g.zo_pass(
                            &mut w,
                            ZO_ID,
                            ZO_KEY,
                            z,
                            offset,
                            *rule,
                            Some((&mut mg, &mut vg)),
                        )
                        .unwrap();
                        assert_same_f32(
                            &format!("{what} m"),
                            &g.zo_state_to_host(&mg).unwrap(),
                            &mc.data,
                        );
                        assert_same_f32(
                            &format!("{what} v"),
                            &g.zo_state_to_host(&vg).unwrap(),
                            &vc.data,
                        );
                        // Moments of another tensor, or none, are refused.
                        let mut short = g.zo_state(&m0[1..]).unwrap();
                        let err = g
                            .zo_pass(
                                &mut w,
                                ZO_ID,
                                ZO_KEY,
                                z,
                                offset,
                                *rule,
                                Some((&mut short, &mut vg)),
                            )
                            .unwrap_err();
                        assert!(err.to_string().contains("moments"), "{err}");
                        let err = g
                            .zo_pass(&mut w, ZO_ID, ZO_KEY, z, offset, *rule, None)
                            .unwrap_err();
                        assert!(err.to_string().contains("moments"), "{err}");
                    } else {
                        cpu.zo_pass(&mut t, ZO_ID, ZO_KEY, z, offset, *rule, None)
                            .unwrap();
                        g.zo_pass(&mut w, ZO_ID, ZO_KEY, z, offset, *rule, None)
                            .unwrap();
                    }
                    assert_same_bits(&what, &g, &w, &t);
                }
            }
        }
    }
}

#[test]
fn zo_batched_passes_run_in_order_when_the_batch_ends_even_after_an_error() {
    let Some(g) = gpu() else { return };
    let (mut t, mut w) = zo_tensor(&g, &[37, 53], DType::BF16, 90);
    let (mut t2, mut w2) = zo_tensor(&g, &[61], DType::F32, 91);
    let key = StepKey { seed: 5, step: 2 };
    let rule = Rule::Sgd {
        lr: 1e-2,
        g: -2.5,
        wd: 0.1,
    };
    let before = g.launch_counts().0;
    // The second pass over the first tensor must see the first pass's result: it starts
    // another launch.
    let again = Rule::Move { to: 1e-3 };
    let err = g
        .batch_passes(&mut || {
            g.zo_pass(&mut w, 3, key, ZSpec::Dense, 1e-3, rule, None)?;
            g.zo_pass(&mut w2, 4, key, ZSpec::Dense, 0.0, rule, None)?;
            g.zo_pass(&mut w, 3, key, ZSpec::Dense, 0.0, again, None)?;
            anyhow::bail!("the loss was NaN")
        })
        .unwrap_err();
    assert_eq!(err.to_string(), "the loss was NaN");
    assert_eq!(
        g.launch_counts().0 - before,
        2,
        "three passes, two launches"
    );
    let cpu = CpuBackend::new();
    cpu.zo_pass(&mut t, 3, key, ZSpec::Dense, 1e-3, rule, None)
        .unwrap();
    cpu.zo_pass(&mut t2, 4, key, ZSpec::Dense, 0.0, rule, None)
        .unwrap();
    cpu.zo_pass(&mut t, 3, key, ZSpec::Dense, 0.0, again, None)
        .unwrap();
    assert_same_bits("the first tensor of the batch", &g, &w, &t);
    assert_same_bits("the second tensor of the batch", &g, &w2, &t2);
}

#[test]
fn zo_batched_low_rank_moves_run_in_order_beside_the_element_passes() {
    let Some(g) = gpu() else { return };
    let (mut t, mut w) = zo_tensor(&g, &[37, 53], DType::BF16, 94);
    let (mut t2, mut w2) = zo_tensor(&g, &[130, 9], DType::F32, 95);
    let (mut t3, mut w3) = zo_tensor(&g, &[61], DType::F32, 96);
    let key = StepKey { seed: 5, step: 2 };
    let (c1, c2) = ([0.5f32, -1.25, 2.0], [-0.75f32, 0.25, 1.5]);
    let (up, down) = (Rule::Move { to: 1e-2 }, Rule::Move { to: -1e-2 });
    let (z1, z2) = (ZSpec::LowRank { coef: &c1 }, ZSpec::LowRank { coef: &c2 });
    let before = g.launch_counts().0;
    g.batch_passes(&mut || {
        g.zo_pass(&mut w, 3, key, z1, 0.0, up, None)?;
        g.zo_pass(&mut w3, 5, key, ZSpec::Dense, 0.0, up, None)?;
        g.zo_pass(&mut w2, 4, key, z2, 0.0, up, None)?;
        // A second move of the first matrix must see the first one's result.
        g.zo_pass(&mut w, 3, key, z2, 1e-2, down, None)
    })
    .unwrap();
    assert_eq!(
        g.launch_counts().0 - before,
        3,
        "the first three passes in two launches, the fourth in a third"
    );
    let cpu = CpuBackend::new();
    cpu.zo_pass(&mut t, 3, key, z1, 0.0, up, None).unwrap();
    cpu.zo_pass(&mut t3, 5, key, ZSpec::Dense, 0.0, up, None)
        .unwrap();
    cpu.zo_pass(&mut t2, 4, key, z2, 0.0, up, None).unwrap();
    cpu.zo_pass(&mut t, 3, key, z2, 1e-2, down, None).unwrap();
    assert_same_bits("the matrix moved twice", &g, &w, &t);
    assert_same_bits("the other matrix", &g, &w2, &t2);
    assert_same_bits("the vector", &g, &w3, &t3);
}

/// w <- w + z (parameter 3, seed 5, step 2): a pass for the batch tests below.
fn move_by_z(g: &CudaBackend, w: &mut CudaWeight) -> anyhow::Result<()> {
    let key = StepKey { seed: 5, step: 2 };
    g.zo_pass(w, 3, key, ZSpec::Dense, 0.0, Rule::Move { to: 1.0 }, None)
}

#[test]
fn zo_a_batch_of_empty_tensors_launches_nothing() {
    let Some(g) = gpu() else { return };
    let (_, mut w) = zo_tensor(&g, &[0, 8], DType::BF16, 93);
    let before = g.launch_counts().0;
    g.batch_passes(&mut || move_by_z(&g, &mut w)).unwrap();
    assert_eq!(g.launch_counts().0, before);
}

#[test]
fn zo_a_batch_that_fails_after_its_loop_failed_reports_both() {
    // Only the emulator: the pass below runs over a freed tensor, which it reports as a
    // failed launch where a GPU would read freed memory.
    let Some(g) = gpu() else { return };
    if !g.device_name().contains("emulator") {
        return;
    }
    let (_, w) = zo_tensor(&g, &[37, 53], DType::BF16, 92);
    let mut w = Some(w);
    let err = g
        .batch_passes(&mut || {
            let mut w = w.take().expect("one call");
            move_by_z(&g, &mut w)?;
            drop(w);
            anyhow::bail!("the loss was NaN")
        })
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("the loss was NaN; then the passes gathered before it failed too: "),
        "{err}"
    );
    assert!(err.contains("zo_pass_jobs"), "{err}");

    // Both launches of a batch run, and both failures are reported.
    let (_, w) = zo_tensor(&g, &[37, 53], DType::BF16, 92);
    let (_, m) = zo_tensor(&g, &[20, 30], DType::F32, 93);
    let key = StepKey { seed: 5, step: 2 };
    let coef = [0.5f32, -1.0];
    let mut both = Some((w, m));
    let err = g
        .batch_passes(&mut || {
            let (mut w, mut m) = both.take().expect("one call");
            move_by_z(&g, &mut w)?;
            let z = ZSpec::LowRank { coef: &coef };
            g.zo_pass(&mut m, 4, key, z, 0.0, Rule::Move { to: 1.0 }, None)?;
            drop((w, m));
            Ok(())
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("zo_pass_jobs"), "{err}");
    assert!(
        err.contains("; the batch's low-rank moves failed too: "),
        "{err}"
    );
    assert!(err.contains("zo_low_rank_move_jobs"), "{err}");
}

#[test]
fn zo_low_rank_pass_bit_identical() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new();
    // An odd shape; several row tiles and column blocks at the largest rank; a single row;
    // rank 1 on exactly one column block.
    for (ci, (rows, cols, rank)) in [(37, 53, 8), (70, 300, 64), (1, 130, 5), (33, 128, 1)]
        .into_iter()
        .enumerate()
    {
        for dtype in [DType::F32, DType::BF16] {
            let seed = 60 + 2 * ci as u64 + (dtype == DType::BF16) as u64;
            let (mut t, mut w) = zo_tensor(&g, &[rows, cols], dtype, seed);
            let coef = randn(rank, seed + 100, 1e-3);
            let z = ZSpec::LowRank { coef: &coef };
            let (offset, rule) = (2e-3, Rule::Move { to: -1e-3 });
            cpu.zo_pass(&mut t, ZO_ID, ZO_KEY, z, offset, rule, None)
                .unwrap();
            g.zo_pass(&mut w, ZO_ID, ZO_KEY, z, offset, rule, None)
                .unwrap();
            assert_same_bits(
                &format!("low rank {rank} {rows}x{cols} {dtype:?}"),
                &g,
                &w,
                &t,
            );
        }
    }
    // What the kernel does not do is refused with a reason.
    let (_, mut w) = zo_tensor(&g, &[8, 8], DType::F32, 90);
    let big = vec![1e-3f32; 65];
    let err = g
        .zo_pass(
            &mut w,
            0,
            ZO_KEY,
            ZSpec::LowRank { coef: &big },
            0.0,
            Rule::Move { to: 1.0 },
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("rank 65"), "{err}");
    let sgd = Rule::Sgd {
        lr: 1e-2,
        g: 1.0,
        wd: 0.0,
    };
    let err = g
        .zo_pass(
            &mut w,
            0,
            ZO_KEY,
            ZSpec::LowRank { coef: &big[..4] },
            0.0,
            sgd,
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("Move"), "{err}");
    let (_, mut v) = zo_tensor(&g, &[8], DType::F32, 91);
    let err = g
        .zo_pass(
            &mut v,
            0,
            ZO_KEY,
            ZSpec::LowRank { coef: &big[..4] },
            0.0,
            Rule::Move { to: 1.0 },
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("matrix"), "{err}");
}

#[test]
fn zo_decay_bit_identical() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new();
    for (i, dtype) in [DType::F32, DType::BF16].into_iter().enumerate() {
        let (mut t, mut w) = zo_tensor(&g, &[300, 71], dtype, 95 + i as u64);
        let factor = 5e-4 * 0.37;
        cpu.zo_decay(&mut t, factor).unwrap();
        g.zo_decay(&mut w, factor).unwrap();
        assert_same_bits(&format!("decay {dtype:?}"), &g, &w, &t);
    }
}

#[test]
fn zo_save_weights_matches_host_save() {
    let Some(g) = gpu() else { return };
    let cfg = common::small_config(false);
    let dir = std::env::temp_dir().join(format!("zoft-cuda-save-{}", std::process::id()));
    for dtype in [DType::F32, DType::BF16] {
        // Matrices in `dtype` and gains in f32 on both sides, as the device stores them.
        let dev_w = g.random_weights(&cfg, 12, dtype).unwrap();
        let host_w = dev_w
            .try_map(|_, w| {
                let v = g.weight_to_host(w)?;
                Ok(HostTensor::from_f32_as(
                    w.name.clone(),
                    w.shape.clone(),
                    &v,
                    w.dtype,
                ))
            })
            .unwrap();
        let (a, b) = (dir.join("gpu"), dir.join("cpu"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        g.save_weights(&dev_w, &a).unwrap();
        CpuBackend::new().save_weights(&host_w, &b).unwrap();
        let (fa, fb) = (
            std::fs::read(a.join("model.safetensors")).unwrap(),
            std::fs::read(b.join("model.safetensors")).unwrap(),
        );
        assert!(fa == fb, "saved files differ ({dtype:?})");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn zo_optimizer_steps_bit_identical() {
    let Some(g) = gpu() else { return };
    let cfg = common::small_config(false);
    for dtype in [DType::F32, DType::BF16] {
        for (mi, method) in [
            Method::Mezo,
            Method::MezoAdam,
            Method::SparseMezo,
            Method::Tezo,
            Method::TezoAdam,
        ]
        .into_iter()
        .enumerate()
        {
            // The same tensors in the same dtypes on both sides (gains stay f32 on the device).
            let dev_w = g.random_weights(&cfg, 30 + mi as u64, dtype).unwrap();
            let host_w = dev_w.try_map(|_, w| g.weight_to_host_tensor(w)).unwrap();
            let mut cm = Llama::new(cfg.clone(), host_w, CpuBackend::new());
            let mut gm = Llama::new(cfg.clone(), dev_w, g.clone());
            let zc = ZoConfig {
                method,
                // In place where allowed: every pass then runs on both backends.
                perturb: Perturb::in_place_if_allowed(method),
                lr: 1e-3,
                weight_decay: 0.1,
                seed: 77 + mi as u64,
                ..Default::default()
            };
            let mut co = ZoOptimizer::new(zc.clone(), &cm).unwrap();
            let mut go = ZoOptimizer::new(zc.clone(), &gm).unwrap();
            for s in 0..3u64 {
                // Losses that need no forward: every other operation of a step is a weight pass,
                // so the two backends must end on the same bits.
                let fake = |i: &mut u32| {
                    *i += 1;
                    Ok(2.0 + 0.125 * ((*i as u64 + s) % 3) as f32)
                };
                let (mut i, mut j) = (0u32, 0u32);
                let rc = co.step(&mut cm, s, &mut |_, _| fake(&mut i)).unwrap();
                let before = g.launch_counts().0;
                let rg = go.step(&mut gm, s, &mut |_, _| fake(&mut j)).unwrap();
                let launched = g.launch_counts().0 - before;
                assert_eq!(rc.projected_grad.to_bits(), rg.projected_grad.to_bits());
                // Each pass over the weights is one launch over every tensor: three in place,
                // the update alone fused. TeZO's (in place) take two a pass, the low-rank
                // moves of its matrices beside the norm gains' element passes, and its update
                // decays each matrix first, one launch a matrix.
                let passes = if zc.perturb == Perturb::Inplace { 3 } else { 1 };
                let want = if matches!(method, Method::Tezo | Method::TezoAdam) {
                    let tensors = gm.weights.tensors();
                    let matrices = tensors.iter().filter(|w| w.shape.len() == 2).count();
                    2 * passes + matrices as u64
                } else {
                    passes
                };
                assert_eq!(launched, want, "{} {dtype:?}: launches", method.name());
            }
            for (c, w) in cm.weights.tensors().iter().zip(gm.weights.tensors()) {
                let what = format!("{} {dtype:?} after 3 steps: {}", method.name(), c.name);
                assert_same_bits(&what, &g, w, c);
            }
            // Fused steps write the weights only in the update (offset 0); TeZO's update stays
            // virtual until it is materialized.
            let fused = ZoConfig {
                perturb: Perturb::Fused,
                weight_decay: 0.0,
                ..zc
            };
            let mut fc = ZoOptimizer::new(fused.clone(), &cm).unwrap();
            let mut fg = ZoOptimizer::new(fused, &gm).unwrap();
            for s in 3..5u64 {
                let losses = [2.0, 2.0 + 0.25 * s as f32];
                let (mut i, mut j) = (0usize, 0usize);
                let rc = fc
                    .step(&mut cm, s, &mut |_, _| {
                        i += 1;
                        Ok(losses[i - 1])
                    })
                    .unwrap();
                let rg = fg
                    .step(&mut gm, s, &mut |_, _| {
                        j += 1;
                        Ok(losses[j - 1])
                    })
                    .unwrap();
                assert_eq!(rc.projected_grad.to_bits(), rg.projected_grad.to_bits());
            }
            fc.materialize(&mut cm).unwrap();
            fg.materialize(&mut gm).unwrap();
            for (c, w) in cm.weights.tensors().iter().zip(gm.weights.tensors()) {
                let what = format!("{} {dtype:?} after fused steps: {}", method.name(), c.name);
                assert_same_bits(&what, &g, w, c);
            }
        }
    }
}

/// Token ids, a layout with padding and next-token targets for a tiny model.
fn lm_batch(cfg: &LlamaConfig) -> (Vec<u32>, SeqLayout, Vec<i32>) {
    let (b, t) = (3, 21);
    let lens = [21, 9, 1];
    let layout = SeqLayout::full(b, t, &lens);
    let ids: Vec<u32> = (0..b * t)
        .map(|i| ((i * 131 + 7) % cfg.vocab_size) as u32)
        .collect();
    let targets: Vec<i32> = (0..b * t)
        .map(|r| {
            if r % t + 1 >= lens[r / t] {
                -1
            } else {
                ids[r + 1] as i32
            }
        })
        .collect();
    (ids, layout, targets)
}

#[test]
fn zo_fused_forward_parity() {
    // The CUDA fused hook against (1) the CPU fused hook on the same bits and (2) a GPU forward
    // over in-place perturbed weights, after one step so that TeZO carries a virtual update.
    // The head runs in blocks of 64 of the 300 vocabulary rows, the last one short.
    let Some(g) = gpu() else { return };
    for tied in [false, true] {
        let cfg = common::small_config(tied);
        let (ids, layout, targets) = lm_batch(&cfg);
        let rows = [0usize, 4, 5, 22, 43];
        for (dtype, tol) in [(DType::F32, F32_TOL), (DType::BF16, BF16_TOL)] {
            for (mi, method) in [Method::Mezo, Method::SparseMezo, Method::Tezo]
                .into_iter()
                .enumerate()
            {
                let what = format!("{} tied={tied} {dtype:?}", method.name());
                let dev_w = g.random_weights(&cfg, 40 + mi as u64, dtype).unwrap();
                let host_w = dev_w.try_map(|_, w| g.weight_to_host_tensor(w)).unwrap();
                let mut cm = Llama::new(cfg.clone(), host_w, CpuBackend::new());
                let mut gm = Llama::new(cfg.clone(), dev_w, g.clone());
                // g = 250 from the fake losses: lr 1e-5 moves the weights by 2.5e-3 z, visible
                // in bf16 and small beside their scale.
                let zc = |perturb| ZoConfig {
                    method,
                    perturb,
                    lr: 1e-5,
                    sparsity: 0.5,
                    seed: 90 + mi as u64,
                    ..Default::default()
                };
                let mut co = ZoOptimizer::new(zc(Perturb::Fused), &cm).unwrap();
                let mut go = ZoOptimizer::new(zc(Perturb::Fused), &gm).unwrap();
                let losses = [3.0f32, 2.5];
                let (mut i, mut j) = (0usize, 0usize);
                co.step(&mut cm, 0, &mut |_, _| {
                    i += 1;
                    Ok(losses[i - 1])
                })
                .unwrap();
                go.step(&mut gm, 0, &mut |_, _| {
                    j += 1;
                    Ok(losses[j - 1])
                })
                .unwrap();

                let (key, eps) = (go.key(1), 5e-2);
                // Two forwards through a hook: log-probs, logits and the kernels launched.
                let run = |hook: CudaFusedHook| {
                    let mut hook = hook.with_head_block_rows(64);
                    let before = g.launch_counts().0;
                    let lp = gm
                        .target_logprobs(&ids, &layout, &targets, &mut hook)
                        .unwrap();
                    let logits = gm.logits_at(&ids, &layout, &rows, &mut hook).unwrap();
                    (lp, logits, g.launch_counts().0 - before)
                };
                let (fused, fused_logits, one_by_one) = run(CudaFusedHook::new(&go, key, eps));
                // Each layer's copies written by two launches (as `--perturb fused` runs): the
                // same bits, and per layer and forward one launch for the element-wise
                // parameters where there were one each (nine, or TeZO's two norm gains) and
                // one for TeZO's seven matrices. At least: with TeZO's head beside it, the
                // second forward also finds the final norm's copy still in the scratch that the
                // layers no longer use.
                let (batched, batched_logits, in_batches) =
                    run(CudaFusedHook::new(&go, key, eps).with_layers(&gm.weights));
                assert_same_f32(&format!("{what} layer batches"), &batched, &fused);
                assert_same_f32(
                    &format!("{what} layer batches, logits"),
                    &batched_logits,
                    &fused_logits,
                );
                let layers = cfg.num_hidden_layers as u64;
                let per_layer = if method == Method::Tezo {
                    2 + 7 - 2
                } else {
                    9 - 1
                };
                let saved = one_by_one - in_batches;
                assert!(
                    saved >= 2 * layers * per_layer,
                    "{what}: the layer batches saved {saved} launches over two forwards"
                );
                if method == Method::Tezo {
                    // The side products instead: one matrix at a time, and with each layer's
                    // factors drawn by one launch where each matrix took three. They add z in
                    // f32 beside the GEMM, the copies store w + z in the weights' dtype.
                    let side = || CudaFusedHook::new(&go, key, eps).with_low_rank_side_products();
                    let (sides, side_logits, side_one_by_one) = run(side());
                    let (side_batched, _, side_in_batches) = run(side().with_layers(&gm.weights));
                    assert_same_f32(
                        &format!("{what} side factor batches"),
                        &side_batched,
                        &sides,
                    );
                    let saved = side_one_by_one - side_in_batches;
                    assert!(
                        saved >= 2 * layers * (2 - 1 + 7 * 3 - 1),
                        "{what}: the factor batches saved {saved} launches over two forwards"
                    );
                    assert_close(&format!("{what} side products"), &sides, &fused, tol);
                    let side_what = format!("{what} side product logits");
                    assert_close(&side_what, &side_logits, &fused_logits, tol);
                    assert!(
                        rel(&sides, &fused) > 0.0,
                        "{what}: the side products gave the copies' bits"
                    );
                }
                let mut ch = FusedHook::new(&co, key, eps, &cm.backend).with_head_block_rows(64);
                let cpu = cm
                    .target_logprobs(&ids, &layout, &targets, &mut ch)
                    .unwrap();
                let cpu_logits = cm.logits_at(&ids, &layout, &rows, &mut ch).unwrap();
                drop(ch);
                assert_close(&format!("{what} fused logprobs vs CPU"), &fused, &cpu, tol);
                assert_close(
                    &format!("{what} fused logits vs CPU"),
                    &fused_logits,
                    &cpu_logits,
                    tol,
                );

                let plain = gm
                    .target_logprobs(&ids, &layout, &targets, &mut *go.eval_hook(&gm).unwrap())
                    .unwrap();
                let moved = rel(&fused, &plain);
                assert!(
                    moved > 1e-4,
                    "{what}: the perturbation changed logprobs by {moved:.2e}"
                );

                // The same perturbation in place: write TeZO's virtual update first, then move.
                // A fused TeZO optimizer leaves every matrix to its hook (perturb_all skips
                // them), so TeZO's move comes from an in-place optimizer with the same seed
                // (same factors and taus); the others move with their own, whose Sparse-MeZO
                // thresholds were taken before the step.
                go.materialize(&mut gm).unwrap();
                let in_place_tezo;
                let mover = if method == Method::Tezo {
                    in_place_tezo = ZoOptimizer::new(zc(Perturb::Inplace), &gm).unwrap();
                    &in_place_tezo
                } else {
                    &go
                };
                mover.perturb_all(&mut gm, key, 0.0, eps).unwrap();
                let inplace = gm
                    .target_logprobs(&ids, &layout, &targets, &mut NoHook)
                    .unwrap();
                let inplace_logits = gm.logits_at(&ids, &layout, &rows, &mut NoHook).unwrap();
                // Element-wise z gives the fused copies the in-place bits; low-rank z is added
                // in f32 beside a GEMM on the stored weights, which in-place rounds to bf16.
                let same = if method == Method::Tezo { tol } else { F32_TOL };
                assert_close(&format!("{what} fused vs in place"), &fused, &inplace, same);
                assert_close(
                    &format!("{what} fused vs in place logits"),
                    &fused_logits,
                    &inplace_logits,
                    same,
                );
            }
        }
    }
}

#[test]
fn zo_fused_layers_stored_unlike_are_copied_one_tensor_at_a_time() {
    // Layer 1 in f32 among bf16 layers: one buffer per position in a layer cannot hold every
    // layer's copy, so the hook that would batch them copies one tensor at a time instead.
    let Some(g) = gpu() else { return };
    let cfg = common::small_config(false);
    let (ids, layout, targets) = lm_batch(&cfg);
    let mut w = g.random_weights(&cfg, 7, DType::BF16).unwrap();
    let mut f32_layers = g.random_weights(&cfg, 8, DType::F32).unwrap().layers;
    w.layers[1] = f32_layers.swap_remove(1);
    let m = Llama::new(cfg.clone(), w, g.clone());
    let zc = ZoConfig {
        method: Method::Mezo,
        perturb: Perturb::Fused,
        ..Default::default()
    };
    let opt = ZoOptimizer::new(zc, &m).unwrap();
    let (key, eps) = (opt.key(1), 5e-2);
    let run = |batched: bool| {
        let before = g.launch_counts().0;
        let mut hook = CudaFusedHook::new(&opt, key, eps);
        if batched {
            hook = hook.with_layers(&m.weights);
        }
        let lp = m
            .target_logprobs(&ids, &layout, &targets, &mut hook)
            .unwrap();
        (lp, g.launch_counts().0 - before)
    };
    let (one_by_one, launches) = run(false);
    let (fallen_back, fallback_launches) = run(true);
    assert_same_f32("layers stored unlike", &fallen_back, &one_by_one);
    assert_eq!(fallback_launches, launches, "launches of the fallback");
    let plain = m
        .target_logprobs(&ids, &layout, &targets, &mut NoHook)
        .unwrap();
    assert!(
        rel(&one_by_one, &plain) > 1e-4,
        "the perturbation moved nothing"
    );
}

#[test]
fn zo_fused_step_with_zero_lr_leaves_the_weights_alone() {
    let Some(g) = gpu() else { return };
    let cfg = common::small_config(true);
    let (ids, layout, targets) = lm_batch(&cfg);
    for dtype in [DType::F32, DType::BF16] {
        for method in [Method::Mezo, Method::SparseMezo, Method::Tezo] {
            let dev_w = g.random_weights(&cfg, 50, dtype).unwrap();
            let before = dev_w.try_map(|_, w| g.weight_to_host_tensor(w)).unwrap();
            let mut gm = Llama::new(cfg.clone(), dev_w, g.clone());
            let zc = ZoConfig {
                method,
                perturb: Perturb::Fused,
                lr: 0.0,
                eps: 1e-2,
                sparsity: 0.5,
                ..Default::default()
            };
            let mut go = ZoOptimizer::new(zc, &gm).unwrap();
            g.mem().reset_peaks();
            let mut losses = vec![];
            for s in 0..2u64 {
                let r = go
                    .step(&mut gm, s, &mut |m, hook| {
                        let lp = m.target_logprobs(&ids, &layout, &targets, hook)?;
                        Ok(-lp.iter().sum::<f32>() / lp.len() as f32)
                    })
                    .unwrap();
                losses.push((r.loss_plus, r.loss_minus));
            }
            go.materialize(&mut gm).unwrap();
            let what = format!("{} {dtype:?} fused, lr 0", method.name());
            for (w, b) in gm.weights.tensors().iter().zip(before.tensors()) {
                assert_same_bits(&format!("{what}: {}", b.name), &g, w, b);
            }
            assert!(
                losses.iter().all(|(a, b)| a != b),
                "{what}: the perturbation did not show in the losses {losses:?}"
            );
        }
    }
}

#[test]
fn zo_rank_above_the_low_rank_kernel_limit_is_refused_up_front() {
    let Some(g) = gpu() else { return };
    let cfg = common::small_config(false);
    let gm = Llama::new(
        cfg.clone(),
        g.random_weights(&cfg, 5, DType::F32).unwrap(),
        g.clone(),
    );
    for method in [Method::Tezo, Method::TezoAdam] {
        let zc = |rank| ZoConfig {
            method,
            rank,
            ..Default::default()
        };
        let err = ZoOptimizer::new(zc(65), &gm)
            .err()
            .expect("rank 65 accepted");
        assert!(
            err.to_string()
                .contains("rank 65 is above 64, the largest this backend's low-rank pass takes"),
            "{err}"
        );
        assert!(ZoOptimizer::new(zc(64), &gm).is_ok());
    }
}
