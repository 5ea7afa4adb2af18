//! ZO step time against forward time on the CPU, for each method and perturb mode, with the
//! peak memory of a step against that of an inference forward on the same batch.
//! Prints one JSON line per (method, perturb); `tools/bench-speed` runs it beside PyTorch MeZO.
//!
//! cargo run --release --example bench_speed -- [--model DIR | --random smollm2-135m [--dtype f32|bf16]] [--batch 16] [--seq 64] [--iters 2] [--methods mezo,tezo] [--perturb inplace,fused,paired] [--matmul f32|bf16]
//!
//! `--ab fused,paired` instead times steps of the two modes against each other, alternating
//! A F B B F A (F an inference forward) so that a drifting machine weighs on all three alike,
//! and prints each method's medians of B's step over A's and of each step over the forward.

#[path = "common.rs"]
mod common;

use common::{arg, load_model, median, NextTokenLoss};
use std::time::Instant;
use zoft::backend::cpu::{CpuBackend, Matmul};
use zoft::backend::mem::Tag;
use zoft::backend::NoHook;
use zoft::model::Llama;
use zoft::zo::{Method, Objective, Perturb, ZoConfig, ZoOptimizer};

fn main() -> anyhow::Result<()> {
    let batch: usize = arg("--batch", "16").parse()?;
    let seq: usize = arg("--seq", "64").parse()?;
    let iters: usize = arg("--iters", "2").parse()?;
    let methods: Vec<Method> = arg("--methods", "mezo,mezo-adam,sparse-mezo,tezo,tezo-adam")
        .split(',')
        .map(Method::parse)
        .collect::<anyhow::Result<_>>()?;
    let perturbs: Vec<Perturb> = arg("--perturb", "inplace,fused,paired")
        .split(',')
        .map(Perturb::parse)
        .collect::<anyhow::Result<_>>()?;
    let matmul = Matmul::parse(&arg("--matmul", "f32"))?;
    let (cfg, weights) = load_model()?;
    let mut model = Llama::new(cfg.clone(), weights, CpuBackend::with_matmul(matmul)?);
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| ((i * 7919) % cfg.vocab_size) as u32)
        .collect();
    let mut objective = NextTokenLoss::new(ids, batch, seq);
    let mem = model.backend.mem.clone();
    // The peak of an inference forward (a warm-up forward runs first).
    std::hint::black_box(objective.loss(&model, &mut NoHook)?);
    mem.reset_peaks();
    std::hint::black_box(objective.loss(&model, &mut NoHook)?);
    // The accounts hold the weights (mapped or loaded), so their peak is the whole forward's.
    let fwd_peak = mem.report().total_peak;
    let ab = arg("--ab", "");
    if !ab.is_empty() {
        let modes: Vec<Perturb> = ab
            .split(',')
            .map(Perturb::parse)
            .collect::<anyhow::Result<_>>()?;
        anyhow::ensure!(modes.len() == 2, "--ab takes two perturb modes, got {ab:?}");
        for &method in &methods {
            ab_steps(
                &mut model,
                &mut objective,
                method,
                [modes[0], modes[1]],
                iters,
                matmul.name(),
            )?;
        }
        return Ok(());
    }
    for &method in &methods {
        for &perturb in &perturbs {
            let zc = bench_config(method, perturb);
            if zc.validate().is_err() {
                continue; // a combination zoft refuses (Sparse-MeZO in place)
            }
            let mut opt = ZoOptimizer::new(zc, &model)?;
            // One in-place perturbation pass over every tensor, timed apart from the step (a
            // step in place runs three such passes, the last with the update folded in).
            let mut passes = vec![];
            for s in 0..iters + 1 {
                let t0 = Instant::now();
                let key = opt.key(1000 + s as u64);
                opt.perturb_all(&mut model, key, 0.0, 1e-3)?;
                passes.push(t0.elapsed().as_secs_f64());
                opt.perturb_all(&mut model, key, 1e-3, 0.0)?;
            }
            let pass_s = median(passes[1..].to_vec());
            mem.reset_peaks();
            // Forwards and steps alternate, so both see the same state of a noisy machine.
            let (mut steps, mut fwds) = (vec![], vec![]);
            for s in 0..iters + 1 {
                let t0 = Instant::now();
                opt.step_objective(&mut model, s as u64, &mut objective)?;
                let t1 = Instant::now();
                std::hint::black_box(objective.loss(&model, &mut NoHook)?);
                if s > 0 {
                    steps.push((t1 - t0).as_secs_f64());
                    fwds.push(t1.elapsed().as_secs_f64());
                }
            }
            // Noise on a shared machine only ever adds time, so the minimum is the steadier
            // figure; both are reported.
            let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
            let (step_min, fwd_min) = (min(&steps), min(&fwds));
            // Each step over the forward timed right after it, so that the two share the
            // machine's state of the moment.
            let paired = median(steps.iter().zip(&fwds).map(|(s, f)| s / f).collect());
            let fwd_s = median(fwds);
            // Beside the moments in the optimizer account, state a method keeps on the host
            // (TeZO's per-matrix coefficients and rank moments).
            let host_state = opt.method.state_bytes() - mem.current(Tag::Optimizer);
            let step_peak = mem.report().total_peak + host_state;
            let step_s = median(steps);
            println!(
                "{}",
                serde_json::json!({"bench": "zoft_zo_step", "device": "cpu", "threads": rayon::current_num_threads(),
                    "method": method.name(), "perturb": perturb, "matmul": matmul.name(), "batch": batch, "seq": seq,
                    "forward_s": fwd_s, "step_s": step_s, "pass_s": pass_s, "step_over_forward": step_s / fwd_s,
                    "forward_s_min": fwd_min, "step_s_min": step_min, "step_over_forward_min": step_min / fwd_min,
                    "step_over_forward_paired": paired,
                    "peak_forward_bytes": fwd_peak, "peak_step_bytes": step_peak,
                    "peak_step_over_forward": step_peak as f64 / fwd_peak as f64,
                    "optimizer_state_bytes": opt.method.state_bytes()})
            );
        }
    }
    Ok(())
}

/// The hyperparameters every benchmarked step runs with: a learning rate small enough that
/// the weights stay where they started.
fn bench_config(method: Method, perturb: Perturb) -> ZoConfig {
    ZoConfig {
        method,
        perturb,
        lr: 1e-7,
        eps: 1e-3,
        seed: 1,
        ..Default::default()
    }
}

/// Steps of `method` in modes A and B on one model and inference forwards F, A F B B F A per
/// round for `rounds` rounds (after one warm-up round): each round's B over A, and the medians
/// of that and of each mode's step over the round's forward.
fn ab_steps(
    model: &mut Llama<CpuBackend>,
    objective: &mut NextTokenLoss,
    method: Method,
    modes: [Perturb; 2],
    rounds: usize,
    matmul: &str,
) -> anyhow::Result<()> {
    let mut opts = vec![];
    for perturb in modes {
        let zc = bench_config(method, perturb);
        zc.validate()?;
        opts.push(ZoOptimizer::new(zc, model)?);
    }
    let (mut times, mut fwds) = ([vec![], vec![]], vec![]);
    let mut step = 0u64;
    for round in 0..rounds + 1 {
        let (mut t, mut f) = ([0.0f64; 2], 0.0);
        for which in [Some(0), None, Some(1), Some(1), None, Some(0)] {
            let t0 = Instant::now();
            match which {
                Some(w) => {
                    opts[w].step_objective(model, step, objective)?;
                    t[w] += t0.elapsed().as_secs_f64() / 2.0;
                    step += 1;
                }
                None => {
                    std::hint::black_box(objective.loss(model, &mut NoHook)?);
                    f += t0.elapsed().as_secs_f64() / 2.0;
                }
            }
        }
        if round > 0 {
            times[0].push(t[0]);
            times[1].push(t[1]);
            fwds.push(f);
        }
    }
    let ratios: Vec<f64> = times[1].iter().zip(&times[0]).map(|(b, a)| b / a).collect();
    let over_fwd = |t: &[f64]| median(t.iter().zip(&fwds).map(|(s, f)| s / f).collect::<Vec<_>>());
    println!(
        "{}",
        serde_json::json!({"bench": "zoft_ab_step", "device": "cpu", "threads": rayon::current_num_threads(),
            "method": method.name(), "matmul": matmul, "a": modes[0], "b": modes[1], "rounds": rounds,
            "step_a_s": median(times[0].clone()), "step_b_s": median(times[1].clone()),
            "forward_s": median(fwds.clone()),
            "a_step_over_forward": over_fwd(&times[0]), "b_step_over_forward": over_fwd(&times[1]),
            "b_over_a": median(ratios.clone()), "b_over_a_all": ratios})
    );
    Ok(())
}
