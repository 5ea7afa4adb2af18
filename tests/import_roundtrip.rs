//! A tiny synthetic GGUF (2 layers, Q8_0/Q4_0/Q4_1/F16/BF16/F32 tensors, a GPT-2 style BPE
//! vocabulary) imported into an HF directory: values, config, q/k unpermutation, tokenizer.

#[path = "gguf_common/mod.rs"]
mod common;

use common::*;
use zoft::model::safetensors_io::load_file;
use zoft::model::{import_gguf, DType, LlamaConfig, LlamaWeights};
use zoft::tokenizer::{Message, Tokenizer};

/// HF row r of a q/k matrix is stored by llama.cpp at row (h, 2i + j) where
/// r = (h, j * head_dim / 2 + i).
fn hf_rows_from_stored(stored: &[f32], n_head: usize, row_len: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; stored.len()];
    let half = HEAD_DIM / 2;
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = h * HEAD_DIM + 2 * i + j;
                let dst = h * HEAD_DIM + j * half + i;
                out[dst * row_len..(dst + 1) * row_len]
                    .copy_from_slice(&stored[src * row_len..(src + 1) * row_len]);
            }
        }
    }
    out
}

fn hf_name(gguf: &str) -> String {
    let map = [
        ("attn_norm", "input_layernorm"),
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_norm", "post_attention_layernorm"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
    ];
    match gguf {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        _ => {
            let parts: Vec<&str> = gguf.split('.').collect();
            let hf = map.iter().find(|(g, _)| *g == parts[2]).unwrap().1;
            format!("model.layers.{}.{hf}.weight", parts[1])
        }
    }
}

#[test]
fn tiny_model_round_trip_f32() {
    let dir = scratch("roundtrip-f32");
    let (w, expected) = tiny_model(true);
    let file = dir.join("tiny.gguf");
    std::fs::write(&file, w.to_bytes()).unwrap();
    let out = dir.join("hf");
    let report = import_gguf(&file, &out, DType::F32).unwrap();

    assert_eq!(report.n_tensors, 1 + 9 * LAYERS + 1 + 1);
    assert_eq!(
        report.n_params,
        expected.iter().map(|e| e.2.len()).sum::<usize>()
    );
    assert!(report.tokenizer_written, "{:?}", report.notes);
    for t in ["Q8_0", "Q4_0", "Q4_1", "F16", "BF16", "F32"] {
        assert!(
            report.source_types.contains_key(t),
            "{:?}",
            report.source_types
        );
    }

    // config.json as written, read back through zoft's own loader.
    let cfg = LlamaConfig::from_file(&out.join("config.json")).unwrap();
    assert_eq!(cfg, report.config);
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers
        ),
        (DIM, FFN, LAYERS)
    );
    assert_eq!(
        (cfg.num_attention_heads, cfg.n_kv_heads(), cfg.head_dim()),
        (HEADS, KV_HEADS, HEAD_DIM)
    );
    assert_eq!((cfg.vocab_size, cfg.max_position_embeddings), (20, 256));
    assert_eq!((cfg.rope_theta, cfg.rms_norm_eps), (100000.0, 1e-5));
    assert_eq!(
        (cfg.bos_token_id, cfg.eos_ids(), cfg.pad_token_id),
        (Some(1), vec![2], Some(2))
    );
    assert!(!cfg.tie_word_embeddings);
    assert!(cfg.rope_scaling.is_none());
    assert_eq!(cfg.torch_dtype.as_deref(), Some("float32"));

    // Every tensor equals the block formula's values; q and k come out unpermuted.
    let tensors = load_file(&out.join("model.safetensors")).unwrap();
    assert_eq!(tensors.len(), expected.len());
    for (name, shape, vals) in &expected {
        let t = &tensors[&hf_name(name)];
        assert_eq!(&t.shape, shape, "{name}");
        assert_eq!(t.dtype, DType::F32);
        let want = if name.contains("attn_q") {
            hf_rows_from_stored(vals, HEADS, DIM)
        } else if name.contains("attn_k") {
            hf_rows_from_stored(vals, KV_HEADS, DIM)
        } else {
            vals.clone()
        };
        let got = t.to_f32_vec();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{name}[{i}]: {g} vs {w}"
            );
        }
        if name.contains("attn_q") || name.contains("attn_k") {
            assert_ne!(
                &got, vals,
                "{name} must not be left in llama.cpp's row order"
            );
        }
    }
    // Row 1 of an HF q head is stored at row 2 (i = 1, j = 0); row head_dim/2 at row 1.
    let (_, _, q0) = expected
        .iter()
        .find(|e| e.0 == "blk.0.attn_q.weight")
        .unwrap();
    let q_hf = tensors["model.layers.0.self_attn.q_proj.weight"].to_f32_vec();
    assert_eq!(q_hf[DIM..2 * DIM], q0[2 * DIM..3 * DIM]);
    assert_eq!(
        q_hf[(HEAD_DIM / 2) * DIM..(HEAD_DIM / 2 + 1) * DIM],
        q0[DIM..2 * DIM]
    );

    // The directory loads as a model.
    let weights = LlamaWeights::load(&out, &cfg).unwrap();
    assert!(weights.lm_head.is_some());

    // Tokenizer: BPE merges, special tokens matched whole, nothing prepended, chat template.
    let tok = Tokenizer::load(&out, cfg.vocab_size).unwrap();
    assert_eq!(tok.encode("hello world").unwrap(), vec![14, 19]);
    assert_eq!(
        tok.encode("<|im_start|>hello<|im_end|>").unwrap(),
        vec![1, 14, 2]
    );
    assert_eq!(tok.decode(&[1, 14, 19, 2]).unwrap(), "hello world");
    assert_eq!(tok.eos_id(), Some(2));
    let chat = tok
        .apply_chat_template(&[Message {
            role: "user".into(),
            content: "hello".into(),
        }])
        .unwrap();
    assert_eq!(
        chat,
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    );
    for f in [
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn tiny_model_round_trip_bf16_tied() {
    let dir = scratch("roundtrip-bf16");
    let (w, expected) = tiny_model(false);
    let file = dir.join("tiny.gguf");
    std::fs::write(&file, w.to_bytes()).unwrap();
    let out = dir.join("hf");
    let report = import_gguf(&file, &out, DType::BF16).unwrap();
    assert!(report.config.tie_word_embeddings);
    assert_eq!(report.config.torch_dtype.as_deref(), Some("bfloat16"));
    let tensors = load_file(&out.join("model.safetensors")).unwrap();
    assert!(!tensors.contains_key("lm_head.weight"));
    let (_, _, vals) = expected
        .iter()
        .find(|e| e.0 == "blk.1.ffn_down.weight")
        .unwrap();
    let t = &tensors["model.layers.1.mlp.down_proj.weight"];
    assert_eq!(t.dtype, DType::BF16);
    let want: Vec<f32> = vals
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect();
    assert_eq!(t.to_f32_vec(), want);
    let cfg = LlamaConfig::from_file(&out.join("config.json")).unwrap();
    LlamaWeights::load(&out, &cfg).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn empty_existing_output_directory_is_used() {
    let dir = scratch("roundtrip-emptyout");
    let (w, _) = tiny_model(false);
    let file = dir.join("tiny.gguf");
    std::fs::write(&file, w.to_bytes()).unwrap();
    let out = dir.join("hf");
    std::fs::create_dir(&out).unwrap();
    import_gguf(&file, &out, DType::F32).unwrap();
    assert!(out.join("model.safetensors").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn metadata_is_readable_without_import() {
    let dir = scratch("roundtrip-meta");
    let (w, _) = tiny_model(false);
    let file = dir.join("tiny.gguf");
    std::fs::write(&file, w.to_bytes()).unwrap();
    let g = zoft::model::gguf::read_gguf_metadata(&file).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.alignment, 32);
    assert_eq!(g.get("general.name").unwrap().as_str(), Some("tiny"));
    assert_eq!(
        g.tensor("blk.1.attn_k.weight").unwrap().shape(),
        vec![KV_HEADS * HEAD_DIM, DIM]
    );
    assert_eq!(g.tensor("token_embd.weight").unwrap().type_name(), "Q8_0");
    let (cfg, _) = zoft::model::import::config_from_gguf(&g, DType::BF16).unwrap();
    assert_eq!(cfg.num_hidden_layers, LAYERS);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn sentencepiece_vocabulary_imports_weights_without_tokenizer() {
    let dir = scratch("roundtrip-spm");
    let (mut w, _) = tiny_model(false);
    for kv in w.kvs.iter_mut() {
        if kv.0 == "tokenizer.ggml.model" {
            kv.1 = Val::Str("llama".into());
        }
    }
    let file = dir.join("tiny.gguf");
    std::fs::write(&file, w.to_bytes()).unwrap();
    let out = dir.join("hf");
    let report = import_gguf(&file, &out, DType::F32).unwrap();
    assert!(!report.tokenizer_written);
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("tokenizer.ggml.model \"llama\" is not supported")),
        "{:?}",
        report.notes
    );
    assert!(out.join("model.safetensors").exists() && !out.join("tokenizer.json").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn llama3_pre_tokenizer_loads_and_splits() {
    let dir = scratch("roundtrip-llama3pre");
    let (mut w, _) = tiny_model(false);
    for kv in w.kvs.iter_mut() {
        if kv.0 == "tokenizer.ggml.pre" {
            kv.1 = Val::Str("llama-bpe".into());
        }
    }
    let file = dir.join("tiny.gguf");
    std::fs::write(&file, w.to_bytes()).unwrap();
    let out = dir.join("hf");
    import_gguf(&file, &out, DType::F32).unwrap();
    let tok = Tokenizer::load(&out, 20).unwrap();
    assert_eq!(tok.encode("hello world").unwrap(), vec![14, 19]);
    assert_eq!(tok.encode("<|im_start|>hello").unwrap(), vec![1, 14]);
    std::fs::remove_dir_all(dir).unwrap();
}
