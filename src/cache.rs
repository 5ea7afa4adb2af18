//! The zoft cache directory (`~/.cache/zoft`, or `$ZOFT_HOME`).

use std::path::PathBuf;

pub fn home() -> PathBuf {
    if let Some(p) = std::env::var_os("ZOFT_HOME") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    base.join(".cache").join("zoft")
}
