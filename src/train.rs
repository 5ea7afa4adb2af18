//! The trainer: zero-shot evaluation, ZO steps over sampled batches, periodic evaluation and
//! checkpoints, resume, a JSONL log, and a summary. The CLI only wraps `train`.

use crate::backend::{Backend, LinearHook, PairedHook, SeqLayout};
use crate::data::batch::{Batch, BatchOptions, Candidates, LossKind};
use crate::data::metrics::{EvalResult, Evaluator};
use crate::data::sampler::{Sampler, SamplerState};
use crate::data::{Example, Task};
use crate::model::{safetensors_io, Llama};
use crate::zo::passes::ZoBackend;
use crate::zo::{Objective, Perturb, ZoConfig, ZoOptimizer};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub zo: ZoConfig,
    pub steps: u64,
    pub batch_size: usize,
    /// Evaluate on dev every this many steps (0: only before and after training).
    pub eval_every: u64,
    /// Save a checkpoint every this many steps (0: only at the end).
    pub save_every: u64,
    pub eval_batch_size: usize,
    /// At most this many dev/test examples are evaluated (0: all).
    pub max_eval: usize,
    pub loss: LossKind,
    /// Where checkpoints (`OUT/checkpoint`) and the log (`OUT/train_log.jsonl`) go.
    pub out_dir: PathBuf,
    /// Show a progress bar.
    pub progress: bool,
}

/// What a checkpoint holds besides the weights, to continue a run exactly.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainState {
    /// Steps completed.
    pub step: u64,
    pub zo: ZoConfig,
    pub sampler: SamplerState,
    pub batch_size: usize,
    pub loss: LossKind,
    pub task: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    pub method: String,
    pub steps: u64,
    pub seconds: f64,
    pub zero_shot_dev: EvalResult,
    pub dev: EvalResult,
    pub zero_shot_test: Option<EvalResult>,
    pub test: Option<EvalResult>,
    pub checkpoint: PathBuf,
    pub stopped_early: Option<String>,
    /// The backend's accounts at the end: peaks over the whole run, evaluations included.
    pub memory: crate::backend::mem::MemReport,
}

/// The inputs a model needs for a batch: ids, layout and (row, token) requests. With
/// `packed`, padding is dropped and the sequences sit back to back (rows renumbered).
pub fn model_inputs(b: &Batch, packed: bool) -> (Vec<u32>, SeqLayout, Vec<(u32, u32)>) {
    let lens: Vec<usize> = b.lens.iter().map(|&l| l as usize).collect();
    if !packed {
        let layout = SeqLayout::full(b.batch, b.seq, &lens);
        let requests = b.requests.iter().map(|r| (r.row, r.token)).collect();
        return (b.ids.clone(), layout, requests);
    }
    let layout = SeqLayout::packed(&lens);
    let starts = layout.starts.as_ref().expect("a packed layout");
    let mut ids = Vec::with_capacity(layout.rows());
    for (i, &l) in lens.iter().enumerate() {
        ids.extend_from_slice(&b.ids[i * b.seq..i * b.seq + l]);
    }
    let requests = b
        .requests
        .iter()
        .map(|r| {
            let (seq, t) = (r.row as usize / b.seq, r.row as usize % b.seq);
            ((starts[seq] + t) as u32, r.token)
        })
        .collect();
    (ids, layout, requests)
}

/// Log-probabilities of a batch's requests (packed when the backend takes packed layouts).
pub fn batch_logprobs<B: Backend>(
    model: &Llama<B>,
    b: &Batch,
    hook: &mut dyn LinearHook<B>,
) -> Result<Vec<f32>> {
    let (ids, layout, requests) = model_inputs(b, model.backend.supports_packed());
    model.request_logprobs(&ids, &layout, &requests, hook)
}

/// The training loss of one batch: what each step minimizes, with the paired form that
/// `--perturb paired` runs.
pub struct BatchLoss<'b> {
    pub batch: &'b Batch,
    pub kind: LossKind,
}

impl<B: Backend> Objective<B> for BatchLoss<'_> {
    fn loss(&mut self, model: &Llama<B>, hook: &mut dyn LinearHook<B>) -> Result<f32> {
        let lp = batch_logprobs(model, self.batch, hook)?;
        Ok(self.batch.loss(self.kind, &lp)? as f32)
    }

    fn paired_losses(
        &mut self,
        model: &Llama<B>,
        hook: &mut dyn PairedHook<B>,
    ) -> Option<Result<[f32; 2]>> {
        let (ids, layout, requests) = model_inputs(self.batch, model.backend.supports_packed());
        let losses = model
            .request_logprobs_paired(&ids, &layout, &requests, hook)
            .and_then(|[plus, minus]| {
                let loss = |lp: &[f32]| self.batch.loss(self.kind, lp).map(|l| l as f32);
                Ok([loss(&plus)?, loss(&minus)?])
            });
        Some(losses)
    }
}

/// Evaluates `examples` (every candidate scored; the best log-likelihood wins).
#[allow(clippy::too_many_arguments)]
pub fn evaluate<B: Backend>(
    model: &Llama<B>,
    hook: &mut dyn LinearHook<B>,
    task: &Task,
    examples: &[Example],
    split: &str,
    batch_size: usize,
    pad_id: u32,
    progress: &indicatif::ProgressBar,
) -> Result<EvalResult> {
    if examples.is_empty() {
        bail!("task {}: the {split} split is empty", task.name);
    }
    let opts = BatchOptions::new(pad_id, Candidates::All);
    let mut ev = Evaluator::new(task.kind, &task.label_names);
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let b = Batch::new(&refs, &opts)?;
        let lp = batch_logprobs(model, &b, hook)?;
        ev.add(&b, &lp)?;
        progress.inc(chunk.len() as u64);
    }
    Ok(ev.finish(&task.name, split))
}

/// Evaluates a split on the model as the optimizer currently sees it (virtual updates included).
fn eval_split<B: ZoBackend + 'static>(
    model: &Llama<B>,
    opt: &ZoOptimizer<B>,
    task: &Task,
    examples: &[Example],
    split: &str,
    opts: &TrainOptions,
    pad_id: u32,
) -> Result<EvalResult> {
    let bar = indicatif::ProgressBar::hidden();
    let mut hook = opt.eval_hook(model)?;
    evaluate(
        model,
        &mut *hook,
        task,
        examples,
        split,
        opts.eval_batch_size,
        pad_id,
        &bar,
    )
}

fn capped(examples: &[Example], max: usize) -> &[Example] {
    if max == 0 || examples.len() <= max {
        examples
    } else {
        &examples[..max]
    }
}

/// Writes an HF-layout checkpoint (config, tokenizer files, model.safetensors) plus the
/// training state and optimizer state, into `dir` through a temporary directory and renames.
/// Any virtual low-rank update is folded into the weights first (in the running model too,
/// so a resumed run continues from exactly these weights).
pub fn save_checkpoint<B: ZoBackend + 'static>(
    dir: &Path,
    model_src: &Path,
    model: &mut Llama<B>,
    opt: &mut ZoOptimizer<B>,
    state: &TrainState,
) -> Result<()> {
    opt.materialize(model)?;
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let tmp = safetensors_io::tmp_path(dir);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
    ] {
        let src = model_src.join(name);
        if src.exists() && src != tmp.join(name) {
            std::fs::copy(&src, tmp.join(name))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    // The config names the dtype the weights are written in, which need not be the source's
    // (a GPU run keeps f16 weights in bf16): HF transformers loads by it with dtype="auto".
    let mut cfg = model.cfg.clone();
    cfg.torch_dtype = Some(B::weight_dtype(&model.weights.embed).hf_name().into());
    std::fs::write(tmp.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    model.backend.save_weights(&model.weights, &tmp)?;
    std::fs::write(
        tmp.join("training_state.json"),
        serde_json::to_string_pretty(state)?,
    )?;
    let opt_state = opt.method.state(&model.backend)?;
    let shapes: Vec<Vec<usize>> = opt_state.iter().map(|(_, v)| vec![v.len()]).collect();
    let list: Vec<(&str, &[usize], crate::model::DType, &[u8])> = opt_state
        .iter()
        .zip(&shapes)
        .map(|((n, v), s)| {
            (
                n.as_str(),
                s.as_slice(),
                crate::model::DType::F32,
                bytemuck::cast_slice(v),
            )
        })
        .collect();
    safetensors_io::save_file(&tmp.join("optimizer.safetensors"), &list, None)?;
    let old = dir.with_extension("old");
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        std::fs::rename(dir, &old)?;
    }
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

/// What `--perturb auto` means for a run: a resumed run keeps the mode its checkpoint was
/// trained in, so that it goes on as the uninterrupted run would whatever `Perturb::auto` picks
/// on this machine now; a new run takes `Perturb::auto`.
pub fn auto_perturb<B: ZoBackend>(
    zo: &ZoConfig,
    model: &Llama<B>,
    resumed: Option<&TrainState>,
) -> Perturb {
    match resumed {
        Some(state) => state.zo.perturb,
        None => Perturb::auto(zo, &model.backend, &model.weights),
    }
}

/// Reads a checkpoint's training state and optimizer state.
pub fn load_train_state(dir: &Path) -> Result<(TrainState, HashMap<String, Vec<f32>>)> {
    let p = dir.join("training_state.json");
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "{} is not a zoft checkpoint: reading {}",
            dir.display(),
            p.display()
        )
    })?;
    let state: TrainState =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
    let tensors = safetensors_io::load_file(&dir.join("optimizer.safetensors"))?;
    let opt = tensors
        .into_iter()
        .map(|(k, t)| (k, t.to_f32_vec()))
        .collect();
    Ok((state, opt))
}

/// One line of the JSONL log.
#[derive(Serialize)]
struct LogLine<'a> {
    step: u64,
    loss_plus: f32,
    loss_minus: f32,
    projected_grad: f32,
    lr: f32,
    seconds: f64,
    /// The backend's accounts by tag: weights, activations, scratch, optimizer moments.
    memory: &'a crate::backend::mem::MemReport,
    /// All optimizer state, including what a method keeps on the host beside the backend's.
    optimizer_bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    dev_accuracy: Option<f64>,
}

/// Runs (or, with `resume`, continues) a ZO training run of `model` on `task`. `model_src` is
/// the directory the model was loaded from (its tokenizer files go into checkpoints).
/// Setting `stop` (e.g. from a Ctrl-C handler) saves a checkpoint and returns early.
#[allow(clippy::too_many_arguments)]
pub fn train<B: ZoBackend + 'static>(
    model: &mut Llama<B>,
    model_src: &Path,
    task: &Task,
    pad_id: u32,
    opts: &TrainOptions,
    resume: Option<(TrainState, HashMap<String, Vec<f32>>)>,
    stop: &AtomicBool,
    mut report: impl FnMut(&str),
) -> Result<TrainSummary> {
    if task.train.is_empty() {
        bail!("task {}: the train split is empty", task.name);
    }
    if opts.batch_size == 0 {
        bail!("batch size must be at least 1");
    }
    let dev = if task.dev.is_empty() {
        capped(&task.train, opts.max_eval)
    } else {
        capped(&task.dev, opts.max_eval)
    };
    let mut opt = ZoOptimizer::new(opts.zo.clone(), model)?;
    let (start, mut sampler) = match resume {
        Some((state, opt_state)) => {
            opt.method.load_state(&model.backend, opt_state)?;
            (
                state.step,
                Sampler::resume(task.train.len(), opts.zo.seed, state.sampler)?,
            )
        }
        None => (0, Sampler::new(task.train.len(), opts.zo.seed)?),
    };
    let ckpt = opts.out_dir.join("checkpoint");
    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("creating {}", opts.out_dir.display()))?;
    let log_path = opts.out_dir.join("train_log.jsonl");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;

    let test = capped(&task.test, opts.max_eval);
    let zero_shot = eval_split(model, &opt, task, dev, "dev", opts, pad_id)?;
    report(&format!(
        "dev accuracy at step {start}: {}",
        fmt_acc(&zero_shot)
    ));
    let zero_shot_test = if test.is_empty() {
        None
    } else {
        let r = eval_split(model, &opt, task, test, "test", opts, pad_id)?;
        report(&format!("test accuracy at step {start}: {}", fmt_acc(&r)));
        Some(r)
    };
    let bopts = BatchOptions::new(
        pad_id,
        if opts.loss == LossKind::Classify {
            Candidates::All
        } else {
            Candidates::GoldOnly
        },
    );
    let bar = progress_bar(opts, start);
    let t0 = Instant::now();
    let mut step = start;
    let mut stopped_early = None;
    while step < opts.steps {
        if stop.load(Ordering::Relaxed) {
            stopped_early = Some(format!("interrupted at step {step}"));
            break;
        }
        let ts = Instant::now();
        let idx = sampler.next_batch(opts.batch_size);
        let b = Batch::from_indices(&task.train, &idx, &bopts)?;
        let kind = opts.loss;
        let r = opt.step_objective(model, step, &mut BatchLoss { batch: &b, kind });
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                bar.abandon();
                return Err(e.context(format!(
                    "training stopped at step {step}; the last good checkpoint (if any) is {}",
                    ckpt.display()
                )));
            }
        };
        step += 1;
        let mut dev_acc = None;
        if opts.eval_every > 0 && step % opts.eval_every == 0 && step < opts.steps {
            let r = eval_split(model, &opt, task, dev, "dev", opts, pad_id)?;
            dev_acc = r.accuracy;
            bar.println(format!("dev accuracy at step {step}: {}", fmt_acc(&r)));
        }
        let mem = model.backend.memory();
        let line = LogLine {
            step,
            loss_plus: r.loss_plus,
            loss_minus: r.loss_minus,
            projected_grad: r.projected_grad,
            lr: opts.zo.lr,
            seconds: ts.elapsed().as_secs_f64(),
            memory: &mem,
            optimizer_bytes: opt.method.state_bytes(),
            dev_accuracy: dev_acc,
        };
        writeln!(log, "{}", serde_json::to_string(&line)?)?;
        bar.set_message(format!("loss {:.4}", (r.loss_plus + r.loss_minus) / 2.0));
        bar.inc(1);
        if opts.save_every > 0 && step % opts.save_every == 0 && step < opts.steps {
            save_checkpoint(
                &ckpt,
                model_src,
                model,
                &mut opt,
                &state_of(step, opts, &sampler, task),
            )?;
        }
    }
    bar.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();
    save_checkpoint(
        &ckpt,
        model_src,
        model,
        &mut opt,
        &state_of(step, opts, &sampler, task),
    )?;
    report(&format!("checkpoint saved to {}", ckpt.display()));
    let final_dev = eval_split(model, &opt, task, dev, "dev", opts, pad_id)?;
    report(&format!(
        "dev accuracy at step {step}: {}",
        fmt_acc(&final_dev)
    ));
    let final_test = if test.is_empty() || stopped_early.is_some() {
        None
    } else {
        Some(eval_split(model, &opt, task, test, "test", opts, pad_id)?)
    };
    Ok(TrainSummary {
        method: opts.zo.method.name().into(),
        steps: step,
        seconds,
        zero_shot_dev: zero_shot,
        dev: final_dev,
        zero_shot_test,
        test: final_test,
        checkpoint: ckpt,
        stopped_early,
        memory: model.backend.memory(),
    })
}

fn state_of(step: u64, opts: &TrainOptions, sampler: &Sampler, task: &Task) -> TrainState {
    TrainState {
        step,
        zo: opts.zo.clone(),
        sampler: sampler.state(),
        batch_size: opts.batch_size,
        loss: opts.loss,
        task: task.name.clone(),
    }
}

pub fn fmt_acc(r: &EvalResult) -> String {
    match r.accuracy {
        Some(a) => format!("{:.4} ({} examples)", a, r.examples),
        None => format!("nll {:.4} ({} examples)", r.nll, r.examples),
    }
}

/// The run's peak memory and each tag's own peak (tags peak at different moments, so these
/// need not add up to the total), in MiB: "567.4 MiB (weights 540.1, activations 25.0, ...)".
pub fn fmt_peak_memory(m: &crate::backend::mem::MemReport) -> String {
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let tags: Vec<String> = m
        .peak
        .iter()
        .filter(|(_, b)| *b > 0)
        .map(|(name, b)| format!("{name} {:.1}", mib(*b)))
        .collect();
    format!("{:.1} MiB ({})", mib(m.total_peak), tags.join(", "))
}

fn progress_bar(opts: &TrainOptions, start: u64) -> indicatif::ProgressBar {
    if !opts.progress {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(opts.steps);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} step {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .unwrap(),
    );
    bar.set_position(start);
    bar
}
