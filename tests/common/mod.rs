//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use zoft::backend::cpu::CpuBackend;
use zoft::backend::{Backend, LinearHook, PairedHook, SeqLayout};
use zoft::data::batch::LossKind;
use zoft::data::jsonl::{Format, Origin};
use zoft::data::{Example, Task, TaskKind};
use zoft::model::{DType, Llama, LlamaConfig, LlamaWeights};
use zoft::train::{train, TrainOptions, TrainState, TrainSummary};
use zoft::zo::{Method, Objective, Perturb, StepResult, ZoConfig};

/// A tiny LLaMA config: GQA (4 query heads over 2 kv heads), 2 layers.
pub fn tiny_config() -> LlamaConfig {
    let mut c = LlamaConfig::preset("smollm2-135m").unwrap();
    c.hidden_size = 32;
    c.intermediate_size = 48;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = Some(2);
    c.vocab_size = 61;
    c.max_position_embeddings = 64;
    c.rope_theta = 10000.0;
    c.tie_word_embeddings = false;
    c
}

pub fn tiny_model(cfg: &LlamaConfig, seed: u64) -> Llama<CpuBackend> {
    let w = LlamaWeights::random(cfg, seed, DType::F32);
    Llama::new(cfg.clone(), w, CpuBackend::new())
}

/// Every tensor's stored bytes, for comparing weights bit for bit.
pub fn snapshot(m: &Llama<CpuBackend>) -> Vec<Vec<u8>> {
    m.weights
        .tensors()
        .iter()
        .map(|t| t.bytes().to_vec())
        .collect()
}

/// Relative norm error ||a - b|| / ||b||.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Deterministic token ids in [0, vocab).
pub fn tokens(n: usize, vocab: usize, salt: u64) -> Vec<u32> {
    let p = zoft::rng::Philox::new(salt, 1, 2);
    (0..n)
        .map(|i| (p.block(i as u64)[0] as usize % vocab) as u32)
        .collect()
}

/// Mean of loss(+eps) and loss(-eps) of every step in a trainer's JSONL log.
pub fn logged_losses(log: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["loss_plus"].as_f64().unwrap() + v["loss_minus"].as_f64().unwrap()) / 2.0
        })
        .collect()
}

/// Mean of the first and of the last `n` values.
pub fn first_last_means(v: &[f64], n: usize) -> (f64, f64) {
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    (mean(&v[..n]), mean(&v[v.len() - n..]))
}

/// Every method, each with a perturbation mode, for the trainer's resume tests.
pub const RESUME_CASES: [(Method, Perturb); 5] = [
    (Method::Mezo, Perturb::Inplace),
    (Method::MezoAdam, Perturb::Inplace),
    (Method::SparseMezo, Perturb::Fused),
    (Method::Tezo, Perturb::Fused),
    (Method::TezoAdam, Perturb::Inplace),
];

/// Label 1 for four examples in five (by the first prompt token); candidates are tokens 5 and 9.
/// Learning the class prior alone takes the loss from ~ln 2 towards 0.5.
pub fn synthetic_task(cfg: &LlamaConfig) -> Task {
    let mk = |n: usize, salt: u64| -> Vec<Example> {
        (0..n)
            .map(|i| {
                let prompt = tokens(6, cfg.vocab_size, salt * 1000 + i as u64);
                let gold = !prompt[0].is_multiple_of(5) as usize;
                Example {
                    origin: Origin {
                        file: PathBuf::from("synthetic"),
                        line: i + 1,
                    },
                    prompt,
                    candidates: vec![vec![5], vec![9]],
                    gold,
                }
            })
            .collect()
    };
    Task {
        name: "synthetic".into(),
        format: Format::Text,
        kind: TaskKind::Classification,
        template: None,
        label_names: vec!["odd".into(), "even".into()],
        train: mk(48, 1),
        dev: mk(24, 2),
        test: mk(24, 3),
    }
}

pub fn train_options(
    method: Method,
    perturb: Perturb,
    steps: u64,
    save_every: u64,
    out: &Path,
) -> TrainOptions {
    TrainOptions {
        zo: ZoConfig {
            method,
            perturb,
            lr: 1e-2,
            eps: 1e-3,
            seed: 3,
            rank: 2,
            ..Default::default()
        },
        steps,
        batch_size: 4,
        eval_every: 0,
        save_every,
        eval_batch_size: 8,
        max_eval: 0,
        loss: LossKind::Classify,
        out_dir: out.to_path_buf(),
        progress: false,
    }
}

/// `train` of `task` (padding with token 0) from the model files in `src`, never
/// interrupted and reporting nothing.
pub fn train_quietly<B: zoft::zo::passes::ZoBackend + 'static>(
    model: &mut Llama<B>,
    src: &Path,
    task: &Task,
    opts: &TrainOptions,
    resume: Option<(TrainState, HashMap<String, Vec<f32>>)>,
) -> anyhow::Result<TrainSummary> {
    train(
        model,
        src,
        task,
        0,
        opts,
        resume,
        &AtomicBool::new(false),
        |_| {},
    )
}

/// A fresh directory under the system temp dir for this test process, removed when dropped
/// unless the test is failing (then it stays, and its path is printed, for a look inside).
pub struct ScratchDir(PathBuf);

impl std::ops::Deref for ScratchDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for ScratchDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept for inspection: {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A fresh scratch directory for this test process (see `ScratchDir`).
pub fn scratch_dir(name: &str) -> ScratchDir {
    let d = std::env::temp_dir().join(format!("zoft-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    ScratchDir(d)
}

/// The CUDA backend on the GPU, or on the kernel emulator where there is none, or None after
/// printing why a test is skipped (no compiled kernels, or no C++ compiler for the emulator).
#[cfg(feature = "cuda")]
pub fn cuda_or_emulator() -> Option<zoft::backend::cuda::CudaBackend> {
    use zoft::backend::cuda::{cuda_available, emulator, kernels_embedded, CudaBackend};
    if let Err(reason) = cuda_available() {
        if let Err(why) = kernels_embedded() {
            println!("skipped: no CUDA device ({reason}) and {why}");
            return None;
        }
        if !emulator::install() {
            println!("skipped: no CUDA device ({reason}) and no C++ compiler for the emulator");
            return None;
        }
        // tools/gpu-check reads this line: on a GPU machine it means the GPU went unused.
        println!("emulated: no CUDA device ({reason}); running on the kernel emulator");
    }
    Some(CudaBackend::new(0).expect("a CUDA device is present but the backend did not start"))
}

/// A micro LLaMA (1 layer, hidden 16, vocab 23), small enough for per-element checks.
pub fn micro_config() -> LlamaConfig {
    let mut c = tiny_config();
    c.hidden_size = 16;
    c.intermediate_size = 24;
    c.num_hidden_layers = 1;
    c.num_attention_heads = 2;
    c.num_key_value_heads = Some(1);
    c.vocab_size = 23;
    c
}

/// Next-token targets over `ids`, laid out as full sequences.
pub struct Batch {
    pub ids: Vec<u32>,
    pub layout: SeqLayout,
    pub targets: Vec<i32>,
}

/// 3 sequences of 6 random tokens, each predicting its next token.
pub fn batch(cfg: &LlamaConfig, seed: u64) -> Batch {
    let (b, t) = (3, 6);
    let ids = tokens(b * t, cfg.vocab_size, seed);
    let mut targets = vec![-1; b * t];
    for s in 0..b {
        for p in 0..t - 1 {
            targets[s * t + p] = ids[s * t + p + 1] as i32;
        }
    }
    Batch {
        ids,
        layout: SeqLayout::full(b, t, &[t; 3]),
        targets,
    }
}

/// Mean next-token cross-entropy of the batch, through `hook`.
pub fn loss_of(m: &Llama<CpuBackend>, bt: &Batch, hook: &mut dyn LinearHook<CpuBackend>) -> f32 {
    let lp = m
        .target_logprobs(&bt.ids, &bt.layout, &bt.targets, hook)
        .unwrap();
    mean_nll(&lp, &bt.targets)
}

/// `loss_of`'s reduction of log-probabilities (in f64, over the targets that are not -1).
pub fn mean_nll(lp: &[f32], targets: &[i32]) -> f32 {
    let n = targets.iter().filter(|&&t| t >= 0).count();
    -(lp.iter().map(|&x| x as f64).sum::<f64>() / n as f64) as f32
}

/// The tests' next-token loss (`loss_of`) with its paired form, on any backend; counts the
/// paired forwards.
pub struct NextToken<'b> {
    pub bt: &'b Batch,
    pub paired_calls: usize,
}

impl<B: Backend> Objective<B> for NextToken<'_> {
    fn loss(&mut self, m: &Llama<B>, h: &mut dyn LinearHook<B>) -> anyhow::Result<f32> {
        let bt = self.bt;
        let lp = m.target_logprobs(&bt.ids, &bt.layout, &bt.targets, h)?;
        Ok(mean_nll(&lp, &bt.targets))
    }

    fn paired_losses(
        &mut self,
        m: &Llama<B>,
        h: &mut dyn PairedHook<B>,
    ) -> Option<anyhow::Result<[f32; 2]>> {
        self.paired_calls += 1;
        let bt = self.bt;
        let lp = m.target_logprobs_paired(&bt.ids, &bt.layout, &bt.targets, h);
        Some(lp.map(|lps| lps.map(|lp| mean_nll(&lp, &bt.targets))))
    }
}

/// A step's two losses and projected gradient as bits, for bit-for-bit comparisons.
pub fn step_bits(r: &StepResult) -> [u32; 3] {
    [
        r.loss_plus.to_bits(),
        r.loss_minus.to_bits(),
        r.projected_grad.to_bits(),
    ]
}

/// The ZO hyperparameters of the fused / paired comparisons: large enough steps that a wrong
/// bit shows, half of each tensor sparse, rank 3.
pub fn paired_zo_config(method: Method, perturb: Perturb) -> ZoConfig {
    ZoConfig {
        method,
        perturb,
        lr: 2e-2,
        eps: 1e-2,
        sparsity: 0.5,
        rank: 3,
        seed: 9,
        ..Default::default()
    }
}

/// A small LLaMA (hidden 64, GQA 4 over 2 heads, 2 layers, vocabulary 300), tied or not: the
/// CUDA tests' model, whose matrices span several kernel blocks.
pub fn small_config(tied: bool) -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 300,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied
    }))
    .unwrap()
}

/// Each weight of a model on the device, as its stored bytes.
#[cfg(feature = "cuda")]
pub fn device_bytes(
    g: &zoft::backend::cuda::CudaBackend,
    m: &Llama<zoft::backend::cuda::CudaBackend>,
) -> Vec<Vec<u8>> {
    m.weights
        .tensors()
        .iter()
        .map(|t| g.weight_to_host_tensor(t).unwrap().bytes().to_vec())
        .collect()
}
