//! The trainer on a tiny random model and a synthetic classification task: resume equals the
//! uninterrupted run bit for bit, interruption saves a checkpoint, a non-finite loss stops the
//! run and keeps the last good checkpoint, and training lowers the loss.

mod common;
use common::*;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use zoft::backend::cpu::CpuBackend;
use zoft::model::{DType, Llama, LlamaConfig, LlamaWeights};
use zoft::train::{auto_perturb, fmt_peak_memory, load_train_state, train};
use zoft::zo::{Method, Perturb};

fn load_ckpt(dir: &Path, cfg: &LlamaConfig) -> Llama<CpuBackend> {
    Llama::new(
        cfg.clone(),
        LlamaWeights::load(dir, cfg).unwrap(),
        CpuBackend::new(),
    )
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let cfg = tiny_config();
    let t = synthetic_task(&cfg);
    for (method, perturb) in RESUME_CASES {
        let name = format!("{}-{perturb:?}", method.name());
        // Uninterrupted: 6 steps, checkpoint at 3.
        let a_dir = scratch_dir(&format!("{name}-a"));
        let mut a = tiny_model(&cfg, 4);
        train_quietly(
            &mut a,
            &a_dir,
            &t,
            &train_options(method, perturb, 6, 3, &a_dir),
            None,
        )
        .unwrap();
        // Interrupted after 3, then resumed from the checkpoint to 6.
        let b_dir = scratch_dir(&format!("{name}-b"));
        let mut b = tiny_model(&cfg, 4);
        train_quietly(
            &mut b,
            &b_dir,
            &t,
            &train_options(method, perturb, 3, 0, &b_dir),
            None,
        )
        .unwrap();
        let ckpt = b_dir.join("checkpoint");
        let state = load_train_state(&ckpt).unwrap();
        assert_eq!(state.0.step, 3);
        let mut b2 = load_ckpt(&ckpt, &cfg);
        train_quietly(
            &mut b2,
            &ckpt,
            &t,
            &train_options(method, perturb, 6, 0, &b_dir),
            Some(state),
        )
        .unwrap();
        assert!(
            snapshot(&a) == snapshot(&b2),
            "{name}: resumed run differs from the uninterrupted one"
        );
        // Every method trains every tensor, so each must have moved; for TeZO fused, whose
        // update stays low-rank in memory, that means saving folded it into the weights.
        let initial = snapshot(&tiny_model(&cfg, 4));
        for (i, (now, before)) in snapshot(&a).iter().zip(&initial).enumerate() {
            assert!(now != before, "{name}: tensor {i} did not move");
        }
        // The final checkpoint holds the final weights.
        assert!(
            snapshot(&load_ckpt(&a_dir.join("checkpoint"), &cfg)) == snapshot(&a),
            "{name}: checkpoint differs"
        );
    }
}

#[test]
fn interruption_saves_a_checkpoint() {
    let cfg = tiny_config();
    let dir = scratch_dir("stop");
    let mut m = tiny_model(&cfg, 4);
    let stop = AtomicBool::new(true);
    let s = train(
        &mut m,
        &dir,
        &synthetic_task(&cfg),
        0,
        &train_options(Method::Mezo, Perturb::Inplace, 5, 0, &dir),
        None,
        &stop,
        |_| {},
    )
    .unwrap();
    assert!(s.stopped_early.is_some());
    assert_eq!(load_train_state(&dir.join("checkpoint")).unwrap().0.step, 0);
}

#[test]
fn non_finite_loss_stops_and_keeps_last_good_checkpoint() {
    let cfg = tiny_config();
    let dir = scratch_dir("nan");
    let mut m = tiny_model(&cfg, 4);
    let t = synthetic_task(&cfg);
    train_quietly(
        &mut m,
        &dir,
        &t,
        &train_options(Method::Mezo, Perturb::Inplace, 2, 0, &dir),
        None,
    )
    .unwrap();
    let ckpt = dir.join("checkpoint");
    let good = std::fs::read(ckpt.join("model.safetensors")).unwrap();
    // Poison a weight: every loss becomes NaN.
    m.weights.final_norm.f32s_mut().unwrap()[0] = f32::NAN;
    let state = load_train_state(&ckpt).unwrap();
    let err = train_quietly(
        &mut m,
        &dir,
        &t,
        &train_options(Method::Mezo, Perturb::Inplace, 4, 1, &dir),
        Some(state),
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("non-finite loss") && msg.contains("last good checkpoint"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read(ckpt.join("model.safetensors")).unwrap(),
        good,
        "checkpoint was overwritten"
    );
}

#[test]
fn training_lowers_the_loss_and_raises_accuracy() {
    let cfg = tiny_config();
    let dir = scratch_dir("learn");
    let mut m = tiny_model(&cfg, 4);
    let mut opts = train_options(Method::Mezo, Perturb::Inplace, 300, 0, &dir);
    opts.zo.lr = 1e-3;
    let t = synthetic_task(&cfg);
    let s = train_quietly(&mut m, &dir, &t, &opts, None).unwrap();
    let losses = logged_losses(&dir.join("train_log.jsonl"));
    let (first, last) = first_last_means(&losses, 50);
    eprintln!(
        "mean loss first 50 steps {first:.4}, last 50 {last:.4}; dev {:?} -> {:?}",
        s.zero_shot_dev.accuracy, s.dev.accuracy
    );
    assert!(last < first * 0.9, "loss {first} -> {last}");
    assert!(
        s.dev.accuracy.unwrap() > s.zero_shot_dev.accuracy.unwrap(),
        "dev accuracy did not rise"
    );
}

#[test]
fn the_log_has_each_steps_losses_and_estimate_and_the_run_ends_with_test_accuracy() {
    let cfg = tiny_config();
    let dir = scratch_dir("log");
    let mut m = tiny_model(&cfg, 4);
    let weight_bytes = m.weights.byte_size();
    let mut opts = train_options(Method::Mezo, Perturb::Inplace, 5, 0, &dir);
    opts.eval_every = 2;
    let t = synthetic_task(&cfg);
    let s = train_quietly(&mut m, &dir, &t, &opts, None).unwrap();
    let text = std::fs::read_to_string(dir.join("train_log.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "{text}");
    let num = |v: &serde_json::Value, k: &str| {
        k.split('.')
            .fold(v, |v, k| &v[k])
            .as_f64()
            .unwrap_or_else(|| panic!("{k} is missing from {v}"))
    };
    let mut moved = false;
    for (i, v) in lines.iter().enumerate() {
        let step = i as u64 + 1;
        assert_eq!(v["step"].as_u64(), Some(step), "{v}");
        let (lp, lm) = (num(v, "loss_plus") as f32, num(v, "loss_minus") as f32);
        assert!(lp.is_finite() && lm.is_finite(), "{v}");
        moved |= lp != lm;
        // The logged estimate is the one made from this line's two losses.
        let g = (lp - lm) / (2.0 * opts.zo.eps);
        assert_eq!(num(v, "projected_grad") as f32, g, "{v}");
        assert_eq!(num(v, "lr") as f32, opts.zo.lr, "{v}");
        assert!(num(v, "seconds") > 0.0, "{v}");
        // The accounts by tag hold the weights; plain MeZO keeps no optimizer state.
        let weights = serde_json::json!(["weights", weight_bytes]);
        assert!(
            v["memory"]["current"]
                .as_array()
                .unwrap()
                .contains(&weights),
            "{v}"
        );
        assert!(num(v, "memory.total_peak") >= weight_bytes as f64, "{v}");
        assert_eq!(num(v, "optimizer_bytes"), 0.0, "{v}");
        // Every second step, but not the last: the final evaluation reports that one.
        let evaluated = step.is_multiple_of(2) && step < 5;
        assert_eq!(v.get("dev_accuracy").is_some(), evaluated, "{v}");
    }
    assert!(moved, "every step's two losses were equal");
    // The summary's accounts: the run's peak held the weights and, beside them, the largest
    // activations (weights are held throughout, so the two add up within the total).
    let peak = |tag: &str| s.memory.peak.iter().find(|(n, _)| n == tag).unwrap().1;
    let activations = peak("activations");
    assert_eq!(peak("weights"), weight_bytes);
    assert!(activations > 0 && s.memory.total_peak >= weight_bytes + activations);
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    // Tags that held nothing (optimizer, gradients, adapters here) are left out.
    let mut want = format!(
        "{:.1} MiB (weights {:.1}, activations {:.1}",
        mib(s.memory.total_peak),
        mib(weight_bytes),
        mib(activations)
    );
    if peak("scratch") > 0 {
        want += &format!(", scratch {:.1}", mib(peak("scratch")));
    }
    assert_eq!(fmt_peak_memory(&s.memory), want + ")");
    let test = s.test.expect("a finished run reports its test split");
    assert!(test.accuracy.is_some(), "{test:?}");
}

#[test]
fn empty_training_split_is_an_error() {
    let cfg = tiny_config();
    let dir = scratch_dir("empty");
    let mut t = synthetic_task(&cfg);
    t.train.clear();
    let mut m = tiny_model(&cfg, 4);
    let err = train_quietly(
        &mut m,
        &dir,
        &t,
        &train_options(Method::Mezo, Perturb::Inplace, 2, 0, &dir),
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("train split is empty"), "{err}");
}

/// `--perturb auto` on a resumed run keeps the checkpoint's mode (here in place, where auto
/// would now pick fused for MeZO over bf16 GEMMs), so the resumed run goes on as it started.
#[test]
fn auto_perturb_on_resume_keeps_the_checkpoints_mode() {
    let cfg = tiny_config();
    let t = synthetic_task(&cfg);
    let dir = scratch_dir("auto-resume");
    let mut m = tiny_model(&cfg, 4);
    let opts = train_options(Method::Mezo, Perturb::Inplace, 1, 0, &dir);
    train_quietly(&mut m, &dir, &t, &opts, None).unwrap();
    let (state, _) = load_train_state(&dir.join("checkpoint")).unwrap();
    assert_eq!(state.zo.perturb, Perturb::Inplace);
    let Ok(tiles) = CpuBackend::with_matmul(zoft::backend::cpu::Matmul::Bf16) else {
        eprintln!("skipped: this CPU lacks AVX512-BF16");
        return;
    };
    let m = Llama::new(
        cfg.clone(),
        LlamaWeights::random(&cfg, 4, DType::F32),
        tiles,
    );
    assert_eq!(auto_perturb(&opts.zo, &m, None), Perturb::Fused);
    assert_eq!(auto_perturb(&opts.zo, &m, Some(&state)), Perturb::Inplace);
}
