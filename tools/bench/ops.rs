//! The CPU forward's operations one by one, at every vector width this CPU has, and the Philox
//! normal generator behind every ZO pass: time per call and per forward of the default model's
//! shapes (batch x seq tokens). Variants of one op give the same bits (see
//! `backend::cpu::simd`); this shows what each costs, llm.c-style, side by side.
//!
//! cargo run --release --example bench_ops -- [--batch 16] [--seq 64] [--iters 3] [--only passes|matmul]

#[path = "common.rs"]
mod common;

use common::{arg, median};
use std::time::Instant;
use zoft::backend::cpu::simd::{force, level, Level};
use zoft::backend::cpu::{gemm_amx, gemm_bf16, Bf16Kernel, CpuBackend, Matmul};
use zoft::backend::mem::Tag;
use zoft::backend::{AttnShape, Backend, SeqLayout};
use zoft::model::{HostTensor, LlamaConfig};
use zoft::rng::Philox;
use zoft::zo::direction::StepKey;
use zoft::zo::passes::{AdamArgs, Rule, ZSpec, ZoBackend};

fn normals(n: usize, seed: u64) -> Vec<f32> {
    let mut v = vec![0.0; n];
    Philox::new(seed, 0, 0).fill_normal(0, &mut v);
    v
}

/// Median seconds of at least `iters` calls, and of as many as fill 0.5 s, after warming up for
/// at least 3 calls and 0.5 s. With one warm-up call and 3 timed ones, the GEMMs of under a
/// millisecond read at half their rate in some runs (the CPU's clock and the thread pool still
/// waking up, and the noise of a shared machine), which 31 calls or a standalone run did not.
fn time(iters: usize, mut f: impl FnMut()) -> f64 {
    let run_for = |min_calls: usize, f: &mut dyn FnMut()| {
        let start = Instant::now();
        let mut seconds = vec![];
        while seconds.len() < min_calls || start.elapsed().as_secs_f64() < 0.5 {
            let t = Instant::now();
            f();
            seconds.push(t.elapsed().as_secs_f64());
        }
        seconds
    };
    run_for(3, &mut f);
    median(run_for(iters, &mut f))
}

fn report(op: &str, variant: &str, seconds: f64, per_forward: usize) {
    println!(
        "{}",
        serde_json::json!({"bench": "zoft_cpu_op", "op": op, "variant": variant,
            "ms_per_call": seconds * 1e3, "calls_per_forward": per_forward,
            "ms_per_forward": seconds * 1e3 * per_forward as f64,
            "threads": rayon::current_num_threads()})
    );
}

fn main() -> anyhow::Result<()> {
    let batch: usize = arg("--batch", "16").parse()?;
    let seq: usize = arg("--seq", "64").parse()?;
    let iters: usize = arg("--iters", "3").parse()?;
    // `--only passes` times the ZO passes alone, `--only matmul` the GEMMs.
    let cfg = LlamaConfig::preset("smollm2-135m").expect("preset");
    match arg("--only", "").as_str() {
        "passes" => return zo_passes(iters, &CpuBackend::new()),
        "matmul" => return gemms(iters, batch * seq, &cfg),
        _ => {}
    }
    let (d, ffn, layers, vocab) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
        cfg.vocab_size,
    );
    let shape = AttnShape {
        n_heads: cfg.num_attention_heads,
        n_kv_heads: cfg.num_key_value_heads.unwrap_or(cfg.num_attention_heads),
        head_dim: d / cfg.num_attention_heads,
    };
    let kvd = shape.n_kv_heads * shape.head_dim;
    let rows = batch * seq;
    let layout = SeqLayout::full(batch, seq, &vec![seq; batch]);
    let be = CpuBackend::new();
    let act = |cols: usize, seed: u64| {
        be.from_host(&normals(rows * cols, seed), rows, cols, Tag::Activations)
    };
    let (mut q, mut k, v) = (act(d, 1)?, act(kvd, 2)?, act(kvd, 3)?);
    let (mut out, mut gate, up) = (act(d, 4)?, act(ffn, 5)?, act(ffn, 6)?);
    let gain = HostTensor::from_f32("gain", vec![d], &normals(d, 7));
    let logits = normals(vocab, 8);
    let detected = level();
    let levels = [Level::Baseline, Level::Avx2, Level::Avx512]
        .into_iter()
        .filter(|&l| l <= detected);
    for l in levels {
        force(l);
        let name = format!("{l:?}").to_lowercase();
        report(
            "attention",
            &name,
            time(iters, || {
                be.attention(&q, &k, &v, shape, &layout, &mut out).unwrap()
            }),
            layers,
        );
        let inv_freq: Vec<f32> = cfg.rope_inv_freq().iter().map(|&f| f as f32).collect();
        report(
            "rope (q and k)",
            &name,
            time(iters, || {
                be.rope(&mut q, shape.n_heads, &layout, &inv_freq).unwrap();
                be.rope(&mut k, shape.n_kv_heads, &layout, &inv_freq)
                    .unwrap();
            }),
            layers,
        );
        report(
            "swiglu",
            &name,
            time(iters, || be.swiglu(&mut gate, &up).unwrap()),
            layers,
        );
        report(
            "rmsnorm",
            &name,
            time(iters, || be.rmsnorm(&q, &gain, 1e-5, &mut out).unwrap()),
            2 * layers + 1,
        );
        report(
            "logsumexp (one row per token)",
            &name,
            time(iters, || {
                for _ in 0..rows {
                    std::hint::black_box(zoft::backend::cpu::logsumexp(&logits));
                }
            }),
            1,
        );
        let mut z = vec![0.0f32; 1 << 22];
        let gen = time(iters, || Philox::new(1, 2, 3).fill_normal(0, &mut z));
        report("philox normals, 4M on one thread", &name, gen, 1);
    }
    force(detected);
    zo_passes(iters, &be)?;
    gemms(iters, rows, &cfg)
}

/// The GEMM shapes of one layer of `cfg` and of its LM head over `rows` tokens.
fn gemms(iters: usize, rows: usize, cfg: &LlamaConfig) -> anyhow::Result<()> {
    let (d, kvd, ffn) = (cfg.hidden_size, cfg.kv_dim(), cfg.intermediate_size);
    let (layers, vocab) = (cfg.num_hidden_layers, cfg.vocab_size);
    // f32 (the `gemm` crate) against each bf16 kernel this CPU has.
    let mut matmuls = vec![("f32", CpuBackend::with_matmul(Matmul::F32)?)];
    if gemm_bf16::available() {
        let bf16 = || CpuBackend::with_matmul(Matmul::Bf16);
        matmuls.push(("bf16", bf16()?.with_bf16_kernel(Bf16Kernel::Avx512)?));
        if gemm_amx::available() {
            matmuls.push(("bf16-amx", bf16()?.with_bf16_kernel(Bf16Kernel::Amx)?));
        }
    }
    for (n, kk, per_forward) in [
        (d, d, 2 * layers),
        (kvd, d, 2 * layers),
        (ffn, d, 2 * layers),
        (d, ffn, layers),
        (vocab, d, 1),
    ] {
        let x = normals(rows * kk, 9);
        let w = normals(n * kk, 10);
        let mut o = vec![0.0f32; rows * n];
        for (name, be) in &matmuls {
            let s = time(iters, || be.matmul_slices(&x, &w, &mut o, rows, n, kk));
            report(
                &format!(
                    "matmul {rows}x{n}x{kk} ({:.0} GFLOP/s)",
                    2.0 * (rows * n * kk) as f64 / s / 1e9
                ),
                name,
                s,
                per_forward,
            );
        }
    }
    Ok(())
}

/// One ZO pass of each kind over 32M weights (a quarter of the default model), on all threads,
/// against generating the same normals alone and against a plain read-modify-write: what a
/// pass costs beyond the generator is its own overhead.
fn zo_passes(iters: usize, be: &CpuBackend) -> anyhow::Result<()> {
    let n = 1 << 25;
    let mut w = HostTensor::from_f32("w", vec![n / 512, 512], &normals(n, 11));
    let key = StepKey { seed: 1, step: 2 };
    let per_model = |s: f64| s * 134.5e6 / n as f64;
    let report_pass = |name: &str, s: f64| {
        println!(
            "{}",
            serde_json::json!({"bench": "zoft_zo_pass", "pass": name, "ms_per_call": s * 1e3,
                "ms_per_default_model": per_model(s) * 1e3,
                "ns_per_weight": s * 1e9 / n as f64,
                "threads": rayon::current_num_threads()})
        );
    };
    let chunk = 1 << 14;
    report_pass(
        "normals only (into an L1-sized buffer)",
        time(iters, || {
            use rayon::prelude::*;
            (0..n / chunk).into_par_iter().for_each(|c| {
                let mut z = [0.0f32; 2048];
                for s in (0..chunk).step_by(z.len()) {
                    Philox::new(1, 2, 3).fill_normal((c * chunk + s) as u64, &mut z);
                    std::hint::black_box(&z);
                }
            })
        }),
    );
    report_pass(
        "read-modify-write",
        time(iters, || {
            zoft::zo::direction::for_each_chunk(&mut w, |_, w| {
                w.iter_mut().for_each(|x| *x *= 1.0000001)
            })
        }),
    );
    let tau = normals(16, 12);
    let sgd = Rule::Sgd {
        lr: 1e-6,
        g: 0.5,
        wd: 0.0,
    };
    // |w| <= 0.25 keeps 20% of these normal weights, as Sparse-MeZO's default sparsity does.
    let sparse = ZSpec::Sparse { threshold: 0.25 };
    // (name, z, offset the weights start from, rule). Sparse-MeZO runs fused, so its update
    // pass starts from the unperturbed weights (offset 0).
    let passes: [(&str, ZSpec, f32, Rule); 5] = [
        ("dense move", ZSpec::Dense, 1e-3, Rule::Move { to: -1e-3 }),
        ("dense sgd", ZSpec::Dense, 1e-3, sgd),
        ("sparse move", sparse, 1e-3, Rule::Move { to: -1e-3 }),
        ("sparse sgd from w0", sparse, 0.0, sgd),
        (
            "low-rank 16 move",
            ZSpec::LowRank { coef: &tau },
            1e-3,
            Rule::Move { to: 1.0 },
        ),
    ];
    for (name, spec, offset, rule) in passes {
        let s = time(iters, || {
            be.zo_pass(&mut w, 0, key, spec, offset, rule, None)
                .unwrap()
        });
        report_pass(name, s);
    }
    // MeZO-Adam's update: the dense draw plus reading and writing both f32 moments.
    let adam = Rule::Adam(AdamArgs {
        g: 0.5,
        lr: 1e-6,
        wd: 0.0,
        beta1: 0.9,
        beta2: 0.999,
        c1: 0.1,
        c2: 0.001,
        eps: 1e-8,
    });
    let zeros = vec![0.0f32; n];
    let (mut m, mut v) = (be.zo_state(&zeros)?, be.zo_state(&zeros)?);
    let s = time(iters, || {
        be.zo_pass(
            &mut w,
            0,
            key,
            ZSpec::Dense,
            0.0,
            adam,
            Some((&mut m, &mut v)),
        )
        .unwrap()
    });
    report_pass("dense adam from w0", s);
    Ok(())
}
