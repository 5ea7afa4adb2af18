//! Compiles csrc/*.cu into one fatbin (SASS for sm_80 and sm_90 plus compute_80 PTX by default)
//! that the crate embeds and loads through the CUDA driver at run time. No CUDA library is
//! linked. Without nvcc the crate still builds and the CUDA backend reports how to get kernels;
//! with ZOFT_REQUIRE_KERNELS=1 a missing nvcc or a failing compile is a build error.
//!
//! nvcc is looked up as $NVCC, then $CUDA_HOME/bin/nvcc, then on PATH (`tools/install-nvcc`
//! installs one). ZOFT_CUDA_ARCHS overrides the architectures: a comma-separated list of SM
//! numbers ("80,90"); SASS is built for each and PTX for the lowest.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_ARCHS: &str = "80,90";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "ZOFT_CUDA_ARCHS",
        "ZOFT_REQUIRE_KERNELS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let generated = out_dir.join("cuda_kernels.rs");

    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        write_none(&generated, "zoft was built without the `cuda` feature");
        return;
    }
    let require = env::var("ZOFT_REQUIRE_KERNELS").is_ok_and(|v| v == "1" || v == "true");

    match compile(&out_dir) {
        Ok(fatbin) => {
            let mut src = String::new();
            writeln!(
                src,
                "/// The kernels of csrc/, compiled by nvcc at build time.\n\
                 pub const FATBIN: Option<&[u8]> = Some(include_bytes!({:?}));\n\
                 /// Why FATBIN is absent (empty when it is present).\n\
                 pub const FATBIN_MISSING: &str = \"\";",
                fatbin.display().to_string()
            )
            .unwrap();
            fs::write(&generated, src).expect("writing cuda_kernels.rs");
        }
        Err(reason) => {
            if require {
                panic!(
                    "ZOFT_REQUIRE_KERNELS is set but the CUDA kernels could not be built: {reason}"
                );
            }
            println!("cargo:warning=zoft: building without CUDA kernels: {reason}");
            println!(
                "cargo:warning=zoft: run tools/install-nvcc and set NVCC to the path it prints to build them"
            );
            write_none(&generated, &reason);
        }
    }
}

fn write_none(path: &Path, reason: &str) {
    let src = format!(
        "/// The kernels of csrc/, compiled by nvcc at build time.\n\
         pub const FATBIN: Option<&[u8]> = None;\n\
         /// Why FATBIN is absent.\n\
         pub const FATBIN_MISSING: &str = {reason:?};\n"
    );
    fs::write(path, src).expect("writing cuda_kernels.rs");
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(home) = env::var_os("CUDA_HOME").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(home).join("bin").join("nvcc");
        if p.is_file() {
            return Some(p);
        }
    }
    // Only a PATH lookup depends on PATH.
    println!("cargo:rerun-if-env-changed=PATH");
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|d| d.join("nvcc"))
        .find(|p| p.is_file())
}

fn parse_archs(spec: &str) -> Result<Vec<u32>, String> {
    let mut archs = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let digits = part
            .trim_start_matches("sm_")
            .trim_start_matches("compute_")
            .replace('.', "");
        let n: u32 = digits.parse().map_err(|_| {
            format!("ZOFT_CUDA_ARCHS: {part:?} is not an SM number (expected e.g. \"80,90\")")
        })?;
        if !archs.contains(&n) {
            archs.push(n);
        }
    }
    if archs.is_empty() {
        return Err("ZOFT_CUDA_ARCHS is empty".into());
    }
    archs.sort_unstable();
    Ok(archs)
}

fn compile(out_dir: &Path) -> Result<PathBuf, String> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let csrc = manifest.join("csrc");
    let mut sources: Vec<PathBuf> = fs::read_dir(&csrc)
        .map_err(|e| format!("cannot read {}: {e}", csrc.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("cu" | "cuh")))
        .collect();
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    let units: Vec<&PathBuf> = sources
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    if units.is_empty() {
        return Err(format!("no .cu files in {}", csrc.display()));
    }

    let nvcc =
        find_nvcc().ok_or("nvcc not found (looked at $NVCC, $CUDA_HOME/bin/nvcc and PATH)")?;
    let archs = parse_archs(&env::var("ZOFT_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.into()))?;

    // One translation unit that includes every .cu: nvcc -fatbin takes a single input.
    let umbrella = out_dir.join("zoft_kernels.cu");
    let mut text = String::from("// Generated by build.rs: every kernel file of csrc/.\n");
    for u in &units {
        writeln!(text, "#include {:?}", u.display().to_string()).unwrap();
    }
    fs::write(&umbrella, text).map_err(|e| format!("writing {}: {e}", umbrella.display()))?;

    let fatbin = out_dir.join("zoft_kernels.fatbin");
    let mut cmd = Command::new(&nvcc);
    cmd.arg("-fatbin")
        .arg("-O3")
        .arg("--std=c++17")
        .arg("-lineinfo")
        .arg("-I")
        .arg(&csrc);
    for a in &archs {
        cmd.arg("-gencode")
            .arg(format!("arch=compute_{a},code=sm_{a}"));
    }
    let lowest = archs[0];
    cmd.arg("-gencode")
        .arg(format!("arch=compute_{lowest},code=compute_{lowest}"));
    cmd.arg("-o").arg(&fatbin).arg(&umbrella);
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        for line in stderr.lines() {
            println!("cargo:warning=nvcc: {line}");
        }
        let first = stderr
            .lines()
            .find(|l| l.contains("error"))
            .unwrap_or("see the nvcc output above");
        return Err(format!(
            "{} failed ({}): {first}",
            nvcc.display(),
            output.status
        ));
    }
    Ok(fatbin)
}
