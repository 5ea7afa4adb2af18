//! Bad model files give clear errors that name the file and tensor at fault.

mod common;
use common::*;
use std::path::Path;
use zoft::model::{DType, LlamaWeights};

fn scratch(name: &str) -> ScratchDir {
    scratch_dir(&format!("load-{name}"))
}

/// A valid tiny model directory (config.json + model.safetensors).
fn write_model(dir: &Path) {
    let cfg = tiny_config();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    LlamaWeights::random(&cfg, 1, DType::F32).save(dir).unwrap();
}

fn load_err(dir: &Path) -> String {
    let cfg = tiny_config();
    match LlamaWeights::load(dir, &cfg) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn valid_model_loads_zero_copy() {
    let dir = scratch("ok");
    write_model(&dir);
    let w = LlamaWeights::load(&dir, &tiny_config()).unwrap();
    assert!(
        w.tensors().iter().all(|t| t.is_mapped()),
        "f32 tensors of an aligned file should be mapped"
    );
}

#[test]
fn truncated_safetensors_is_reported() {
    let dir = scratch("trunc");
    write_model(&dir);
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("model.safetensors") && e.contains("truncated safetensors file"),
        "{e}"
    );
    std::fs::write(&p, &bytes[..5]).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("truncated safetensors file"), "{e}");
}

#[test]
fn header_that_lies_about_offsets_is_reported() {
    let dir = scratch("lie");
    write_model(&dir);
    let p = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&header).unwrap();
    // Claim a shape larger than the byte range of one tensor.
    v["model.norm.weight"]["shape"] = serde_json::json!([33]);
    let mut new_header = serde_json::to_string(&v).unwrap().into_bytes();
    while new_header.len() < n {
        new_header.push(b' ');
    }
    assert_eq!(new_header.len(), n, "test header must keep its length");
    bytes[8..8 + n].copy_from_slice(&new_header);
    std::fs::write(&p, &bytes).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("model.safetensors")
            && e.contains("tensor model.norm.weight")
            && e.contains("do not match"),
        "{e}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = scratch("missing");
    let cfg = tiny_config();
    let w = LlamaWeights::random(&cfg, 1, DType::F32);
    let keep: Vec<_> = w
        .tensors()
        .into_iter()
        .filter(|t| t.name != "model.layers.1.mlp.up_proj.weight")
        .collect();
    let list: Vec<(&str, &[usize], DType, &[u8])> = keep
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice(), t.dtype, t.bytes()))
        .collect();
    zoft::model::safetensors_io::save_file(&dir.join("model.safetensors"), &list, None).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("missing tensor model.layers.1.mlp.up_proj.weight"),
        "{e}"
    );
}

#[test]
fn shape_not_matching_config_is_named() {
    let dir = scratch("shape");
    write_model(&dir);
    let mut cfg = tiny_config();
    cfg.intermediate_size += 8;
    let e = match LlamaWeights::load(&dir, &cfg) {
        Ok(_) => panic!("should fail"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("model.layers.0.mlp.gate_proj.weight has shape [48, 32] but config.json implies [56, 32]"), "{e}");
}

#[test]
fn unsupported_dtype_is_named() {
    let dir = scratch("dtype");
    let cfg = tiny_config();
    let w = LlamaWeights::random(&cfg, 1, DType::F32);
    let mut views = std::collections::BTreeMap::new();
    let ints: Vec<u8> = vec![0; 32 * 4];
    for t in w.tensors() {
        let (dt, data) = if t.name == "model.norm.weight" {
            (safetensors::Dtype::I32, &ints[..])
        } else {
            (safetensors::Dtype::F32, t.bytes())
        };
        views.insert(
            t.name.clone(),
            safetensors::tensor::TensorView::new(dt, t.shape.clone(), data).unwrap(),
        );
    }
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("model.norm.weight") && e.contains("I32") && e.contains("F32, F16 and BF16"),
        "{e}"
    );
}

#[test]
fn mixed_matrix_dtypes_are_refused() {
    let dir = scratch("mixed");
    let cfg = tiny_config();
    let w = LlamaWeights::random(&cfg, 1, DType::F32);
    let w16 = LlamaWeights::random(&cfg, 1, DType::BF16);
    let list: Vec<(&str, &[usize], DType, &[u8])> = w
        .tensors()
        .iter()
        .zip(w16.tensors())
        .map(|(a, b)| {
            let t = if a.name.contains("layers.1.self_attn.v_proj") {
                b
            } else {
                *a
            };
            (t.name.as_str(), t.shape.as_slice(), t.dtype, t.bytes())
        })
        .collect();
    zoft::model::safetensors_io::save_file(&dir.join("model.safetensors"), &list, None).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("layers.1.self_attn.v_proj.weight is BF16"),
        "{e}"
    );
}

#[test]
fn tokenizer_larger_than_vocab_is_refused() {
    let dir = scratch("tok");
    // A word-level tokenizer with more tokens than the model's vocabulary.
    let vocab: serde_json::Map<String, serde_json::Value> = (0..100)
        .map(|i| (format!("w{i}"), serde_json::json!(i)))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let e = match zoft::tokenizer::Tokenizer::load(&dir, 61) {
        Ok(_) => panic!("should fail"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("tokenizer.json") && e.contains("100 tokens") && e.contains("vocab_size is 61"),
        "{e}"
    );
}

#[test]
fn missing_model_file_is_reported() {
    let dir = scratch("none");
    let e = load_err(&dir);
    assert!(
        e.contains("no model.safetensors or model.safetensors.index.json"),
        "{e}"
    );
}

#[test]
fn sharded_checkpoint_loads_like_a_single_file() {
    let dir = scratch("shards");
    let cfg = tiny_config();
    let w = LlamaWeights::random(&cfg, 1, DType::BF16);
    let ts = w.tensors();
    let (a, b) = ts.split_at(ts.len() / 2);
    let mut map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let list: Vec<(&str, &[usize], DType, &[u8])> = part
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice(), t.dtype, t.bytes()))
            .collect();
        zoft::model::safetensors_io::save_file(&dir.join(shard), &list, None).unwrap();
        for t in part {
            map.insert(t.name.clone(), serde_json::json!(shard));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let loaded = LlamaWeights::load(&dir, &cfg).unwrap();
    for (x, y) in loaded.tensors().iter().zip(w.tensors()) {
        assert_eq!(x.name, y.name);
        assert_eq!(x.bytes(), y.bytes(), "{}", x.name);
    }
}
