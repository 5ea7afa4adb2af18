//! Prompt templates and verbalizers for classification data (MeZO style).
//!
//! A template turns a record into a prompt string and one candidate string per class; the
//! candidate is appended to the prompt verbatim (a verbalizer word carries its own leading
//! space, e.g. `" great"`). Evaluation picks the candidate with the highest log-likelihood
//! given the prompt; training puts the loss on the gold candidate.
//!
//! Built-in templates:
//! - `sentiment`: `{text} It was` + ` terrible` / ` great` (labels 0 / 1).
//! - `review`: `Review: {text} Sentiment:` + ` negative` / ` positive`.
//! - `rte`: `{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n` + `Yes` / `No`
//!   (0 = entailment, 1 = not entailment).
//! - `cb`: as `rte` but `Yes, No, or Maybe?` + `Yes` / `No` / `Maybe`
//!   (0 = entailment, 1 = contradiction, 2 = neutral).
//! - `entailment`: `cb` when any label of the data is the third class, else `rte`.
//! - `boolq`: `{passage} {question}?` + ` No` / ` Yes` (0 = false, 1 = true).
//!
//! A custom template is written `PROMPT|WORD0|WORD1[|...]`, e.g. `Review: {text} Sentiment:|negative|positive`:
//! `{field}` is replaced by the record's field (`{{` and `}}` are literal braces) and WORDi is the
//! candidate of label i, joined to the prompt with one space unless the prompt ends in
//! whitespace or the word starts with it.
//!
//! Field values are trimmed. When a placeholder is directly followed by `?`, `.` or `!` and the
//! value already ends with that character, the value's own one is dropped (so a BoolQ question
//! that ends in `?` does not get `??`).

use super::jsonl::{kind_name, str_field, Format, JsonLine, Origin};
use anyhow::{bail, Result};
use serde_json::Value;
use std::path::Path;

/// Names accepted by [`Template::parse`] besides custom `PROMPT|WORD|WORD` strings.
pub const BUILTIN_TEMPLATES: &[&str] = &["sentiment", "review", "rte", "cb", "entailment", "boolq"];

#[derive(Clone, Debug, PartialEq)]
pub struct Template {
    /// `sentiment`, `review`, `rte`, `cb`, `boolq` or `custom`.
    pub name: String,
    /// The prompt pattern with `{field}` placeholders.
    pub prompt: String,
    /// Text appended to the prompt for label i (leading space included where wanted).
    pub verbalizer: Vec<String>,
    /// Class names, for string labels and reports.
    pub label_names: Vec<String>,
    /// Further lowercase spellings of labels accepted in the data.
    pub aliases: Vec<(String, usize)>,
}

fn aliases(list: &[(&str, usize)]) -> Vec<(String, usize)> {
    list.iter().map(|(s, i)| (s.to_string(), *i)).collect()
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

const ENTAILMENT_ALIASES: &[(&str, usize)] = &[
    ("entailment", 0),
    ("entails", 0),
    ("entailed", 0),
    ("yes", 0),
    ("not_entailment", 1),
    ("not entailment", 1),
    ("not-entailment", 1),
    ("non_entailment", 1),
    ("non-entailment", 1),
    ("contradiction", 1),
    ("no", 1),
    ("neutral", 2),
    ("maybe", 2),
];

impl Template {
    /// A built-in template by name (`entailment` resolves to `rte`; use [`resolve_template`] to
    /// pick `rte` or `cb` from the data).
    pub fn builtin(name: &str) -> Option<Template> {
        let t = match name {
            "sentiment" | "sst2" | "sst-2" => Template {
                name: "sentiment".into(),
                prompt: "{text} It was".into(),
                verbalizer: strings(&[" terrible", " great"]),
                label_names: strings(&["negative", "positive"]),
                aliases: aliases(&[
                    ("neg", 0),
                    ("rotten", 0),
                    ("bad", 0),
                    ("terrible", 0),
                    ("pos", 1),
                    ("fresh", 1),
                    ("good", 1),
                    ("great", 1),
                ]),
            },
            "review" => Template {
                name: "review".into(),
                prompt: "Review: {text} Sentiment:".into(),
                verbalizer: strings(&[" negative", " positive"]),
                label_names: strings(&["negative", "positive"]),
                aliases: aliases(&[
                    ("neg", 0),
                    ("rotten", 0),
                    ("bad", 0),
                    ("pos", 1),
                    ("fresh", 1),
                    ("good", 1),
                ]),
            },
            "rte" | "entailment" => Template {
                name: "rte".into(),
                prompt: "{premise}\nDoes this mean that \"{hypothesis}\" is true? Yes or No?\n"
                    .into(),
                verbalizer: strings(&["Yes", "No"]),
                label_names: strings(&["entailment", "not_entailment"]),
                aliases: aliases(&ENTAILMENT_ALIASES[..ENTAILMENT_ALIASES.len() - 2]),
            },
            "cb" => Template {
                name: "cb".into(),
                prompt:
                    "{premise}\nDoes this mean that \"{hypothesis}\" is true? Yes, No, or Maybe?\n"
                        .into(),
                verbalizer: strings(&["Yes", "No", "Maybe"]),
                label_names: strings(&["entailment", "contradiction", "neutral"]),
                aliases: aliases(ENTAILMENT_ALIASES),
            },
            "boolq" => Template {
                name: "boolq".into(),
                prompt: "{passage} {question}?".into(),
                verbalizer: strings(&[" No", " Yes"]),
                label_names: strings(&["false", "true"]),
                aliases: aliases(&[("no", 0), ("yes", 1)]),
            },
            _ => return None,
        };
        Some(t)
    }

    /// A built-in name or a custom `PROMPT|WORD0|WORD1[|...]` template.
    pub fn parse(spec: &str) -> Result<Template> {
        if let Some(t) = Template::builtin(spec) {
            return Ok(t);
        }
        let mut parts = spec.split('|');
        let prompt = parts.next().unwrap_or_default().to_string();
        let words: Vec<&str> = parts.collect();
        if words.len() < 2 {
            bail!(
                "unknown template {spec:?}: expected one of {BUILTIN_TEMPLATES:?} or a custom \
                 template PROMPT|WORD0|WORD1[|...] such as \"Review: {{text}} Sentiment:|negative|positive\""
            );
        }
        let fields = placeholders(&prompt)?;
        if fields.is_empty() {
            bail!("template {spec:?}: the prompt has no {{field}} placeholder such as {{text}}");
        }
        let mut verbalizer = Vec::new();
        let mut label_names = Vec::new();
        for w in &words {
            if w.trim().is_empty() {
                bail!("template {spec:?}: empty verbalizer word");
            }
            verbalizer.push(join_candidate(&prompt, w));
            label_names.push(w.trim().to_string());
        }
        Ok(Template {
            name: "custom".into(),
            prompt,
            verbalizer,
            label_names,
            aliases: Vec::new(),
        })
    }

    pub fn num_classes(&self) -> usize {
        self.verbalizer.len()
    }

    /// The fields the prompt reads.
    pub fn fields(&self) -> Vec<String> {
        placeholders(&self.prompt).unwrap_or_default()
    }

    /// The prompt for one record.
    pub fn render(&self, rec: &JsonLine, origin: &Origin) -> Result<String> {
        render_pattern(&self.prompt, |field| {
            str_field(rec, origin, field).map(str::trim)
        })
    }

    /// The class index of one record's label: an integer in range, a boolean (two classes),
    /// a string holding an integer, or a class name / alias / verbalizer word (any case).
    pub fn label(&self, rec: &JsonLine, origin: &Origin) -> Result<usize> {
        let Some(v) = rec.fields.get("label").or_else(|| rec.fields.get("answer")) else {
            bail!("{origin}: missing field \"label\"");
        };
        self.label_value(v, origin)
    }

    fn label_value(&self, v: &Value, origin: &Origin) -> Result<usize> {
        let n = self.num_classes();
        let idx = match v {
            Value::Number(num) => match num.as_i64() {
                Some(i) => i,
                None => match num.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 1e9 => f as i64,
                    _ => bail!("{origin}: label {num} is not an integer class index"),
                },
            },
            Value::Bool(b) if n == 2 => *b as i64,
            Value::String(s) => {
                let key = s.trim().to_lowercase();
                if let Ok(i) = key.parse::<i64>() {
                    i
                } else if let Some(i) = self.lookup(&key) {
                    i as i64
                } else {
                    bail!(
                        "{origin}: unknown label {s:?} for template `{}` (expected 0..{} or one of {:?})",
                        self.name,
                        n - 1,
                        self.label_names
                    );
                }
            }
            other => bail!(
                "{origin}: label must be an integer or a string, found {}",
                kind_name(other)
            ),
        };
        if idx < 0 || idx as usize >= n {
            bail!(
                "{origin}: label {idx} is out of range for template `{}` with {n} classes {:?}",
                self.name,
                self.label_names
            );
        }
        Ok(idx as usize)
    }

    fn lookup(&self, key: &str) -> Option<usize> {
        if let Some(i) = self
            .label_names
            .iter()
            .position(|l| l.to_lowercase() == key)
        {
            return Some(i);
        }
        if let Some((_, i)) = self.aliases.iter().find(|(a, _)| a == key) {
            return Some(*i);
        }
        if let Some(i) = self
            .verbalizer
            .iter()
            .position(|w| w.trim().to_lowercase() == key)
        {
            return Some(i);
        }
        match (self.num_classes(), key) {
            (2, "false") => Some(0),
            (2, "true") => Some(1),
            _ => None,
        }
    }
}

/// Picks the template for classification data: the one named by `spec`, or the default of the
/// format (`sentiment` for text, `entailment` for premise/hypothesis, `boolq` for passages).
/// `entailment` becomes `cb` when any record's label is the third class, else `rte`.
pub fn resolve_template(
    spec: Option<&str>,
    format: Format,
    files: &[(&Path, &[JsonLine])],
) -> Result<Template> {
    let spec = match spec {
        Some(s) => s,
        None => match format {
            Format::Text => "sentiment",
            Format::Entailment => "entailment",
            Format::Passage => "boolq",
            other => bail!(
                "the {} format takes no classification template",
                other.name()
            ),
        },
    };
    if spec != "entailment" {
        return Template::parse(spec);
    }
    let cb = Template::builtin("cb").expect("built-in");
    for (path, lines) in files {
        for rec in lines.iter() {
            let origin = Origin {
                file: path.to_path_buf(),
                line: rec.line,
            };
            if cb.label(rec, &origin)? == 2 {
                return Ok(cb);
            }
        }
    }
    Ok(Template::builtin("rte").expect("built-in"))
}

/// The candidate text for `word` after `prompt`: one joining space unless either side has one.
pub fn join_candidate(prompt: &str, word: &str) -> String {
    let ends_ws = prompt.chars().last().is_some_and(char::is_whitespace);
    let starts_ws = word.chars().next().is_some_and(char::is_whitespace);
    if prompt.is_empty() || ends_ws || starts_ws {
        word.to_string()
    } else {
        format!(" {word}")
    }
}

/// The `{field}` names of a pattern, in order.
pub fn placeholders(pattern: &str) -> Result<Vec<String>> {
    let mut names = Vec::new();
    render_pattern(pattern, |f| {
        names.push(f.to_string());
        Ok("")
    })?;
    Ok(names)
}

/// Substitutes `{field}` placeholders; `{{` and `}}` are literal braces.
fn render_pattern<'a, F>(pattern: &str, mut value: F) -> Result<String>
where
    F: FnMut(&str) -> Result<&'a str>,
{
    let mut out = String::with_capacity(pattern.len() + 64);
    let mut rest = pattern;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
            continue;
        }
        if tail.starts_with('}') {
            bail!("template {pattern:?}: unmatched '}}' (write '}}}}' for a literal brace)");
        }
        let Some(end) = tail.find('}') else {
            bail!("template {pattern:?}: unclosed '{{' (write '{{{{' for a literal brace)");
        };
        let name = &tail[1..end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("template {pattern:?}: bad placeholder {{{name}}}");
        }
        let mut v = value(name)?;
        rest = &tail[end + 1..];
        if let Some(p) = rest.chars().next().filter(|c| matches!(c, '?' | '.' | '!')) {
            if let Some(stripped) = v.strip_suffix(p) {
                v = stripped;
            }
        }
        out.push_str(v);
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::PathBuf;

    fn rec(v: Value) -> JsonLine {
        JsonLine {
            line: 7,
            fields: v.as_object().unwrap().clone(),
        }
    }
    fn origin() -> Origin {
        Origin {
            file: PathBuf::from("d.jsonl"),
            line: 7,
        }
    }

    #[test]
    fn sentiment_prompt_and_labels() {
        let t = Template::parse("sentiment").unwrap();
        let r = rec(json!({"text": " A fine film. ", "label": 1}));
        assert_eq!(t.render(&r, &origin()).unwrap(), "A fine film. It was");
        assert_eq!(t.label(&r, &origin()).unwrap(), 1);
        for (l, want) in [
            (json!("positive"), 1),
            (json!("NEGATIVE"), 0),
            (json!("fresh"), 1),
            (json!("0"), 0),
            (json!(true), 1),
            (json!(0.0), 0),
        ] {
            assert_eq!(t.label_value(&l, &origin()).unwrap(), want, "{l}");
        }
        let e = t
            .label_value(&json!("meh"), &origin())
            .unwrap_err()
            .to_string();
        assert!(e.contains("d.jsonl:7") && e.contains("meh"), "{e}");
        let e = t.label_value(&json!(2), &origin()).unwrap_err().to_string();
        assert!(e.contains("d.jsonl:7") && e.contains("out of range"), "{e}");
        let e = t
            .label_value(&json!(-1), &origin())
            .unwrap_err()
            .to_string();
        assert!(e.contains("out of range"), "{e}");
    }

    #[test]
    fn boolq_question_mark_and_answer_key() {
        let t = Template::parse("boolq").unwrap();
        let r =
            rec(json!({"passage": "Water is wet.", "question": "is water wet?", "answer": true}));
        assert_eq!(
            t.render(&r, &origin()).unwrap(),
            "Water is wet. is water wet?"
        );
        assert_eq!(t.label(&r, &origin()).unwrap(), 1);
        let r = rec(json!({"passage": "P", "question": "q", "label": "no"}));
        assert_eq!(t.render(&r, &origin()).unwrap(), "P q?");
        assert_eq!(t.label(&r, &origin()).unwrap(), 0);
    }

    #[test]
    fn entailment_resolves_to_rte_or_cb() {
        let two = vec![
            rec(json!({"premise": "a", "hypothesis": "b", "label": "entailment"})),
            rec(json!({"premise": "a", "hypothesis": "b", "label": "not_entailment"})),
        ];
        let p = PathBuf::from("x.jsonl");
        let t = resolve_template(None, Format::Entailment, &[(&p, &two)]).unwrap();
        assert_eq!(t.name, "rte");
        assert_eq!(t.label(&two[1], &origin()).unwrap(), 1);
        let three = vec![rec(
            json!({"premise": "a", "hypothesis": "b", "label": "neutral"}),
        )];
        let t = resolve_template(Some("entailment"), Format::Entailment, &[(&p, &three)]).unwrap();
        assert_eq!(t.name, "cb");
        assert_eq!(t.verbalizer, vec!["Yes", "No", "Maybe"]);
        assert_eq!(
            t.render(&three[0], &origin()).unwrap(),
            "a\nDoes this mean that \"b\" is true? Yes, No, or Maybe?\n"
        );
        let rte = Template::parse("rte").unwrap();
        assert!(rte.label(&three[0], &origin()).is_err());
    }

    #[test]
    fn custom_templates() {
        let t = Template::parse("Review: {text} Sentiment:|negative|positive").unwrap();
        assert_eq!(t.verbalizer, vec![" negative", " positive"]);
        assert_eq!(t.fields(), vec!["text"]);
        let r = rec(json!({"text": "ok {x}", "label": "positive"}));
        assert_eq!(
            t.render(&r, &origin()).unwrap(),
            "Review: ok {x} Sentiment:"
        );
        assert_eq!(t.label(&r, &origin()).unwrap(), 1);
        let t = Template::parse("Q: {text}\nA:\n|no|yes|{{maybe}}").unwrap();
        assert_eq!(t.verbalizer, vec!["no", "yes", "{{maybe}}"]);
        assert!(Template::parse("nonsense").is_err());
        assert!(Template::parse("no field|a|b").is_err());
        assert!(Template::parse("{text|a|b").is_err());
        let t = Template::parse("{{literal}} {text}|a|b").unwrap();
        assert_eq!(t.fields(), vec!["text"]);
        let e = t
            .render(&rec(json!({"premise": "x"})), &origin())
            .unwrap_err()
            .to_string();
        assert!(e.contains("d.jsonl:7") && e.contains("\"text\""), "{e}");
    }
}
