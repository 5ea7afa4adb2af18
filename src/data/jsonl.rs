//! Reading jsonl data files (one JSON object a line) and recognizing their format.
//!
//! Every error names the file, and the line when one is at fault.

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::fmt;
use std::path::{Path, PathBuf};

/// One non-blank line of a jsonl file, parsed.
#[derive(Clone, Debug)]
pub struct JsonLine {
    /// 1-based line number in the file.
    pub line: usize,
    pub fields: Map<String, Value>,
}

/// Where an example came from: `file:line`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// Reads a jsonl file. Blank lines are skipped; a line that is not a JSON object is an error
/// naming `file:line`; a file with no objects at all is an error naming the file.
pub fn read_jsonl(path: &Path) -> Result<Vec<JsonLine>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading data file {}", path.display()))?;
    parse_jsonl(&text, path)
}

/// Parses jsonl text; `path` is only used in error messages.
pub fn parse_jsonl(text: &str, path: &Path) -> Result<Vec<JsonLine>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let s = raw.trim();
        if s.is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(s)
            .map_err(|e| anyhow::anyhow!("{}:{line}: invalid JSON: {e}", path.display()))?;
        match value {
            Value::Object(fields) => out.push(JsonLine { line, fields }),
            other => bail!(
                "{}:{line}: expected a JSON object, found {}",
                path.display(),
                kind_name(&other)
            ),
        }
    }
    if out.is_empty() {
        bail!(
            "{}: the data file has no examples (it is empty)",
            path.display()
        );
    }
    Ok(out)
}

pub(crate) fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The record layouts zoft understands, recognized from the keys of the first line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// `{"text", "label"}`: single-text classification.
    Text,
    /// `{"premise", "hypothesis", "label"}`: two-text classification (RTE, CB, MNLI ...).
    Entailment,
    /// `{"passage", "question", "label" | "answer"}`: yes/no questions about a passage (BoolQ).
    Passage,
    /// `{"prompt", "completion"}`: the loss is on the completion tokens only.
    Completion,
    /// `{"question", "choices": [...], "answer": index}`: multiple choice.
    MultipleChoice,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Entailment => "entailment",
            Format::Passage => "passage",
            Format::Completion => "completion",
            Format::MultipleChoice => "multiple-choice",
        }
    }

    /// Whether a prompt template with verbalizer words applies (classification formats).
    pub fn is_classification(self) -> bool {
        matches!(self, Format::Text | Format::Entailment | Format::Passage)
    }
}

/// Recognizes the format from one line's keys.
pub fn detect_format(path: &Path, first: &JsonLine) -> Result<Format> {
    let has = |k: &str| first.fields.contains_key(k);
    let format = if has("prompt") && has("completion") {
        Format::Completion
    } else if has("choices") {
        Format::MultipleChoice
    } else if has("premise") && has("hypothesis") {
        Format::Entailment
    } else if has("passage") && has("question") {
        Format::Passage
    } else if has("text") {
        Format::Text
    } else {
        let keys: Vec<&str> = first.fields.keys().map(String::as_str).collect();
        bail!(
            "{}:{}: unrecognized record with keys {keys:?}; expected one of \
             {{text, label}}, {{premise, hypothesis, label}}, {{passage, question, label}}, \
             {{prompt, completion}}, {{question, choices, answer}}",
            path.display(),
            first.line
        );
    };
    Ok(format)
}

/// A string field of a record, or an error naming the line.
pub(crate) fn str_field<'a>(rec: &'a JsonLine, origin: &Origin, key: &str) -> Result<&'a str> {
    match rec.fields.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => bail!(
            "{origin}: field \"{key}\" must be a string, found {}",
            kind_name(other)
        ),
        None => bail!("{origin}: missing field \"{key}\""),
    }
}
