//! Tokenizer: the `tokenizers` crate's BPE plus the model's chat template and special ids.

use anyhow::{bail, Context, Result};
use std::path::Path;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

/// One chat message.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` (and `tokenizer_config.json` when present) from a model directory
    /// and checks that every id fits the model's vocabulary.
    pub fn load(dir: &Path, vocab_size: usize) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("loading tokenizer {}: {e}", path.display()))?;
        let n = inner.get_vocab_size(true);
        if n > vocab_size {
            bail!(
                "{}: tokenizer has {n} tokens but the model's vocab_size is {vocab_size}",
                path.display()
            );
        }
        let mut tok = Tokenizer {
            inner,
            chat_template: None,
            bos_token: None,
            eos_token: None,
        };
        let cfg_path = dir.join("tokenizer_config.json");
        if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path)?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", cfg_path.display()))?;
            tok.chat_template = v
                .get("chat_template")
                .and_then(|t| t.as_str())
                .map(String::from);
            tok.bos_token = token_string(v.get("bos_token"));
            tok.eos_token = token_string(v.get("eos_token"));
        }
        Ok(tok)
    }

    pub fn from_inner(inner: tokenizers::Tokenizer) -> Self {
        Tokenizer {
            inner,
            chat_template: None,
            bos_token: None,
            eos_token: None,
        }
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token ids of `text` exactly as written (special tokens in the text are recognized;
    /// nothing is prepended).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing {text:?}: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("decoding {ids:?}: {e}"))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_id(t))
    }

    /// Renders the chat template (Jinja, as HF transformers does) with a generation prompt.
    pub fn apply_chat_template(&self, messages: &[Message]) -> Result<String> {
        let Some(template) = &self.chat_template else {
            bail!("this model has no chat_template in tokenizer_config.json");
        };
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib_like_methods);
        env.add_template("chat", template)
            .context("parsing the chat template")?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        env.get_template("chat")?
            .render(ctx)
            .context("rendering the chat template")
    }
}

/// Python string methods that HF chat templates use (`strip`, `startswith`, ...).
fn minijinja_contrib_like_methods(
    _state: &minijinja::State,
    value: &minijinja::Value,
    method: &str,
    args: &[minijinja::Value],
) -> std::result::Result<minijinja::Value, minijinja::Error> {
    let s = value.as_str().unwrap_or_default();
    let arg = |i: usize| {
        args.get(i)
            .and_then(|a| a.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let v = match method {
        "strip" => s.trim().into(),
        "lstrip" => s.trim_start().into(),
        "rstrip" => s.trim_end().into(),
        "startswith" => s.starts_with(&arg(0)).into(),
        "endswith" => s.ends_with(&arg(0)).into(),
        "lower" => s.to_lowercase().into(),
        "upper" => s.to_uppercase().into(),
        _ => {
            return Err(minijinja::Error::new(
                minijinja::ErrorKind::UnknownMethod,
                format!("chat template calls unknown method {method}"),
            ))
        }
    };
    Ok(v)
}
