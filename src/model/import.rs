//! `zoft import`: turns a llama.cpp GGUF file into an HF-layout model directory
//! (config.json, model.safetensors, tokenizer files) that HF transformers and zoft both load.

use super::config::{LlamaConfig, RopeScaling};
use super::gguf::{self, GgufFile, GgufTensorInfo, GgufValue};
use super::gguf_tokenizer;
use super::safetensors_io;
use super::tensor::DType;
use super::weights::expected_tensors;
use anyhow::{anyhow, bail, Context, Result};
use half::{bf16, f16};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// What an import did.
#[derive(Debug)]
pub struct ImportReport {
    pub n_tensors: usize,
    pub n_params: usize,
    pub config: LlamaConfig,
    pub out_dir: PathBuf,
    pub dtype: DType,
    /// GGUF tensor type name -> number of tensors of that type.
    pub source_types: BTreeMap<String, usize>,
    /// Whether tokenizer.json and its companions were written (false for vocabularies zoft
    /// cannot build; see `notes`).
    pub tokenizer_written: bool,
    /// Things the caller should tell the user (ignored tensors, tokenizer caveats, ...).
    pub notes: Vec<String>,
}

/// Imports `gguf` into a new directory `out_dir` with tensors in `dtype`.
///
/// The directory is built as `OUT_DIR.tmp-partial` and renamed at the end, so an interrupted
/// import never leaves a directory that looks complete. `out_dir` must not exist or be empty.
pub fn import_gguf(gguf: &Path, out_dir: &Path, dtype: DType) -> Result<ImportReport> {
    if out_dir.file_name().is_none() {
        bail!(
            "output path {} must name a new directory",
            out_dir.display()
        );
    }
    if out_dir.exists() {
        let mut entries = std::fs::read_dir(out_dir).with_context(|| {
            format!(
                "output {} exists and is not a readable directory",
                out_dir.display()
            )
        })?;
        if entries.next().is_some() {
            bail!("output directory {} already exists and is not empty; choose a new path or remove it", out_dir.display());
        }
    }
    let g = GgufFile::open(gguf)?;
    let file = gguf.display();
    // Flattened into one message so that printing just the top-level error names the file.
    let in_file = |e: anyhow::Error| anyhow!("GGUF file {file}: {e:#}");
    let (config, mut notes) = config_from_gguf(&g, dtype).map_err(in_file)?;
    let plan = plan_tensors(&g, &config, &mut notes).map_err(in_file)?;
    let mut source_types = BTreeMap::new();
    for (t, _) in &plan {
        *source_types.entry(t.type_name()).or_insert(0) += 1;
    }

    let tok = match gguf_tokenizer::tokenizer_files(&g, config.max_position_embeddings) {
        Ok(t) => Some(t),
        Err(e) => {
            notes.push(format!("no tokenizer written: {e:#}"));
            None
        }
    };

    let tmp = partial_dir(out_dir);
    if tmp.exists() {
        // Our own leftover from an interrupted import.
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = (|| -> Result<(usize, usize)> {
        let n_params = write_weights(&g, &plan, &config, dtype, &tmp.join("model.safetensors"))?;
        write_json(&tmp.join("config.json"), &serde_json::to_value(&config)?)?;
        let mut gen = serde_json::Map::new();
        gen.insert("_from_model_config".into(), json!(true));
        if let Some(b) = config.bos_token_id {
            gen.insert("bos_token_id".into(), json!(b));
        }
        if let Some(e) = &config.eos_token_id {
            gen.insert("eos_token_id".into(), e.clone());
        }
        if let Some(p) = config.pad_token_id {
            gen.insert("pad_token_id".into(), json!(p));
        }
        write_json(&tmp.join("generation_config.json"), &gen.into())?;
        if let Some(t) = &tok {
            write_json(&tmp.join("tokenizer.json"), &t.tokenizer)?;
            write_json(&tmp.join("tokenizer_config.json"), &t.tokenizer_config)?;
            write_json(&tmp.join("special_tokens_map.json"), &t.special_tokens_map)?;
        }
        Ok((plan.len(), n_params))
    })();
    let (n_tensors, n_params) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if out_dir.exists() {
        std::fs::remove_dir(out_dir)
            .with_context(|| format!("replacing empty directory {}", out_dir.display()))?;
    }
    std::fs::rename(&tmp, out_dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), out_dir.display()))?;
    let tokenizer_written = tok.is_some();
    if let Some(t) = tok {
        notes.extend(t.notes);
    }
    Ok(ImportReport {
        n_tensors,
        n_params,
        config,
        out_dir: out_dir.to_path_buf(),
        dtype,
        source_types,
        tokenizer_written,
        notes,
    })
}

fn partial_dir(out_dir: &Path) -> PathBuf {
    let mut name = out_dir.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp-partial");
    out_dir.with_file_name(name)
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)? + "\n";
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The HF `config.json` a GGUF's metadata describes, plus notes for the user. Fails for
/// architectures other than LLaMA and for features zoft cannot run (partial RoPE, MoE, ...).
pub fn config_from_gguf(g: &GgufFile, dtype: DType) -> Result<(LlamaConfig, Vec<String>)> {
    let mut notes = Vec::new();
    let arch = g
        .get("general.architecture")
        .and_then(GgufValue::as_str)
        .context("missing general.architecture")?;
    if arch != "llama" {
        bail!("general.architecture is {arch:?}; zoft imports only \"llama\" models");
    }
    let key = |k: &str| format!("{arch}.{k}");
    let uint = |k: &str| -> Result<Option<usize>> {
        match g.get(&key(k)) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .with_context(|| format!("metadata {} = {v} is not a count", key(k))),
        }
    };
    let float = |k: &str| -> Result<Option<f64>> {
        match g.get(&key(k)) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .with_context(|| format!("metadata {} = {v} is not a number", key(k))),
        }
    };
    let need = |k: &str| -> Result<usize> {
        uint(k)?.with_context(|| format!("missing metadata {}", key(k)))
    };
    if uint("expert_count")?.unwrap_or(0) > 0 {
        bail!(
            "{} is set: mixture-of-experts models are not supported",
            key("expert_count")
        );
    }
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let kv_heads = uint("attention.head_count_kv")?.unwrap_or(heads);
    if heads == 0 || (hidden % heads != 0 && uint("attention.key_length")?.is_none()) {
        bail!("embedding_length {hidden} is not a multiple of attention.head_count {heads}");
    }
    let head_dim = uint("attention.key_length")?.unwrap_or(hidden / heads);
    if let Some(r) = uint("rope.dimension_count")? {
        if r != head_dim {
            bail!("rope.dimension_count {r} differs from the head size {head_dim}: partial RoPE is not supported");
        }
    }
    let tokens = g
        .get("tokenizer.ggml.tokens")
        .and_then(GgufValue::as_array)
        .map(|a| a.len());
    let embed_rows = g
        .tensor("token_embd.weight")
        .and_then(|t| t.dims.get(1).copied())
        .map(|d| d as usize);
    let vocab_size = tokens
        .or(uint("vocab_size")?)
        .or(embed_rows)
        .context("no vocabulary size: no tokenizer.ggml.tokens, vocab_size or token_embd.weight")?;
    let n_tok = tokens.unwrap_or(vocab_size);
    let tok_id = |k: &str| -> Option<u32> {
        g.get(&format!("tokenizer.ggml.{k}"))
            .and_then(GgufValue::as_u64)
            .filter(|&i| (i as usize) < n_tok)
            .map(|i| i as u32)
    };
    let rope_theta = float("rope.freq_base")?.unwrap_or(10000.0);
    let mut rope_scaling = None;
    match g.get(&key("rope.scaling.type")).and_then(GgufValue::as_str) {
        None | Some("none") => {}
        Some(t) => {
            let factor = float("rope.scaling.factor")?.unwrap_or(1.0);
            if factor != 1.0 {
                bail!("rope scaling type {t:?} (factor {factor}) is not supported; zoft runs llama3-style scaling only");
            }
        }
    }
    if let Some(t) = g.tensor("rope_freqs.weight") {
        let factors = g.tensor_f32(t)?;
        let orig_ctx = uint("rope.scaling.original_context_length")?.unwrap_or(8192);
        rope_scaling = llama3_scaling_from_factors(&factors, rope_theta, head_dim, orig_ctx)?;
        match &rope_scaling {
            Some(s) => notes.push(format!(
                "rope_freqs.weight read as llama3 rope scaling (factor {}, low_freq_factor {}, high_freq_factor {}, original context {})",
                s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings
            )),
            None => notes.push("rope_freqs.weight is all ones (no rope scaling); ignored".into()),
        }
    }
    let cfg = LlamaConfig {
        architectures: vec!["LlamaForCausalLM".into()],
        model_type: "llama".into(),
        hidden_size: hidden,
        intermediate_size: need("feed_forward_length")?,
        num_hidden_layers: need("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        head_dim: Some(head_dim),
        vocab_size,
        max_position_embeddings: uint("context_length")?.unwrap_or(2048),
        rms_norm_eps: float("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-6),
        rope_theta,
        rope_scaling,
        tie_word_embeddings: g.tensor("output.weight").is_none(),
        bos_token_id: tok_id("bos_token_id"),
        eos_token_id: tok_id("eos_token_id").map(|e| json!(e)),
        pad_token_id: tok_id("padding_token_id"),
        hidden_act: "silu".into(),
        torch_dtype: Some(dtype.hf_name().into()),
    };
    cfg.validate()?;
    Ok((cfg, notes))
}

/// Recovers llama3 rope scaling from llama.cpp's `rope_freqs` tensor, which holds, per rotated
/// pair, the factor its frequency is divided by: 1 for high frequencies, `factor` for low ones
/// and a smooth blend between. Returns None when all factors are 1.
pub fn llama3_scaling_from_factors(
    factors: &[f32],
    theta: f64,
    head_dim: usize,
    orig_ctx: usize,
) -> Result<Option<RopeScaling>> {
    if factors.len() != head_dim / 2 {
        bail!(
            "rope_freqs.weight has {} entries but the head size {head_dim} needs {}",
            factors.len(),
            head_dim / 2
        );
    }
    let factor = factors.iter().fold(1f64, |m, &f| m.max(f as f64));
    if (factor - 1.0).abs() < 1e-6 {
        return Ok(None);
    }
    let wavelen =
        |i: usize| 2.0 * std::f64::consts::PI * theta.powf(2.0 * i as f64 / head_dim as f64);
    // In the blend, with s = (1/f - 1/F) / (1 - 1/F): orig_ctx / wavelen = low + s (high - low),
    // a line in s; two blended entries fix it.
    let blend: Vec<(f64, f64)> = factors
        .iter()
        .enumerate()
        .filter(|(_, &f)| f as f64 > 1.0 + 1e-4 && (f as f64) < factor - 1e-4)
        .map(|(i, &f)| {
            (
                (1.0 / f as f64 - 1.0 / factor) / (1.0 - 1.0 / factor),
                orig_ctx as f64 / wavelen(i),
            )
        })
        .collect();
    let (low, high) = match (blend.first(), blend.last()) {
        (Some(&(s0, y0)), Some(&(s1, y1))) if (s1 - s0).abs() > 1e-3 => {
            let slope = (y1 - y0) / (s1 - s0);
            let low = y0 - slope * s0;
            (snap(low), snap(low + slope))
        }
        // Too few blended entries to fit: try the values every LLaMA 3.x release uses.
        _ => (1.0, 4.0),
    };
    let s = RopeScaling {
        rope_type: "llama3".into(),
        factor: snap(factor),
        low_freq_factor: low,
        high_freq_factor: high,
        original_max_position_embeddings: orig_ctx,
    };
    // Check the fit reproduces every stored factor.
    for (i, &f) in factors.iter().enumerate() {
        let w = wavelen(i);
        let expect = if w < orig_ctx as f64 / s.high_freq_factor {
            1.0
        } else if w > orig_ctx as f64 / s.low_freq_factor {
            s.factor
        } else {
            let sm = (orig_ctx as f64 / w - s.low_freq_factor)
                / (s.high_freq_factor - s.low_freq_factor);
            1.0 / ((1.0 - sm) / s.factor + sm)
        };
        if ((f as f64) - expect).abs() > 1e-3 * expect {
            bail!("rope_freqs.weight entry {i} = {f} does not follow llama3 rope scaling (expected {expect:.5} from factor {}, low {low}, high {high}); this rope scaling is not supported", s.factor);
        }
    }
    Ok(Some(s))
}

/// Rounds a fitted parameter to 4 decimals when that is within float noise of it.
fn snap(x: f64) -> f64 {
    let r = (x * 1e4).round() / 1e4;
    if (r - x).abs() <= 1e-4 * x.abs().max(1.0) {
        r
    } else {
        x
    }
}

/// HF name of a GGUF tensor, or None for names zoft does not know.
pub fn hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Pairs every GGUF tensor with its HF name in canonical order, after checking names, types
/// and shapes against the config. Nothing is dequantized yet, so bad files fail fast.
fn plan_tensors<'a>(
    g: &'a GgufFile,
    cfg: &LlamaConfig,
    notes: &mut Vec<String>,
) -> Result<Vec<(&'a GgufTensorInfo, String)>> {
    let mut by_hf: HashMap<String, &GgufTensorInfo> = HashMap::new();
    for t in &g.tensors {
        if t.name == "rope_freqs.weight" {
            continue; // read into rope_scaling by config_from_gguf
        }
        if t.name.ends_with(".attn_rot_embd.weight") {
            notes.push(format!(
                "ignored {} (RoPE tables, recomputed at run time)",
                t.name
            ));
            continue;
        }
        let Some(hf) = hf_name(&t.name) else {
            bail!(
                "tensor {} is not a LLaMA tensor zoft knows how to import",
                t.name
            );
        };
        if !gguf::is_supported_type(t.ggml_type) {
            bail!("{}", gguf::unsupported_msg(t));
        }
        by_hf.insert(hf, t);
    }
    let mut plan = Vec::new();
    for (hf, shape, _) in expected_tensors(cfg) {
        let t = by_hf.remove(&hf).with_context(|| {
            format!("missing tensor for {hf} (shape {shape:?} from the metadata)")
        })?;
        if t.shape() != shape {
            bail!(
                "tensor {} has shape {:?} (HF order) but the metadata implies {shape:?} for {hf}",
                t.name,
                t.shape()
            );
        }
        plan.push((t, hf));
    }
    if let Some(hf) = by_hf.keys().next() {
        bail!(
            "tensor {} ({hf}) does not fit the model the metadata describes",
            by_hf[hf].name
        );
    }
    Ok(plan)
}

/// Dequantizes, unpermutes q/k and converts every tensor, then writes model.safetensors.
/// Returns the parameter count.
fn write_weights(
    g: &GgufFile,
    plan: &[(&GgufTensorInfo, String)],
    cfg: &LlamaConfig,
    dtype: DType,
    path: &Path,
) -> Result<usize> {
    let mut out: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(plan.len());
    let mut n_params = 0;
    for (t, hf) in plan {
        let mut data = g.tensor_f32(t)?;
        let shape = t.shape();
        let heads = if t.name.ends_with(".attn_q.weight") {
            Some(cfg.num_attention_heads)
        } else if t.name.ends_with(".attn_k.weight") {
            Some(cfg.n_kv_heads())
        } else {
            None
        };
        if let Some(h) = heads {
            data = unpermute_rows(&data, shape[1], h);
        }
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            bail!(
                "{}: tensor {} holds a non-finite value ({}) at element {i}",
                g.path.display(),
                t.name,
                data[i]
            );
        }
        n_params += data.len();
        out.push((hf.clone(), shape, to_dtype_bytes(&data, dtype, hf)?));
    }
    let list: Vec<(&str, &[usize], DType, &[u8])> = out
        .iter()
        .map(|(n, s, b)| (n.as_str(), s.as_slice(), dtype, b.as_slice()))
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors_io::save_file(path, &list, Some(meta))?;
    Ok(n_params)
}

fn to_dtype_bytes(data: &[f32], dtype: DType, name: &str) -> Result<Vec<u8>> {
    Ok(match dtype {
        DType::F32 => bytemuck::cast_slice(data).to_vec(),
        DType::BF16 => data
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect(),
        DType::F16 => {
            if let Some(x) = data.iter().find(|x| x.abs() > f16::MAX.to_f32()) {
                bail!("tensor {name}: value {x} does not fit in f16; import as f32 or bf16");
            }
            data.iter()
                .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                .collect()
        }
    })
}

/// llama.cpp's converter reorders the rows of each head of q/k from HF's half-split RoPE
/// layout (x_i pairs with x_{i+hd/2}) to its adjacent-pair layout (x_{2i} pairs with
/// x_{2i+1}): stored row (h, 2i + j) = original row (h, j*hd/2 + i). This puts them back.
pub fn unpermute_rows(w: &[f32], row_len: usize, n_head: usize) -> Vec<f32> {
    reorder_rows(w, row_len, n_head, false)
}

/// The converter's permutation (the inverse of `unpermute_rows`); used to test it.
pub fn permute_rows(w: &[f32], row_len: usize, n_head: usize) -> Vec<f32> {
    reorder_rows(w, row_len, n_head, true)
}

fn reorder_rows(w: &[f32], row_len: usize, n_head: usize, forward: bool) -> Vec<f32> {
    let n_rows = w.len() / row_len;
    let hd = n_rows / n_head;
    assert_eq!(n_rows, n_head * hd, "rows must split evenly into heads");
    assert_eq!(hd % 2, 0, "head size must be even");
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let stored = h * hd + 2 * i + j;
                let original = h * hd + j * hd / 2 + i;
                let (dst, src) = if forward {
                    (stored, original)
                } else {
                    (original, stored)
                };
                out[dst * row_len..(dst + 1) * row_len]
                    .copy_from_slice(&w[src * row_len..(src + 1) * row_len]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_then_unpermute_is_identity() {
        let (n_head, hd, row_len) = (3, 8, 5);
        let w: Vec<f32> = (0..n_head * hd * row_len).map(|x| x as f32).collect();
        let p = permute_rows(&w, row_len, n_head);
        assert_ne!(p, w);
        assert_eq!(unpermute_rows(&p, row_len, n_head), w);
        assert_eq!(
            permute_rows(&unpermute_rows(&w, row_len, n_head), row_len, n_head),
            w
        );
    }

    #[test]
    fn one_head_rows_map_as_llama_cpp_does() {
        // One head of size 6, one column: rows hold their original index. The converter's
        // reshape(1, 2, 3, 1).swapaxes(1, 2) interleaves the two halves: 0 3 1 4 2 5.
        let w: Vec<f32> = (0..6).map(|x| x as f32).collect();
        assert_eq!(permute_rows(&w, 1, 1), vec![0., 3., 1., 4., 2., 5.]);
        assert_eq!(unpermute_rows(&[0., 3., 1., 4., 2., 5.], 1, 1), w);
    }

    #[test]
    fn llama3_scaling_fits_llama31_factors() {
        let (theta, hd, ctx) = (500000.0f64, 128usize, 8192usize);
        let (factor, low, high) = (8.0, 1.0, 4.0);
        let factors: Vec<f32> = (0..hd / 2)
            .map(|i| {
                let w = 2.0 * std::f64::consts::PI * theta.powf(2.0 * i as f64 / hd as f64);
                let f = if w < ctx as f64 / high {
                    1.0
                } else if w > ctx as f64 / low {
                    factor
                } else {
                    let s = (ctx as f64 / w - low) / (high - low);
                    1.0 / ((1.0 - s) / factor + s)
                };
                f as f32
            })
            .collect();
        let s = llama3_scaling_from_factors(&factors, theta, hd, ctx)
            .unwrap()
            .unwrap();
        assert_eq!(
            (s.factor, s.low_freq_factor, s.high_freq_factor),
            (8.0, 1.0, 4.0)
        );
        assert!(llama3_scaling_from_factors(&vec![1.0; 64], theta, hd, ctx)
            .unwrap()
            .is_none());
        let mut bad = factors.clone();
        bad[3] = 2.0;
        assert!(llama3_scaling_from_factors(&bad, theta, hd, ctx).is_err());
    }

    #[test]
    fn gguf_names_map_to_hf() {
        assert_eq!(
            hf_name("blk.12.attn_output.weight").unwrap(),
            "model.layers.12.self_attn.o_proj.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_name("blk.x.attn_q.weight").is_none());
        assert!(hf_name("rope_freqs.weight").is_none());
    }
}
