//! The zoft command line: a thin wrapper over the library.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use zoft::backend::cpu::{CpuBackend, Matmul};
use zoft::backend::{Backend, NoHook};
use zoft::data::batch::LossKind;
use zoft::model::generate::{generate, Sampling};
use zoft::model::load::{load_dir, ModelFiles};
use zoft::model::{DType, Llama, LlamaConfig, LlamaWeights};
use zoft::tokenizer::Message;
use zoft::zo::passes::ZoBackend;
use zoft::zo::{Method, Perturb, ZoConfig};

#[derive(Parser)]
#[command(
    name = "zoft",
    version,
    about = "Fine-tune LLaMA-family models in inference-level memory (zeroth-order methods)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune with a zeroth-order method. With no arguments: the default model on the default
    /// sentiment task, printing zero-shot and fine-tuned accuracy.
    Train(TrainArgs),
    /// Evaluate a model on a task (accuracy, macro-F1, log-likelihood).
    Eval(EvalArgs),
    /// Generate text from a prompt.
    Generate(GenerateArgs),
    /// Show a model's config, parameter count, dtype and weight memory.
    Info(InfoArgs),
    /// Convert a GGUF file (F32/F16/BF16/Q8_0/Q4_0/Q4_1) into an HF-layout directory.
    Import(ImportArgs),
    /// Download the default model (smollm2-135m) or data (rotten-tomatoes) into the cache.
    Fetch(zoft::fetch::FetchArgs),
    /// Write a model of a preset shape (llama-7b|13b|30b|65b|smollm2-135m or CONFIG.json) with random weights.
    Init(InitArgs),
}

#[derive(Args)]
struct ModelArg {
    /// Model directory (HF layout). Default: the default model, fetched on first use.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where to run: cpu, cuda or auto (cpu, saying whether cuda is available).
    #[arg(long, default_value = "auto")]
    device: String,
    /// GEMM precision on the CPU: f32 (the reference), bf16 (inputs rounded to bf16, f32
    /// accumulation, as on the GPU; needs AVX512-BF16), or auto (bf16 where the CPU has it).
    #[arg(long, default_value = "auto")]
    matmul: String,
}

#[derive(Args)]
struct TaskArg {
    /// Task: sst2 (= rotten-tomatoes, the default), a jsonl file, or a directory of train/dev/test jsonl.
    #[arg(long, default_value = "sst2")]
    task: String,
    /// Classification template: sentiment, entailment, cb, boolq, or a custom "PROMPT|WORD0|WORD1".
    #[arg(long)]
    template: Option<String>,
}

impl TaskArg {
    fn load(
        &self,
        tok: &zoft::tokenizer::Tokenizer,
        cfg: &LlamaConfig,
    ) -> Result<zoft::data::Task> {
        zoft::data::load_task(
            &self.task,
            self.template.as_deref(),
            tok,
            cfg.max_position_embeddings,
        )
    }
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    task: TaskArg,
    /// mezo, mezo-adam, sparse-mezo, tezo or tezo-adam. The default, sparse-mezo, learns the
    /// default task fastest per step of the SGD methods.
    #[arg(long, default_value = "sparse-mezo")]
    method: String,
    #[arg(long, default_value_t = 500)]
    steps: u64,
    /// Learning rate (default: 3e-5 for mezo and tezo, 1e-4 for sparse-mezo, 5e-4 for the Adam variants).
    #[arg(long)]
    lr: Option<f32>,
    #[arg(long, default_value_t = 1e-3)]
    eps: f32,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Sparse-MeZO: fraction of each tensor kept frozen (the largest |w|).
    #[arg(long, default_value_t = 0.8)]
    sparsity: f32,
    /// TeZO: rank of the fixed factors.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// How z is applied: inplace (weight passes), fused (on the fly in each layer), paired
    /// (fused, with both forwards run in lockstep so z is drawn once for both; the same results
    /// as fused, faster, for one layer's z of memory; CPU only, fused on the GPU), or auto:
    /// inplace when every weight is stored in f32, fused otherwise (a round trip through bf16
    /// storage drifts).
    #[arg(long, default_value = "auto")]
    perturb: String,
    /// Training loss: classify (cross-entropy over candidates) or lm (gold candidate's tokens).
    #[arg(long, default_value = "classify")]
    loss: String,
    #[arg(long, default_value_t = 50)]
    eval_every: u64,
    /// Checkpoint every this many steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    save_every: u64,
    /// Dev/test examples evaluated (0: all).
    #[arg(long, default_value_t = 200)]
    max_eval: usize,
    #[arg(long, default_value_t = 32)]
    eval_batch_size: usize,
    #[arg(long, default_value = "runs/zoft")]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue from a checkpoint directory (OUT/checkpoint).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    task: TaskArg,
    /// Split: dev or test.
    #[arg(long, default_value = "dev")]
    split: String,
    /// At most this many examples (0: all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    /// The prompt (with --chat: the user message).
    prompt: String,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InfoArgs {
    /// Model directory (default: the default model).
    model: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ImportArgs {
    input: PathBuf,
    output: PathBuf,
    /// Output dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

#[derive(Args)]
struct InitArgs {
    /// llama-7b, llama-13b, llama-30b, llama-65b, smollm2-135m or a config.json path.
    #[arg(long)]
    config: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Output directory (config.json + model.safetensors).
    #[arg(long)]
    out: PathBuf,
}

fn model_dir(arg: &Option<PathBuf>) -> Result<PathBuf> {
    match arg {
        Some(p) => Ok(p.clone()),
        None => zoft::fetch::ensure_default_model(),
    }
}

/// Where a command runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DeviceChoice {
    Cpu(Matmul),
    Cuda,
}

/// Resolves --device. `cuda` fails with the reason rather than silently falling back. `auto`
/// stays on the CPU backend, the validated one, and says whether CUDA could be asked for: the
/// CUDA backend's kernels have not yet been checked against the CPU on a GPU
/// (tests/cuda_parity.rs), so it is opt-in until they are.
fn resolve_device(m: &ModelArg) -> Result<DeviceChoice> {
    let matmul = Matmul::parse(&m.matmul)?;
    matmul.check_supported()?;
    match m.device.as_str() {
        "cpu" => Ok(DeviceChoice::Cpu(matmul)),
        "auto" => {
            match zoft::device::cuda_status() {
                Ok(()) => eprintln!(
                    "device auto: using cpu; a CUDA device is present: --device cuda uses it \
                     (that backend is not yet validated on a GPU)"
                ),
                Err(reason) => eprintln!("device auto: using cpu ({reason})"),
            }
            Ok(DeviceChoice::Cpu(matmul))
        }
        "cuda" => match zoft::device::cuda_status() {
            Err(reason) => bail!("--device cuda: {reason}"),
            Ok(()) => Ok(DeviceChoice::Cuda),
        },
        other => bail!("unknown device {other:?}: expected cpu, cuda or auto"),
    }
}

fn load_cpu(dir: &Path, matmul: Matmul) -> Result<(Llama<CpuBackend>, zoft::tokenizer::Tokenizer)> {
    let backend = CpuBackend::with_matmul(matmul)?;
    let ModelFiles {
        cfg,
        weights,
        tokenizer,
    } = load_dir(dir)?;
    Ok((Llama::new(cfg, weights, backend), tokenizer))
}

/// Loads a model onto GPU 0. Matrices keep the file's precision when it is f32 and are bf16
/// otherwise; norm gains are always f32 (see the CUDA backend's notes).
#[cfg(feature = "cuda")]
fn load_cuda(
    dir: &Path,
) -> Result<(
    Llama<zoft::backend::cuda::CudaBackend>,
    zoft::tokenizer::Tokenizer,
)> {
    let ModelFiles {
        cfg,
        weights,
        tokenizer,
    } = load_dir(dir)?;
    let backend = zoft::backend::cuda::CudaBackend::new(0)?;
    let dtype = match weights.matrix_dtype() {
        zoft::model::DType::F32 => zoft::model::DType::F32,
        _ => zoft::model::DType::BF16,
    };
    let on_device = backend.upload_weights(&weights, dtype)?;
    drop(weights);
    Ok((Llama::new(cfg, on_device, backend), tokenizer))
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> anyhow::Error {
    anyhow::anyhow!("this zoft was built without the cuda feature")
}

/// Loads the model in `dir` onto the chosen backend and calls `run(model, tokenizer, args...)`,
/// a function generic over the backend.
macro_rules! on_device {
    ($device:expr, $dir:expr, $run:ident($($arg:expr),*)) => {
        match $device {
            DeviceChoice::Cpu(matmul) => {
                let (model, tok) = load_cpu($dir, matmul)?;
                $run(model, tok, $($arg),*)
            }
            #[cfg(feature = "cuda")]
            DeviceChoice::Cuda => {
                let (model, tok) = load_cuda($dir)?;
                $run(model, tok, $($arg),*)
            }
            #[cfg(not(feature = "cuda"))]
            DeviceChoice::Cuda => Err(no_cuda()),
        }
    };
}

fn pad_id(cfg: &LlamaConfig, tok: &zoft::tokenizer::Tokenizer) -> u32 {
    cfg.pad_token_id
        .or_else(|| tok.eos_id())
        .or_else(|| cfg.eos_ids().first().copied())
        .unwrap_or(0)
}

fn default_lr(method: Method) -> f32 {
    match method {
        Method::Mezo | Method::Tezo => 3e-5,
        Method::SparseMezo => 1e-4,
        Method::MezoAdam | Method::TezoAdam => 5e-4,
    }
}

fn cmd_train(a: TrainArgs) -> Result<()> {
    let device = resolve_device(&a.model)?;
    let method = Method::parse(&a.method)?;
    let loss: LossKind = a.loss.parse()?;
    let zo = ZoConfig {
        method,
        // `auto` is resolved once the weights are loaded (train_on); until then a mode this
        // method accepts stands in, so that validate() checks the other settings.
        perturb: Perturb::parse_or_auto(&a.perturb)?
            .unwrap_or(Perturb::in_place_if_allowed(method)),
        eps: a.eps,
        lr: a.lr.unwrap_or_else(|| default_lr(method)),
        weight_decay: a.weight_decay,
        sparsity: a.sparsity,
        rank: a.rank,
        seed: a.seed,
        ..Default::default()
    };
    zo.validate()?;
    let (src, resume) = match &a.resume {
        Some(dir) => (dir.clone(), Some(zoft::train::load_train_state(dir)?)),
        None => (model_dir(&a.model.model)?, None),
    };
    if let Some((st, _)) = &resume {
        if st.zo.method != method {
            bail!(
                "checkpoint {} was trained with {}, not {}",
                src.display(),
                st.zo.method.name(),
                method.name()
            );
        }
    }
    on_device!(device, &src, train_on(&a, zo, loss, &src, resume))
}

/// The training run of `zoft train` on a loaded model, whichever backend holds it.
fn train_on<B: ZoBackend + 'static>(
    mut model: Llama<B>,
    tok: zoft::tokenizer::Tokenizer,
    a: &TrainArgs,
    zo: ZoConfig,
    loss: LossKind,
    src: &Path,
    resume: Option<(zoft::train::TrainState, HashMap<String, Vec<f32>>)>,
) -> Result<()> {
    let method = zo.method;
    let mut zo = zo;
    let auto = Perturb::parse_or_auto(&a.perturb)?.is_none();
    if auto {
        zo.perturb = zoft::train::auto_perturb(&zo, &model, resume.as_ref().map(|(st, _)| st));
    }
    let task = a.task.load(&tok, &model.cfg)?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            eprintln!("\ninterrupted: saving a checkpoint before exiting");
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        })
        .context("installing the Ctrl-C handler")?;
    }
    eprintln!(
        "training {} on {} ({} train / {} dev / {} test examples), {} steps, batch {}, lr {:e}, eps {:e}, perturb {:?}{}, on {}",
        method.name(), task.name, task.train.len(), task.dev.len(), task.test.len(), a.steps, a.batch_size, zo.lr, zo.eps, zo.perturb,
        if auto { " (auto)" } else { "" }, model.backend.name()
    );
    let opts = zoft::train::TrainOptions {
        zo,
        steps: a.steps,
        batch_size: a.batch_size,
        eval_every: a.eval_every,
        save_every: a.save_every,
        eval_batch_size: a.eval_batch_size,
        max_eval: a.max_eval,
        loss,
        out_dir: a.out.clone(),
        progress: !a.json,
    };
    let pad = pad_id(&model.cfg, &tok);
    let s = zoft::train::train(&mut model, src, &task, pad, &opts, resume, &stop, |m| {
        eprintln!("{m}")
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        let mut rows = vec![
            vec![
                "dev (before)".to_string(),
                zoft::train::fmt_acc(&s.zero_shot_dev),
            ],
            vec![
                format!("dev (after {} steps)", s.steps),
                zoft::train::fmt_acc(&s.dev),
            ],
        ];
        if let Some(t) = &s.zero_shot_test {
            rows.push(vec!["test (before)".into(), zoft::train::fmt_acc(t)]);
        }
        if let Some(t) = &s.test {
            rows.push(vec![
                format!("test (after {} steps)", s.steps),
                zoft::train::fmt_acc(t),
            ]);
        }
        rows.push(vec![
            "time".into(),
            format!(
                "{:.1} s ({:.2} s/step)",
                s.seconds,
                s.seconds / s.steps.max(1) as f64
            ),
        ]);
        rows.push(vec![
            "peak memory".into(),
            zoft::train::fmt_peak_memory(&s.memory),
        ]);
        rows.push(vec![
            "checkpoint".into(),
            s.checkpoint.display().to_string(),
        ]);
        println!(
            "{}",
            zoft::data::metrics::format_table(&[s.method.as_str(), "result"], &rows)
        );
    }
    if let Some(why) = s.stopped_early {
        eprintln!("stopped early: {why}");
    }
    Ok(())
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    let device = resolve_device(&a.model)?;
    let dir = model_dir(&a.model.model)?;
    on_device!(device, &dir, eval_on(&a))
}

fn eval_on<B: Backend>(
    model: Llama<B>,
    tok: zoft::tokenizer::Tokenizer,
    a: &EvalArgs,
) -> Result<()> {
    let task = a.task.load(&tok, &model.cfg)?;
    let Some(examples) = task.split(&a.split) else {
        bail!("unknown split {:?}: expected train, dev or test", a.split);
    };
    let examples = if a.limit > 0 && examples.len() > a.limit {
        &examples[..a.limit]
    } else {
        examples
    };
    let bar = if a.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(examples.len() as u64).with_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} evaluating {pos}/{len} [{elapsed_precise} < {eta_precise}]",
            )
            .unwrap(),
        )
    };
    let r = zoft::train::evaluate(
        &model,
        &mut NoHook,
        &task,
        examples,
        &a.split,
        a.batch_size,
        pad_id(&model.cfg, &tok),
        &bar,
    )?;
    bar.finish_and_clear();
    if a.json {
        println!("{}", r.to_json());
    } else {
        println!("{}", r.table());
    }
    Ok(())
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let device = resolve_device(&a.model)?;
    let dir = model_dir(&a.model.model)?;
    on_device!(device, &dir, generate_on(&a))
}

fn generate_on<B: Backend>(
    model: Llama<B>,
    tok: zoft::tokenizer::Tokenizer,
    a: &GenerateArgs,
) -> Result<()> {
    let text = if a.chat {
        let mut msgs = vec![];
        if let Some(s) = &a.system {
            msgs.push(Message {
                role: "system".into(),
                content: s.clone(),
            });
        }
        msgs.push(Message {
            role: "user".into(),
            content: a.prompt.clone(),
        });
        tok.apply_chat_template(&msgs)?
    } else {
        a.prompt.clone()
    };
    let ids = tok.encode(&text)?;
    let mut stop: Vec<u32> = model.cfg.eos_ids();
    stop.extend(tok.eos_id());
    let s = Sampling {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        max_new_tokens: a.max_new_tokens,
    };
    let mut printed = String::new();
    let mut all = vec![];
    let out = generate(&model, &ids, &s, &stop, |t| {
        all.push(t);
        if !a.json {
            // Print the newly decoded suffix so multi-byte characters come out whole.
            if let Ok(text) = tok.decode(&all) {
                if text.len() > printed.len() && text.starts_with(&printed) {
                    print!("{}", &text[printed.len()..]);
                    let _ = std::io::stdout().flush();
                    printed = text;
                }
            }
        }
    })?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"prompt": text, "prompt_ids": ids, "ids": out, "text": tok.decode(&out)?})
        );
    } else {
        println!();
    }
    Ok(())
}

fn cmd_info(a: InfoArgs) -> Result<()> {
    let dir = model_dir(&a.model)?;
    let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
    let w = LlamaWeights::load(&dir, &cfg)?;
    let info = serde_json::json!({
        "path": dir, "config": cfg, "parameters": cfg.parameter_count(),
        "dtype": w.matrix_dtype().name(), "weight_bytes": w.byte_size(),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("model       {}", dir.display());
        println!("shape       {} layers, dim {}, ffn {}, heads {} (kv {}), head_dim {}, vocab {}, context {}",
            cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
            cfg.n_kv_heads(), cfg.head_dim(), cfg.vocab_size, cfg.max_position_embeddings);
        println!(
            "rope        theta {}{}",
            cfg.rope_theta,
            if cfg.rope_scaling.is_some() {
                " (llama3 scaling)"
            } else {
                ""
            }
        );
        println!(
            "lm head     {}",
            if cfg.tie_word_embeddings {
                "tied to the embedding"
            } else {
                "separate"
            }
        );
        println!(
            "parameters  {} ({:.1}M)",
            cfg.parameter_count(),
            cfg.parameter_count() as f64 / 1e6
        );
        println!("dtype       {}", w.matrix_dtype().name());
        println!(
            "weights     {:.1} MiB",
            w.byte_size() as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}

fn cmd_import(a: ImportArgs) -> Result<()> {
    let r = zoft::model::import_gguf(&a.input, &a.output, DType::parse(&a.dtype)?)?;
    for n in &r.notes {
        eprintln!("note: {n}");
    }
    eprintln!(
        "imported {} tensors ({} parameters) into {}",
        r.n_tensors,
        r.n_params,
        a.output.display()
    );
    Ok(())
}

fn cmd_init(a: InitArgs) -> Result<()> {
    let mut cfg = match LlamaConfig::preset(&a.config) {
        Some(c) => c,
        None => LlamaConfig::from_file(Path::new(&a.config))
            .with_context(|| format!("{:?} is neither a preset (llama-7b, llama-13b, llama-30b, llama-65b, smollm2-135m) nor a readable config.json", a.config))?,
    };
    let dtype = DType::parse(&a.dtype)?;
    std::fs::create_dir_all(&a.out)?;
    eprintln!(
        "writing random {} weights ({:.1}M parameters) to {}",
        dtype.name(),
        cfg.parameter_count() as f64 / 1e6,
        a.out.display()
    );
    let w = LlamaWeights::random(&cfg, a.seed, dtype);
    cfg.torch_dtype = Some(dtype.hf_name().into());
    std::fs::write(
        a.out.join("config.json"),
        serde_json::to_string_pretty(&cfg)?,
    )?;
    w.save(&a.out)
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Train(a) => cmd_train(a),
        Command::Eval(a) => cmd_eval(a),
        Command::Generate(a) => cmd_generate(a),
        Command::Info(a) => cmd_info(a),
        Command::Import(a) => cmd_import(a),
        Command::Fetch(a) => zoft::fetch::run(&a),
        Command::Init(a) => cmd_init(a),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
