//! Builds `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` from the
//! vocabulary a GGUF file carries, shaped like the tokenizer HF transformers builds from the
//! same file (its ids are the reference).
//!
//! Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`) is supported. SentencePiece vocabularies
//! (`"llama"`, LLaMA 1/2) are refused: their merges would have to be reconstructed from scores.

use super::gguf::{GgufFile, GgufValue};
use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use std::collections::HashSet;

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// The split regex of tiktoken's cl100k / LLaMA 3 vocabularies, for the `tokenizer.ggml.pre`
/// names HF transformers splits that way.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_PRE: [&str; 11] = [
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "jina-v5-nano",
    "dbrx",
    "smaug-bpe",
];
/// Names HF transformers gives a split regex zoft does not carry; building them with GPT-2's
/// split would tokenize differently, so they are refused rather than guessed.
const OTHER_SPLIT_PRE: [&str; 12] = [
    "tekken",
    "qwen2",
    "deepseek-r1-qwen",
    "kormo",
    "f2llmv2",
    "megrez",
    "qwen35",
    "gpt-4o",
    "llama4",
    "kanana2",
    "talkie",
    "minimax-m2",
];
/// Names whose split is GPT-2's own (what HF uses when it has no regex for a name).
const GPT2_PRE: [&str; 4] = ["default", "gpt2", "gpt-2", "smollm"];

/// The three tokenizer files, as JSON values.
pub struct TokenizerFiles {
    pub tokenizer: Value,
    pub tokenizer_config: Value,
    pub special_tokens_map: Value,
    pub notes: Vec<String>,
}

/// GPT-2's byte-to-character table: printable Latin-1 bytes stand for themselves, the others
/// are shifted to code points 256.. so that every byte is a visible character.
pub fn byte_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut shifted = 0u32;
    for b in 0..256u32 {
        let printable =
            (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        let c = if printable {
            b
        } else {
            shifted += 1;
            255 + shifted
        };
        table[b as usize] = char::from_u32(c).unwrap();
    }
    table
}

fn string_array<'a>(g: &'a GgufFile, key: &str) -> Result<Option<Vec<&'a str>>> {
    let Some(v) = g.get(key) else { return Ok(None) };
    let arr = v
        .as_array()
        .with_context(|| format!("metadata {key} is not an array"))?;
    arr.iter()
        .map(|s| {
            s.as_str()
                .with_context(|| format!("metadata {key} holds a non-string {s}"))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn token_id(g: &GgufFile, key: &str, n_tokens: usize) -> Result<Option<u32>> {
    let Some(v) = g.get(key) else { return Ok(None) };
    match v.as_u64() {
        Some(id) if (id as usize) < n_tokens => Ok(Some(id as u32)),
        // Some converters write -1 / u32::MAX for "none".
        Some(id) if id == u32::MAX as u64 => Ok(None),
        None if v.as_i64() == Some(-1) => Ok(None),
        _ => bail!("metadata {key} = {v} is not a token id below the vocabulary size {n_tokens}"),
    }
}

/// Builds the tokenizer files from `tokenizer.ggml.*`. `model_max_length` is the context length.
pub fn tokenizer_files(g: &GgufFile, model_max_length: usize) -> Result<TokenizerFiles> {
    let model = g.get("tokenizer.ggml.model").and_then(GgufValue::as_str);
    match model {
        Some("gpt2") => {}
        Some(m) => bail!(
            "tokenizer.ggml.model {m:?} is not supported (zoft builds tokenizer.json only for byte-level BPE, \"gpt2\"); copy tokenizer.json from the original HF model instead"
        ),
        None => bail!("the GGUF has no tokenizer.ggml.model, so no tokenizer can be built"),
    }
    let mut notes = Vec::new();
    let tokens = string_array(g, "tokenizer.ggml.tokens")?
        .context("the GGUF has no tokenizer.ggml.tokens")?;
    let merges = string_array(g, "tokenizer.ggml.merges")?
        .context("the GGUF has no tokenizer.ggml.merges")?;
    let types: Vec<i64> = match g
        .get("tokenizer.ggml.token_type")
        .and_then(GgufValue::as_array)
    {
        Some(a) => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
        None => vec![],
    };
    if !types.is_empty() && types.len() != tokens.len() {
        bail!(
            "tokenizer.ggml.token_type has {} entries but there are {} tokens",
            types.len(),
            tokens.len()
        );
    }

    // Vocabulary in the byte alphabet; a token spelled with other characters is re-spelled
    // byte by byte, as HF does.
    let alphabet = byte_alphabet();
    let in_alphabet: HashSet<char> = alphabet.iter().copied().collect();
    let spelled = |t: &str| t.chars().all(|c| in_alphabet.contains(&c));
    let mut vocab = Map::new();
    let mut respelled = 0;
    for (id, t) in tokens.iter().enumerate() {
        let key = if spelled(t) {
            t.to_string()
        } else {
            respelled += 1;
            t.bytes().map(|b| alphabet[b as usize]).collect()
        };
        vocab.insert(key, json!(id));
    }
    if respelled > 0 {
        notes.push(format!(
            "{respelled} tokens were not in the byte alphabet and were re-spelled byte by byte"
        ));
    }
    let merges: Vec<Value> = merges
        .iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok(json!([a, b])),
            None => {
                bail!("tokenizer.ggml.merges entry {m:?} is not two tokens separated by a space")
            }
        })
        .collect::<Result<_>>()?;

    // Control tokens become special added tokens (so they are matched whole and skipped on
    // decode); user-defined ones plain added tokens. A "control" token outside the byte
    // alphabet is a converter mislabel and is left as an ordinary token, as HF does.
    let added = |id: usize, special: bool| {
        json!({"id": id, "content": tokens[id], "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": special})
    };
    let control: Vec<usize> = (0..types.len())
        .filter(|&i| types[i] == TOKEN_CONTROL && spelled(tokens[i]))
        .collect();
    let user: Vec<usize> = (0..types.len())
        .filter(|&i| types[i] == TOKEN_USER_DEFINED && vocab.contains_key(tokens[i]))
        .collect();
    let mut added_tokens: Vec<Value> = control.iter().map(|&i| added(i, true)).collect();
    added_tokens.extend(user.iter().map(|&i| added(i, false)));

    let pre = g
        .get("tokenizer.ggml.pre")
        .and_then(GgufValue::as_str)
        .unwrap_or("default");
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let pre_tokenizer = if LLAMA3_PRE.contains(&pre) {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
            byte_level(false)]})
    } else if OTHER_SPLIT_PRE.contains(&pre) {
        bail!("tokenizer.ggml.pre {pre:?} needs a split regex zoft does not have; copy tokenizer.json from the original HF model instead");
    } else {
        if !GPT2_PRE.contains(&pre) {
            notes.push(format!(
                "tokenizer.ggml.pre {pre:?}: using GPT-2's byte-level split, as HF transformers does for this name"
            ));
        }
        byte_level(true)
    };

    let n = tokens.len();
    let bos = token_id(g, "tokenizer.ggml.bos_token_id", n)?;
    let eos = token_id(g, "tokenizer.ggml.eos_token_id", n)?;
    let unk = token_id(g, "tokenizer.ggml.unknown_token_id", n)?;
    let pad = token_id(g, "tokenizer.ggml.padding_token_id", n)?;
    let flag = |k: &str| g.get(k).and_then(GgufValue::as_bool).unwrap_or(false);
    let add_bos = flag("tokenizer.ggml.add_bos_token");
    let add_eos = flag("tokenizer.ggml.add_eos_token");

    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor(&tokens, add_bos.then_some(bos).flatten(), add_eos.then_some(eos).flatten()),
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    });

    let name = |id: Option<u32>| id.map(|i| Value::String(tokens[i as usize].to_string()));
    let mut special = Map::new();
    for (k, id) in [
        ("bos_token", bos),
        ("eos_token", eos),
        ("unk_token", unk),
        ("pad_token", pad),
    ] {
        if let Some(v) = name(id) {
            special.insert(k.into(), v);
        }
    }
    let mut config = special.clone();
    config.insert("add_bos_token".into(), json!(add_bos));
    config.insert("add_eos_token".into(), json!(add_eos));
    config.insert("clean_up_tokenization_spaces".into(), json!(false));
    config.insert("model_max_length".into(), json!(model_max_length));
    config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    if let Some(t) = g.get("tokenizer.chat_template").and_then(GgufValue::as_str) {
        config.insert("chat_template".into(), json!(t));
    }
    special.insert(
        "additional_special_tokens".into(),
        control.iter().map(|&i| json!(tokens[i])).collect(),
    );
    Ok(TokenizerFiles {
        tokenizer,
        tokenizer_config: Value::Object(config),
        special_tokens_map: Value::Object(special),
        notes,
    })
}

/// HF's post-processor for these tokenizers: the text as is, or with BOS (and EOS) around it
/// when the GGUF says llama.cpp adds them.
fn post_processor(tokens: &[&str], bos: Option<u32>, eos: Option<u32>) -> Value {
    let mut special = Map::new();
    let mut tok = |id: u32| {
        let t = tokens[id as usize];
        special.insert(t.into(), json!({"id": t, "ids": [id], "tokens": [t]}));
        json!({"SpecialToken": {"id": t, "type_id": 0}})
    };
    let (b, e) = (bos.map(&mut tok), eos.map(&mut tok));
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let with_type = |v: &Option<Value>, type_id: u32| {
        v.clone().map(|mut v| {
            v["SpecialToken"]["type_id"] = json!(type_id);
            v
        })
    };
    let single: Vec<Value> = [b.clone(), Some(seq("A", 0)), e.clone()]
        .into_iter()
        .flatten()
        .collect();
    let pair: Vec<Value> = [
        b.clone(),
        Some(seq("A", 0)),
        e.clone(),
        with_type(&b, 1),
        Some(seq("B", 1)),
        with_type(&e, 1),
    ]
    .into_iter()
    .flatten()
    .collect();
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let a = byte_alphabet();
        assert_eq!(a[b'A' as usize], 'A');
        assert_eq!(a[b' ' as usize], 'Ġ');
        assert_eq!(a[b'\n' as usize], 'Ċ');
        assert_eq!(a[0], 'Ā');
        let distinct: HashSet<char> = a.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }
}
