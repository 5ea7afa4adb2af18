//! Reading (memory-mapped, copy-on-write) and writing safetensors files.

use super::tensor::{DType, HostTensor};
use anyhow::{bail, Context, Result};
use memmap2::MmapOptions;
use safetensors::tensor::{Dtype as StDtype, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn dtype_from_st(d: StDtype, file: &Path, name: &str) -> Result<DType> {
    Ok(match d {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        other => bail!(
            "{}: tensor {name} has dtype {other:?}; zoft reads F32, F16 and BF16",
            file.display()
        ),
    })
}

fn dtype_to_st(d: DType) -> StDtype {
    match d {
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
    }
}

/// Maps one safetensors file copy-on-write and returns its tensors by name.
pub fn load_file(path: &Path) -> Result<HashMap<String, HostTensor>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("opening safetensors file {}", path.display()))?;
    let len = file.metadata()?.len() as usize;
    if len < 8 {
        bail!(
            "{}: truncated safetensors file ({len} bytes, no header)",
            path.display()
        );
    }
    // SAFETY: a private (copy-on-write) map; writes never reach the file. The file must not be
    // truncated by another process while mapped, the same contract as every mmap-based loader.
    let map = unsafe { MmapOptions::new().map_copy(&file) }
        .with_context(|| format!("memory-mapping {}", path.display()))?;
    let header_len = u64::from_le_bytes(map[..8].try_into().unwrap()) as usize;
    if header_len > len - 8 {
        bail!(
            "{}: truncated safetensors file: header says {header_len} header bytes but the file has {} after the length prefix",
            path.display(),
            len - 8
        );
    }
    let data_len = len - 8 - header_len;
    check_header(&map[8..8 + header_len], data_len, path)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&map[..])
        .map_err(|e| anyhow::anyhow!("{}: invalid safetensors header: {e:?}", path.display()))?;
    let data_start = 8 + header_len;
    let map = Arc::new(map);
    let mut out = HashMap::new();
    for (name, info) in meta.tensors() {
        let dtype = dtype_from_st(info.dtype, path, &name)?;
        let (start, end) = info.data_offsets;
        let numel: usize = info.shape.iter().product();
        if end < start || end > data_len || end - start != numel * dtype.size() {
            bail!(
                "{}: tensor {name}: header offsets {start}..{end} do not fit shape {:?} {} within {data_len} data bytes (truncated or corrupt file)",
                path.display(),
                info.shape,
                dtype.name()
            );
        }
        let t = HostTensor::mapped(
            name.clone(),
            info.shape.clone(),
            dtype,
            map.clone(),
            data_start + start,
        );
        out.insert(name, t);
    }
    Ok(out)
}

/// Checks each tensor entry of a header against the data actually present, naming the first
/// one at fault. A header that is not readable JSON is left to the full parser to report.
fn check_header(header: &[u8], data_len: usize, path: &Path) -> Result<()> {
    let Ok(serde_json::Value::Object(entries)) =
        serde_json::from_slice::<serde_json::Value>(header)
    else {
        return Ok(());
    };
    for (name, t) in entries.iter().filter(|(k, _)| k.as_str() != "__metadata__") {
        let offsets = t.get("data_offsets").and_then(|o| o.as_array());
        let (Some(start), Some(end)) = (
            offsets.and_then(|o| o.first()?.as_u64()),
            offsets.and_then(|o| o.get(1)?.as_u64()),
        ) else {
            continue;
        };
        if end as usize > data_len {
            bail!(
                "{}: truncated safetensors file: tensor {name} ends at byte {end} of the data but the file has {data_len}",
                path.display()
            );
        }
        let size = match t.get("dtype").and_then(|d| d.as_str()) {
            Some("F32" | "I32" | "U32") => 4,
            Some("F16" | "BF16" | "I16" | "U16") => 2,
            Some("F64" | "I64" | "U64") => 8,
            Some("I8" | "U8" | "BOOL") => 1,
            _ => continue,
        };
        let numel: u64 = t
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|s| s.iter().filter_map(|d| d.as_u64()).product())
            .unwrap_or(0);
        if end < start || end - start != numel * size {
            bail!(
                "{}: tensor {name}: header offsets {start}..{end} ({} bytes) do not match its shape and dtype ({} bytes)",
                path.display(),
                end.saturating_sub(start),
                numel * size
            );
        }
    }
    Ok(())
}

/// Loads `model.safetensors` or every shard listed in `model.safetensors.index.json`.
pub fn load_dir(dir: &Path) -> Result<HashMap<String, HostTensor>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return load_file(&single);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        bail!(
            "{}: no model.safetensors or model.safetensors.index.json",
            dir.display()
        );
    }
    let text = std::fs::read_to_string(&index)?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: missing weight_map", index.display()))?;
    let mut shards: Vec<&str> = map.values().filter_map(|s| s.as_str()).collect();
    shards.sort();
    shards.dedup();
    let mut out = HashMap::new();
    for shard in shards {
        for (k, t) in load_file(&dir.join(shard))? {
            out.insert(k, t);
        }
    }
    Ok(out)
}

/// Writes tensors to `path` through a temporary file and a rename, so a crash never leaves a
/// half-written file under the final name.
pub fn save_file(
    path: &Path,
    tensors: &[(&str, &[usize], DType, &[u8])],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut views = BTreeMap::new();
    for (name, shape, dtype, bytes) in tensors {
        let view = TensorView::new(dtype_to_st(*dtype), shape.to_vec(), bytes)
            .map_err(|e| anyhow::anyhow!("tensor {name}: {e:?}"))?;
        views.insert(name.to_string(), view);
    }
    let tmp = tmp_path(path);
    safetensors::serialize_to_file(views, metadata, &tmp)
        .map_err(|e| anyhow::anyhow!("writing {}: {e:?}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes a safetensors file one tensor at a time: `write(i, out)` must write exactly the
/// bytes of `entries[i]`. Lets a caller produce each tensor on the fly (e.g. materialize a
/// low-rank update) without holding a second copy of the model. Temporary name + rename.
pub fn save_streaming(
    path: &Path,
    entries: &[(String, Vec<usize>, DType)],
    metadata: &HashMap<String, String>,
    mut write: impl FnMut(usize, &mut dyn std::io::Write) -> Result<()>,
) -> Result<()> {
    use std::io::Write;
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    let mut offset = 0usize;
    for (name, shape, dtype) in entries {
        let n = shape.iter().product::<usize>() * dtype.size();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut text = serde_json::to_string(&header)?.into_bytes();
    // Pad the header with spaces so tensor data starts 8-byte aligned.
    while (text.len() + 8) % 8 != 0 {
        text.push(b' ');
    }
    let tmp = tmp_path(path);
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    out.write_all(&(text.len() as u64).to_le_bytes())?;
    out.write_all(&text)?;
    for (i, (name, _, _)) in entries.iter().enumerate() {
        write(i, &mut out)
            .with_context(|| format!("writing tensor {name} to {}", tmp.display()))?;
    }
    let file = out
        .into_inner()
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", tmp.display()))?;
    file.sync_all()?;
    let written = file.metadata()?.len() as usize;
    let want = 8 + text.len() + offset;
    if written != want {
        let _ = std::fs::remove_file(&tmp);
        bail!("{}: wrote {written} bytes, expected {want}", tmp.display());
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}
