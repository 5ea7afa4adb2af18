//! The imported default model against golden values computed by HF transformers from the same
//! GGUF file with its own loader (tests/fixtures, written by tools/fixtures/make_golden.py):
//! tokenizer ids, chat template, whole logit vectors, a text's loss, greedy generation and a
//! right-padded batch. The model is fetched into the cache on first use.

use serde_json::Value;
use std::sync::OnceLock;
use zoft::backend::cpu::CpuBackend;
use zoft::backend::{NoHook, SeqLayout};
use zoft::model::generate::{generate, Sampling};
use zoft::model::load::load_dir;
use zoft::model::Llama;
use zoft::tokenizer::{Message, Tokenizer};

struct Golden {
    model: Llama<CpuBackend>,
    tok: Tokenizer,
    fx: Value,
    logits: Vec<f32>,
}

fn golden() -> &'static Golden {
    static G: OnceLock<Golden> = OnceLock::new();
    G.get_or_init(|| {
        let dir = match std::env::var_os("ZOFT_TEST_MODEL") {
            Some(d) => d.into(),
            None => zoft::fetch::ensure_default_model().expect("fetching the default model"),
        };
        let f = load_dir(&dir).expect("loading the default model");
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let fx: Value = serde_json::from_str(
            &std::fs::read_to_string(root.join("smollm2_golden.json")).unwrap(),
        )
        .unwrap();
        let bytes = std::fs::read(root.join("smollm2_last_logits.bin")).unwrap();
        let logits = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Golden {
            model: Llama::new(f.cfg, f.weights, CpuBackend::new()),
            tok: f.tokenizer,
            fx,
            logits,
        }
    })
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn f32s_of(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn last_logits(g: &Golden, ids: &[u32]) -> Vec<f32> {
    let n = ids.len();
    g.model
        .logits_at(ids, &SeqLayout::full(1, n, &[n]), &[n - 1], &mut NoHook)
        .unwrap()
}

/// max_i |a_i - b_i|.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn top_k(v: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..v.len() as u32).collect();
    idx.sort_by(|&a, &b| v[b as usize].total_cmp(&v[a as usize]));
    idx.truncate(k);
    idx
}

#[test]
fn issue_check_values_for_the_story_prompt() {
    let g = golden();
    let ids = g
        .tok
        .encode("Once upon a time, there was a little girl named")
        .unwrap();
    assert_eq!(
        ids,
        [6403, 1980, 253, 655, 28, 665, 436, 253, 1838, 8180, 3365]
    );
    let l = last_logits(g, &ids);
    assert_eq!(top_k(&l, 5), [20391, 15487, 8165, 21230, 14176]);
    for (id, want) in [20391usize, 15487, 8165, 21230, 14176]
        .iter()
        .zip([5.0007f32, 3.7412, 3.7062, 3.6694, 3.4863])
    {
        assert!(
            (l[*id] - want).abs() < 2e-3,
            "logit of {id}: {} vs {want}",
            l[*id]
        );
    }
}

#[test]
fn tokenizer_matches_hf_on_tricky_texts() {
    let g = golden();
    for case in g.fx["tokenizer_cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            g.tok.encode(text).unwrap(),
            ids_of(&case["ids"]),
            "case {}",
            case["name"]
        );
    }
}

#[test]
fn chat_template_matches_hf() {
    let g = golden();
    for case in g.fx["chat_template_cases"].as_array().unwrap() {
        if !case["add_generation_prompt"].as_bool().unwrap() {
            continue; // zoft renders prompts for generation
        }
        let msgs: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let text = g.tok.apply_chat_template(&msgs).unwrap();
        assert_eq!(
            text,
            case["text"].as_str().unwrap(),
            "case {}",
            case["name"]
        );
        assert_eq!(g.tok.encode(&text).unwrap(), ids_of(&case["ids"]));
    }
}

#[test]
fn whole_logit_vectors_match_hf() {
    let g = golden();
    let vocab = g.model.cfg.vocab_size;
    for p in g.fx["prompts"].as_array().unwrap() {
        let ids = ids_of(&p["ids"]);
        assert_eq!(
            g.tok.encode(p["text"].as_str().unwrap()).unwrap(),
            ids,
            "prompt {}",
            p["name"]
        );
        let ours = last_logits(g, &ids);
        let k = p["logits_index"].as_u64().unwrap() as usize;
        let want = &g.logits[k * vocab..(k + 1) * vocab];
        let max_diff = max_abs_diff(&ours, want);
        assert!(
            max_diff < 2e-3,
            "prompt {}: max |logit diff| {max_diff}",
            p["name"]
        );
        assert_eq!(
            top_k(&ours, 10),
            ids_of(&p["top10_ids"]),
            "prompt {}",
            p["name"]
        );
    }
}

#[test]
fn text_loss_matches_hf() {
    let g = golden();
    let ids = ids_of(&g.fx["loss"]["ids"]);
    let n = ids.len();
    let targets: Vec<i32> = (0..n)
        .map(|t| if t + 1 < n { ids[t + 1] as i32 } else { -1 })
        .collect();
    let lp = g
        .model
        .target_logprobs(&ids, &SeqLayout::full(1, n, &[n]), &targets, &mut NoHook)
        .unwrap();
    let nll: Vec<f32> = lp[..n - 1].iter().map(|x| -x).collect();
    let mean = nll.iter().map(|&x| x as f64).sum::<f64>() / (n - 1) as f64;
    let want = g.fx["loss"]["loss"].as_f64().unwrap();
    eprintln!("text loss {mean:.6} vs HF {want:.6}");
    assert!((mean - want).abs() < 1e-3, "loss {mean} vs {want}");
    let want_tok = f32s_of(&g.fx["loss"]["nll"]);
    let max_diff = max_abs_diff(&nll, &want_tok);
    assert!(max_diff < 2e-3, "per-token nll max diff {max_diff}");
}

#[test]
fn greedy_generation_matches_hf() {
    let g = golden();
    for case in g.fx["generation"].as_array().unwrap() {
        let prompt = ids_of(&case["prompt_ids"]);
        let n = case["max_new_tokens"].as_u64().unwrap() as usize;
        let s = Sampling {
            max_new_tokens: n,
            ..Default::default()
        };
        let out = generate(&g.model, &prompt, &s, &[], |_| {}).unwrap();
        assert_eq!(out, ids_of(&case["new_ids"]), "case {}", case["name"]);
    }
}

#[test]
fn right_padded_batch_matches_hf() {
    let g = golden();
    let b = &g.fx["batch"];
    let rows: Vec<Vec<u32>> = b["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids_of)
        .collect();
    let seq = b["seq_len"].as_u64().unwrap() as usize;
    let seqs = b["sequences"].as_array().unwrap();
    let lens: Vec<usize> = seqs
        .iter()
        .map(|s| s["length"].as_u64().unwrap() as usize)
        .collect();
    let ids: Vec<u32> = rows.concat();
    let last: Vec<usize> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| i * seq + l - 1)
        .collect();
    let logits = g
        .model
        .logits_at(
            &ids,
            &SeqLayout::full(rows.len(), seq, &lens),
            &last,
            &mut NoHook,
        )
        .unwrap();
    let vocab = g.model.cfg.vocab_size;
    for (i, s) in seqs.iter().enumerate() {
        let ours = &logits[i * vocab..(i + 1) * vocab];
        let k = s["logits_index"].as_u64().unwrap() as usize;
        let want = &g.logits[k * vocab..(k + 1) * vocab];
        let max_diff = max_abs_diff(ours, want);
        assert!(max_diff < 2e-3, "sequence {i}: max |logit diff| {max_diff}");
        assert_eq!(top_k(ours, 10), ids_of(&s["top10_ids"]));
    }
}
