//! Bad GGUF input must fail with a message naming the file and the problem, and must leave
//! no output directory behind.

#[path = "gguf_common/mod.rs"]
mod common;

use common::{scratch, tiny_model, GgufWriter, Val};
use std::path::{Path, PathBuf};
use zoft::model::{import_gguf, DType};

/// Writes `bytes` as `name` in a scratch dir and imports it; returns the error text (with its
/// whole chain) and the paths involved.
fn import_err(tag: &str, bytes: &[u8]) -> (String, PathBuf, PathBuf) {
    let dir = scratch(tag);
    let file = dir.join("bad.gguf");
    std::fs::write(&file, bytes).unwrap();
    let out = dir.join("out");
    let err = import_gguf(&file, &out, DType::F32).expect_err("import of a bad file must fail");
    assert!(!out.exists(), "no output directory after a failed import");
    assert!(
        !dir.join("out.tmp-partial").exists(),
        "no partial directory after a failed import"
    );
    (format!("{err:#}"), file, dir)
}

fn assert_names_file(msg: &str, file: &Path) {
    assert!(
        msg.contains(&file.display().to_string()),
        "error does not name the file: {msg}"
    );
}

#[test]
fn unsupported_tensor_type_is_named() {
    let (mut w, _) = tiny_model(false);
    // Replace layer 0's q projection by a Q6_K tensor (256-element blocks of 210 bytes).
    w.tensors.retain(|t| t.0 != "blk.0.attn_q.weight");
    w.tensor("blk.0.attn_q.weight", &[256, 1], 14, vec![0u8; 210]);
    let (msg, file, dir) = import_err("qtype", &w.to_bytes());
    assert!(
        msg.contains("tensor blk.0.attn_q.weight has GGUF type Q6_K (14); zoft imports F32, F16, BF16, Q8_0, Q4_0, Q4_1"),
        "{msg}"
    );
    assert_names_file(&msg, &file);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn truncated_tensor_data_is_reported() {
    let (w, _) = tiny_model(false);
    let bytes = w.to_bytes();
    let (msg, file, dir) = import_err("trunc-data", &bytes[..bytes.len() - 100]);
    assert!(msg.contains("truncated file"), "{msg}");
    assert!(msg.contains("past the end of the file"), "{msg}");
    assert_names_file(&msg, &file);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn truncated_metadata_is_reported() {
    let (w, _) = tiny_model(false);
    let bytes = w.to_bytes();
    let (msg, file, dir) = import_err("trunc-meta", &bytes[..200]);
    assert!(msg.contains("truncated file"), "{msg}");
    assert!(msg.contains("metadata"), "says what was being read: {msg}");
    assert_names_file(&msg, &file);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn empty_file_is_truncated() {
    let (msg, file, dir) = import_err("empty", &[]);
    assert!(msg.contains("truncated file"), "{msg}");
    assert_names_file(&msg, &file);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_magic_is_reported() {
    let (w, _) = tiny_model(false);
    let mut bytes = w.to_bytes();
    bytes[..4].copy_from_slice(b"GGML");
    let (msg, file, dir) = import_err("magic", &bytes);
    assert!(
        msg.contains("bad magic") && msg.contains("not a GGUF file"),
        "{msg}"
    );
    assert_names_file(&msg, &file);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unsupported_version_is_reported() {
    let (mut w, _) = tiny_model(false);
    w.version = 7;
    let (msg, file, dir) = import_err("version", &w.to_bytes());
    assert!(msg.contains("unsupported GGUF version 7"), "{msg}");
    assert_names_file(&msg, &file);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn other_architecture_is_refused() {
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Val::Str("qwen2".into()));
    let (msg, _, dir) = import_err("arch", &w.to_bytes());
    assert!(
        msg.contains("\"qwen2\"") && msg.contains("only \"llama\""),
        "{msg}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn shape_mismatch_with_metadata_is_reported() {
    let (mut w, _) = tiny_model(false);
    w.kvs.retain(|kv| kv.0 != "llama.feed_forward_length");
    w.kv("llama.feed_forward_length", Val::U32(96));
    let (msg, _, dir) = import_err("shape", &w.to_bytes());
    assert!(
        msg.contains("blk.0.ffn_gate.weight has shape [64, 32]"),
        "{msg}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unknown_tensor_is_refused() {
    let (mut w, _) = tiny_model(false);
    w.tensor("blk.0.attn_q_norm.weight", &[32], 0, vec![0u8; 128]);
    let (msg, _, dir) = import_err("unknown", &w.to_bytes());
    assert!(
        msg.contains("tensor blk.0.attn_q_norm.weight is not a LLaMA tensor"),
        "{msg}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn non_empty_output_directory_is_refused() {
    let dir = scratch("outexists");
    let (w, _) = tiny_model(false);
    let file = dir.join("m.gguf");
    std::fs::write(&file, w.to_bytes()).unwrap();
    let out = dir.join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let err = format!("{:#}", import_gguf(&file, &out, DType::F32).unwrap_err());
    assert!(err.contains("already exists and is not empty"), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
