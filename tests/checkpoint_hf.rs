//! Trained checkpoints load in HF transformers. For two tiny runs (TeZO fused with tied
//! embeddings, whose low-rank update is folded in at save, and MeZO in place, untied),
//! `tests/fixtures/checkpoint_hf_golden.json` holds what HF transformers computed from the
//! checkpoint's files: the logits of `LlamaForCausalLM` on fixed tokens, and a fingerprint of
//! every tensor in `model.safetensors`, loaded with dtype="auto". A run here must write a
//! config.json that names its tensors' dtype and the same tensors (so the golden logits are
//! those of its files), and its trained model, in memory, must give those logits.
//!
//! To regenerate the fixture after a deliberate change to the tiny runs:
//!   ZOFT_CHECKPOINT_FIXTURE_DIR=/tmp/ck cargo test --release --test checkpoint_hf
//!   python3 tools/fixtures/make_checkpoint_golden.py /tmp/ck > tests/fixtures/checkpoint_hf_golden.json
//! (python3 with torch, transformers and safetensors, e.g. the one `tools/peer-python` prints).

mod common;
use common::*;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use zoft::backend::cpu::CpuBackend;
use zoft::backend::{NoHook, SeqLayout};
use zoft::model::safetensors_io::load_file;
use zoft::model::{Llama, LlamaConfig};
use zoft::zo::{Method, Perturb};

/// (case name, method, perturb mode, tied embeddings).
const CASES: [(&str, Method, Perturb, bool); 2] = [
    ("tezo-fused-tied", Method::Tezo, Perturb::Fused, true),
    ("mezo-inplace-untied", Method::Mezo, Perturb::Inplace, false),
];

/// The tokens both zoft and HF run: one sequence of 12.
const IDS_SALT: u64 = 77;
const IDS_LEN: usize = 12;

#[derive(Deserialize)]
struct Fingerprint {
    shape: Vec<usize>,
    sum: f64,
    weighted: f64,
}

#[derive(Deserialize)]
struct Case {
    ids: Vec<u32>,
    /// [IDS_LEN x vocab], row-major.
    logits: Vec<f32>,
    tensors: BTreeMap<String, Fingerprint>,
}

/// The sum of a tensor's values, and their sum weighted by (i mod 7) - 3 over the row-major
/// index i: a transposed, permuted or shifted tensor changes the second. The fixture's script
/// computes the same.
fn fingerprint(values: &[f32]) -> (f64, f64) {
    values
        .iter()
        .enumerate()
        .fold((0.0, 0.0), |(s, w), (i, &x)| {
            (s + x as f64, w + x as f64 * ((i % 7) as f64 - 3.0))
        })
}

/// Trains a tiny model for four steps; returns it and its run's directory.
fn trained(
    name: &str,
    method: Method,
    perturb: Perturb,
    tied: bool,
) -> (ScratchDir, Llama<CpuBackend>) {
    let mut cfg = tiny_config();
    cfg.tie_word_embeddings = tied;
    let task = synthetic_task(&cfg);
    let dir = scratch_dir(&format!("hf-{name}"));
    let mut model = tiny_model(&cfg, 11);
    let mut opts = train_options(method, perturb, 4, 0, &dir);
    // The update is then a few percent of the weights, so the last-place differences another
    // CPU's f32 GEMMs make in the estimate g move the written weights by about 1e-7 of their
    // size, far inside the tolerances below, while training still moves the logits by 3-4%.
    opts.zo.lr = 1e-4;
    train_quietly(&mut model, &dir, &task, &opts, None).unwrap();
    (dir, model)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn trained_checkpoints_give_hf_transformers_logits() {
    let keep = std::env::var_os("ZOFT_CHECKPOINT_FIXTURE_DIR");
    let golden: BTreeMap<String, Case> = serde_json::from_str(
        &std::fs::read_to_string("tests/fixtures/checkpoint_hf_golden.json").unwrap(),
    )
    .unwrap();
    for (name, method, perturb, tied) in CASES {
        let (dir, model) = trained(name, method, perturb, tied);
        let ckpt = dir.join("checkpoint");
        let ids = tokens(IDS_LEN, model.cfg.vocab_size, IDS_SALT);
        if let Some(keep) = &keep {
            let to = Path::new(keep).join(name);
            copy_dir(&ckpt, &to);
            std::fs::write(to.join("ids.json"), serde_json::to_string(&ids).unwrap()).unwrap();
            continue;
        }
        let case = &golden[name];
        assert_eq!(case.ids, ids, "{name}: the fixture ran other tokens");

        // config.json names the dtype the weights are written in (HF's dtype="auto" loads by
        // it), and the files hold the tensors HF read, by name, shape and value.
        let files = load_file(&ckpt.join("model.safetensors")).unwrap();
        let written = LlamaConfig::from_file(&ckpt.join("config.json")).unwrap();
        for (t, tensor) in &files {
            assert_eq!(
                written.torch_dtype.as_deref(),
                Some(tensor.dtype.hf_name()),
                "{name}: config.json's torch_dtype against {t}'s dtype"
            );
        }
        let names: Vec<&String> = files
            .keys()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let expected: Vec<&String> = case.tensors.keys().collect();
        assert_eq!(names, expected, "{name}: the checkpoint's tensor names");
        for (t, fp) in &case.tensors {
            let tensor = &files[t];
            assert_eq!(tensor.shape, fp.shape, "{name}: {t} shape");
            let (sum, weighted) = fingerprint(&tensor.to_f32_vec());
            let scale = tensor
                .to_f32_vec()
                .iter()
                .map(|x| x.abs() as f64)
                .sum::<f64>();
            for (what, ours, theirs) in [
                ("sum", sum, fp.sum),
                ("weighted sum", weighted, fp.weighted),
            ] {
                assert!(
                    (ours - theirs).abs() <= 1e-5 * scale,
                    "{name}: {t} {what} {ours} against {theirs} in the fixture"
                );
            }
        }

        // The model zoft trained gives the logits HF computes from its files.
        let n = ids.len();
        let rows: Vec<usize> = (0..n).collect();
        let logits = model
            .logits_at(&ids, &SeqLayout::full(1, n, &[n]), &rows, &mut NoHook)
            .unwrap();
        let err = rel_err(&logits, &case.logits);
        println!("{name}: logits against HF transformers: relative error {err:.3e}");
        assert!(err < 1e-5, "{name}: logits differ from HF's by {err:.3e}");
        // And training moved them: the checkpoint is not the initial model.
        let mut cfg = model.cfg.clone();
        cfg.tie_word_embeddings = tied;
        let before = tiny_model(&cfg, 11)
            .logits_at(&ids, &SeqLayout::full(1, n, &[n]), &rows, &mut NoHook)
            .unwrap();
        let moved = rel_err(&before, &case.logits);
        println!("{name}: the initial model's logits against them: relative error {moved:.3e}");
        assert!(
            moved > 1e-3,
            "{name}: training left the logits at {moved:.3e}"
        );
    }
    assert!(
        keep.is_none(),
        "checkpoints written for the fixture; no assertion ran"
    );
}
