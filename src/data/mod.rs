//! Tasks, prompt templates, batching and metrics.
//!
//! A task is a set of tokenized [`Example`]s: a prompt and one or more candidate continuations,
//! one of them gold. Classification data becomes a prompt plus one candidate per class through a
//! [`Template`]; prompt/completion data is a prompt with its one completion; multiple-choice data
//! is a question with its choices. [`batch`] packs examples into backend-independent batches of
//! token ids plus the (position, token) log-probabilities a model must return, and turns those
//! log-probabilities into losses and predictions; [`metrics`] scores predictions.
//!
//! Data files are jsonl; the format is recognized from the first line's keys (see [`Format`]).
//! Every error names the file and line at fault.

pub mod batch;
pub mod jsonl;
pub mod metrics;
pub mod rotten;
pub mod sampler;
pub mod template;

pub use batch::{Batch, BatchOptions, CandidateSpan, Candidates, ExampleSpans, PadTo, Request};
pub use jsonl::{detect_format, read_jsonl, Format, JsonLine, Origin};
pub use metrics::{EvalResult, Evaluator};
pub use sampler::{Sampler, SamplerState};
pub use template::{resolve_template, Template};

use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Task names that mean the default data set (Rotten Tomatoes sentences, SST-2's source).
pub const DEFAULT_TASK_NAMES: &[&str] = &["sst2", "sentiment", "rotten-tomatoes"];

/// One tokenized example.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// Where it came from (`file:line`).
    pub origin: Origin,
    /// Tokens every candidate is conditioned on (never empty).
    pub prompt: Vec<u32>,
    /// Tokens of each candidate continuation (each non-empty). Classification: one per class,
    /// in label order. Completion: exactly one. Multiple choice: one per choice.
    pub candidates: Vec<Vec<u32>>,
    /// Index of the correct candidate.
    pub gold: usize,
}

impl Example {
    /// Whether every candidate is a single token, so that one sequence (the prompt) scores them all.
    pub fn single_token(&self) -> bool {
        self.candidates.iter().all(|c| c.len() == 1)
    }

    /// Tokens of the prompt plus the longest candidate.
    pub fn max_len(&self) -> usize {
        self.prompt.len() + self.candidates.iter().map(Vec::len).max().unwrap_or(0)
    }
}

/// What the examples of a task are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// Candidates are the classes; accuracy and macro-F1 apply.
    Classification,
    /// Candidates are per-example choices; accuracy applies.
    MultipleChoice,
    /// One candidate (the completion); only its log-likelihood means something.
    Completion,
}

impl From<Format> for TaskKind {
    fn from(f: Format) -> TaskKind {
        match f {
            Format::Completion => TaskKind::Completion,
            Format::MultipleChoice => TaskKind::MultipleChoice,
            _ => TaskKind::Classification,
        }
    }
}

/// What to do with an example longer than the context.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Overflow {
    /// Fail, naming the file line and the lengths (the default).
    #[default]
    Error,
    /// Drop prompt tokens from the left until it fits.
    TruncatePromptLeft,
}

#[derive(Clone, Debug)]
pub struct TaskOptions {
    /// Longest sequence (prompt + longest candidate) in tokens: the model's context or less.
    pub max_len: usize,
    pub overflow: Overflow,
}

/// A loaded task: tokenized splits plus what is needed to report on them.
#[derive(Clone, Debug)]
pub struct Task {
    pub name: String,
    pub format: Format,
    pub kind: TaskKind,
    /// The classification template, when the format has one.
    pub template: Option<Template>,
    /// Class names (classification), else empty.
    pub label_names: Vec<String>,
    /// A single data file loads into `train`; a directory loads `train.jsonl`,
    /// `dev.jsonl` (or `validation.jsonl`) and `test.jsonl`, whichever exist.
    pub train: Vec<Example>,
    pub dev: Vec<Example>,
    pub test: Vec<Example>,
}

impl Task {
    /// A split by name (`train`, `dev`/`validation`, `test`).
    pub fn split(&self, name: &str) -> Option<&[Example]> {
        match name {
            "train" => Some(&self.train),
            "dev" | "validation" | "val" => Some(&self.dev),
            "test" => Some(&self.test),
            _ => None,
        }
    }
}

/// Loads a task: one of [`DEFAULT_TASK_NAMES`] (fetched into the cache on first use), a
/// directory of split files, or one jsonl file. `template` selects the classification template
/// (a built-in name or a custom `PROMPT|WORD0|WORD1`); `max_len` is the longest allowed
/// sequence (longer examples are an error).
pub fn load_task(
    name_or_path: &str,
    template: Option<&str>,
    tokenizer: &Tokenizer,
    max_len: usize,
) -> Result<Task> {
    let opts = TaskOptions {
        max_len,
        overflow: Overflow::Error,
    };
    load_task_with(name_or_path, template, tokenizer, &opts)
}

/// [`load_task`] with all options.
pub fn load_task_with(
    name_or_path: &str,
    template: Option<&str>,
    tokenizer: &Tokenizer,
    opts: &TaskOptions,
) -> Result<Task> {
    let path = Path::new(name_or_path);
    if DEFAULT_TASK_NAMES.contains(&name_or_path) && !path.exists() {
        let dir = crate::fetch::ensure_default_data()?;
        let mut task = load_dir(&dir, template.or(Some("sentiment")), tokenizer, opts)?;
        task.name = "rotten-tomatoes".into();
        return Ok(task);
    }
    if path.is_dir() {
        load_dir(path, template, tokenizer, opts)
    } else if path.is_file() {
        let files = vec![(Split::Train, path.to_path_buf())];
        load_files(&files, stem(path), template, tokenizer, opts)
    } else {
        bail!(
            "no task named {name_or_path:?} and no such file or directory \
             (known tasks: {DEFAULT_TASK_NAMES:?}; or give a jsonl file or a directory with train.jsonl/dev.jsonl/test.jsonl)"
        )
    }
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Split {
    Train,
    Dev,
    Test,
}

fn load_dir(
    dir: &Path,
    template: Option<&str>,
    tokenizer: &Tokenizer,
    opts: &TaskOptions,
) -> Result<Task> {
    let mut files = Vec::new();
    for (split, names) in [
        (Split::Train, &["train.jsonl"][..]),
        (
            Split::Dev,
            &["dev.jsonl", "validation.jsonl", "val.jsonl"][..],
        ),
        (Split::Test, &["test.jsonl"][..]),
    ] {
        if let Some(p) = names.iter().map(|n| dir.join(n)).find(|p| p.is_file()) {
            files.push((split, p));
        }
    }
    if files.is_empty() {
        bail!(
            "{}: no train.jsonl, dev.jsonl or test.jsonl in this directory",
            dir.display()
        );
    }
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    load_files(&files, name, template, tokenizer, opts)
}

fn load_files(
    files: &[(Split, PathBuf)],
    name: String,
    template: Option<&str>,
    tokenizer: &Tokenizer,
    opts: &TaskOptions,
) -> Result<Task> {
    let mut raw = Vec::new();
    let mut format = None;
    for (split, path) in files {
        let lines = read_jsonl(path)?;
        let f = detect_format(path, &lines[0])?;
        match format {
            None => format = Some(f),
            Some(prev) if prev != f => bail!(
                "{}:{}: {} records, but the other split files hold {} records",
                path.display(),
                lines[0].line,
                f.name(),
                prev.name()
            ),
            Some(_) => {}
        }
        raw.push((*split, path.clone(), lines));
    }
    let format = format.expect("at least one file");
    let template = if format.is_classification() {
        let refs: Vec<(&Path, &[JsonLine])> = raw
            .iter()
            .map(|(_, p, l)| (p.as_path(), l.as_slice()))
            .collect();
        Some(resolve_template(template, format, &refs)?)
    } else {
        if let Some(t) = template {
            bail!(
                "{}: template {t:?} given, but templates apply to classification data and this file holds {} records",
                raw[0].1.display(),
                format.name()
            );
        }
        None
    };
    let mut task = Task {
        name,
        format,
        kind: format.into(),
        label_names: template
            .as_ref()
            .map(|t| t.label_names.clone())
            .unwrap_or_default(),
        template,
        train: Vec::new(),
        dev: Vec::new(),
        test: Vec::new(),
    };
    for (split, path, lines) in &raw {
        let examples =
            build_examples(path, lines, format, task.template.as_ref(), tokenizer, opts)?;
        match split {
            Split::Train => task.train = examples,
            Split::Dev => task.dev = examples,
            Split::Test => task.test = examples,
        }
    }
    Ok(task)
}

/// Turns the records of one file into tokenized examples.
pub fn build_examples(
    path: &Path,
    lines: &[JsonLine],
    format: Format,
    template: Option<&Template>,
    tokenizer: &Tokenizer,
    opts: &TaskOptions,
) -> Result<Vec<Example>> {
    let mut out = Vec::with_capacity(lines.len());
    for rec in lines {
        let origin = Origin {
            file: path.to_path_buf(),
            line: rec.line,
        };
        let (prompt, candidates, gold) = match format {
            Format::Text | Format::Entailment | Format::Passage => {
                let Some(t) = template else {
                    bail!("{origin}: classification data needs a template");
                };
                (
                    t.render(rec, &origin)?,
                    t.verbalizer.clone(),
                    t.label(rec, &origin)?,
                )
            }
            Format::Completion => {
                let p = jsonl::str_field(rec, &origin, "prompt")?;
                let c = jsonl::str_field(rec, &origin, "completion")?;
                if c.is_empty() {
                    bail!("{origin}: empty completion");
                }
                (p.to_string(), vec![c.to_string()], 0)
            }
            Format::MultipleChoice => multiple_choice(rec, &origin)?,
        };
        out.push(tokenize_example(
            tokenizer,
            &prompt,
            &candidates,
            gold,
            origin,
            opts,
        )?);
    }
    Ok(out)
}

fn multiple_choice(rec: &JsonLine, origin: &Origin) -> Result<(String, Vec<String>, usize)> {
    let question = jsonl::str_field(rec, origin, "question")?
        .trim()
        .to_string();
    let choices = match rec.fields.get("choices") {
        Some(Value::Array(a)) if a.len() >= 2 => a,
        Some(Value::Array(_)) => bail!("{origin}: \"choices\" needs at least two entries"),
        Some(other) => {
            bail!(
                "{origin}: \"choices\" must be an array, found {}",
                jsonl::kind_name(other)
            )
        }
        None => bail!("{origin}: missing field \"choices\""),
    };
    let mut texts = Vec::with_capacity(choices.len());
    for (i, c) in choices.iter().enumerate() {
        let Value::String(s) = c else {
            bail!(
                "{origin}: choice {i} must be a string, found {}",
                jsonl::kind_name(c)
            );
        };
        if s.trim().is_empty() {
            bail!("{origin}: choice {i} is empty");
        }
        texts.push(s.trim().to_string());
    }
    let n = texts.len();
    let gold = match rec.fields.get("answer").or_else(|| rec.fields.get("label")) {
        Some(Value::Number(x)) => match x.as_u64() {
            Some(i) if (i as usize) < n => i as usize,
            _ => bail!("{origin}: answer {x} is not a choice index in 0..{}", n - 1),
        },
        Some(Value::String(s)) => {
            let s = s.trim();
            if let Some(i) = texts.iter().position(|t| t == s) {
                i
            } else if let Ok(i) = s.parse::<usize>() {
                if i >= n {
                    bail!("{origin}: answer {i} is not a choice index in 0..{}", n - 1);
                }
                i
            } else if s.len() == 1 && s.as_bytes()[0].is_ascii_alphabetic() {
                let i = (s.as_bytes()[0].to_ascii_uppercase() - b'A') as usize;
                if i >= n {
                    bail!("{origin}: answer {s:?} names no choice (there are {n})");
                }
                i
            } else {
                bail!("{origin}: answer {s:?} is neither a choice index, a letter nor one of the choices");
            }
        }
        Some(other) => bail!(
            "{origin}: answer must be a choice index or string, found {}",
            jsonl::kind_name(other)
        ),
        None => bail!("{origin}: missing field \"answer\""),
    };
    let candidates = texts
        .iter()
        .map(|c| template::join_candidate(&question, c))
        .collect();
    Ok((question, candidates, gold))
}

/// Tokenizes a prompt and its candidates. Each candidate's tokens are what tokenizing
/// `prompt + candidate` adds after the tokens it shares with the tokenized prompt, so a word
/// that merges with the end of the prompt is handled; the prompt kept is the part shared by all.
pub fn tokenize_example(
    tokenizer: &Tokenizer,
    prompt: &str,
    candidates: &[String],
    gold: usize,
    origin: Origin,
    opts: &TaskOptions,
) -> Result<Example> {
    let prompt_ids = tokenizer.encode(prompt)?;
    let mut fulls = Vec::with_capacity(candidates.len());
    let mut shared = prompt_ids.len();
    for c in candidates {
        let full = tokenizer.encode(&format!("{prompt}{c}"))?;
        let common = prompt_ids
            .iter()
            .zip(&full)
            .take_while(|(a, b)| a == b)
            .count();
        shared = shared.min(common);
        fulls.push(full);
    }
    if shared == 0 {
        bail!("{origin}: the prompt {prompt:?} is empty after tokenization; nothing to condition the candidates on");
    }
    let mut prompt_ids = prompt_ids[..shared].to_vec();
    let mut cands = Vec::with_capacity(fulls.len());
    for (full, text) in fulls.into_iter().zip(candidates) {
        if full.len() <= shared {
            bail!("{origin}: candidate {text:?} adds no tokens to the prompt");
        }
        cands.push(full[shared..].to_vec());
    }
    let longest = cands.iter().map(Vec::len).max().unwrap_or(0);
    let total = prompt_ids.len() + longest;
    if total > opts.max_len {
        match opts.overflow {
            Overflow::Error => bail!(
                "{origin}: the example is {total} tokens (prompt {} + longest candidate {longest}) \
                 but at most {} fit in the context; shorten it or truncate prompts from the left",
                prompt_ids.len(),
                opts.max_len
            ),
            Overflow::TruncatePromptLeft => {
                if longest >= opts.max_len {
                    bail!(
                        "{origin}: a candidate is {longest} tokens, which leaves no room for the prompt \
                         in a context of {} tokens",
                        opts.max_len
                    );
                }
                let drop = total - opts.max_len;
                prompt_ids.drain(..drop);
            }
        }
    }
    Ok(Example {
        origin,
        prompt: prompt_ids,
        candidates: cands,
        gold,
    })
}
