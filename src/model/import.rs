//! GGUF import (placeholder until the importer lands; this file is replaced by it).

use super::DType;
use anyhow::{bail, Result};
use std::path::Path;

/// What an import produced.
#[derive(Clone, Debug, Default)]
pub struct ImportReport {
    /// Things the caller should tell the user.
    pub notes: Vec<String>,
}

/// Converts a GGUF file into an HF-layout model directory.
pub fn import_gguf(gguf: &Path, out_dir: &Path, dtype: DType) -> Result<ImportReport> {
    let _ = (out_dir, dtype);
    bail!(
        "{}: cannot import: the GGUF importer is not merged into this build",
        gguf.display()
    )
}
