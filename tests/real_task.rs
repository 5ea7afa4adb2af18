//! Each ZO method on the real default model and task (SmolLM2-135M-Instruct, Rotten Tomatoes
//! sentiment): a short run lowers the training loss and raises dev accuracy above zero-shot.
//! The model and data are fetched into the cache on first use.

mod common;
use common::{first_last_means, logged_losses};
use std::sync::atomic::AtomicBool;
use zoft::backend::cpu::CpuBackend;
use zoft::data::batch::LossKind;
use zoft::model::load::load_dir;
use zoft::model::Llama;
use zoft::train::{train, TrainOptions};
use zoft::zo::{Method, Perturb, ZoConfig};

fn run(method: Method, lr: f32, perturb: Perturb) {
    let dir = match std::env::var_os("ZOFT_TEST_MODEL") {
        Some(d) => d.into(),
        None => zoft::fetch::ensure_default_model().expect("fetching the default model"),
    };
    let f = load_dir(&dir).unwrap();
    let task =
        zoft::data::load_task("sst2", None, &f.tokenizer, f.cfg.max_position_embeddings).unwrap();
    let pad = f.tokenizer.eos_id().unwrap();
    let mut model = Llama::new(f.cfg, f.weights, CpuBackend::new());
    let out = std::env::temp_dir().join(format!(
        "zoft-real-{}-{}",
        method.name(),
        std::process::id()
    ));
    let opts = TrainOptions {
        zo: ZoConfig {
            method,
            perturb,
            lr,
            eps: 1e-3,
            seed: 0,
            ..Default::default()
        },
        steps: 40,
        batch_size: 16,
        eval_every: 0,
        save_every: 0,
        eval_batch_size: 50,
        max_eval: 100,
        loss: LossKind::Classify,
        out_dir: out.clone(),
        progress: false,
    };
    let s = train(
        &mut model,
        &dir,
        &task,
        pad,
        &opts,
        None,
        &AtomicBool::new(false),
        |_| {},
    )
    .unwrap();
    let losses = logged_losses(&out.join("train_log.jsonl"));
    let (first, last) = first_last_means(&losses, 10);
    let (before, after) = (s.zero_shot_dev.accuracy.unwrap(), s.dev.accuracy.unwrap());
    eprintln!(
        "{}: train loss {first:.4} -> {last:.4}, dev accuracy {before:.3} -> {after:.3}",
        method.name()
    );
    let _ = std::fs::remove_dir_all(&out);
    assert!(
        last < first,
        "{}: training loss did not go down ({first} -> {last})",
        method.name()
    );
    assert!(
        after > before,
        "{}: dev accuracy did not rise ({before} -> {after})",
        method.name()
    );
}

#[test]
fn mezo_learns_sentiment() {
    run(Method::Mezo, 3e-5, Perturb::Inplace);
}

#[test]
fn mezo_adam_learns_sentiment() {
    run(Method::MezoAdam, 5e-4, Perturb::Inplace);
}

#[test]
fn sparse_mezo_learns_sentiment() {
    run(Method::SparseMezo, 1e-4, Perturb::Fused);
}

#[test]
fn tezo_learns_sentiment() {
    run(Method::Tezo, 3e-5, Perturb::Fused);
}

#[test]
fn tezo_adam_learns_sentiment() {
    run(Method::TezoAdam, 5e-4, Perturb::Inplace);
}
