//! The kernels of csrc/ run on the CPU, so that their launchers (kernels.rs, unchanged: the
//! real argument lists and launch shapes) can be tested against the CPU backend on machines
//! without a GPU. csrc/emu/ holds the emulation: every CUDA thread is a fiber, blocks run in
//! turn, barriers and warp shuffles synchronize the fibers, and the rounded float intrinsics keep
//! their IEEE meaning, so the kernels built only from them (Philox normals, the ZO passes) must
//! give the CPU's bits here as on the GPU. What the emulation cannot show: timing, races between
//! blocks, and last-place differences of the device's libm and fma contraction.
//!
//! The kernel sources are compiled once per test process with the system C++ compiler ($CXX, or
//! c++); pointers are host addresses.

mod forward_ops;
mod zo_ops;

use super::context::{Args, Launch, KERNELS};
use anyhow::{anyhow, bail, Result};
use std::ffi::c_void;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// Bytes of dynamic shared memory each `extern __shared__` array gets (the largest an H100
/// block can opt into is 227 KB).
const DYNAMIC_SMEM_BYTES: usize = 256 * 1024;

type Trampoline = unsafe extern "C" fn(*mut *mut c_void);
type KernelLookup = unsafe extern "C" fn() -> Trampoline;
type LaunchFn =
    unsafe extern "C" fn(Trampoline, *mut *mut c_void, u32, u32, u32, u32, u32, u32) -> i32;

pub(crate) struct Emulator {
    lib: libloading::Library,
    /// The emulation's scheduler state is global: one launch at a time.
    lock: Mutex<()>,
}

/// The emulator, built on first use. None (after saying why) when there is no C++ compiler,
/// unless ZOFT_REQUIRE_KERNELS=1, where that fails as a missing nvcc does; a compiler that
/// rejects the kernels always fails.
pub(crate) fn emulator() -> Option<&'static Emulator> {
    static EMU: OnceLock<Option<Result<Emulator, String>>> = OnceLock::new();
    let built = EMU.get_or_init(|| {
        let cxx = compiler();
        if Command::new(&cxx).arg("--version").output().is_err() {
            let required = std::env::var("ZOFT_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "the kernel emulator needs a C++ compiler; {cxx:?} was not found"
            );
            eprintln!("skipped: no C++ compiler ({cxx:?}) to build the kernel emulator");
            return None;
        }
        Some(Emulator::build(&cxx).map_err(|e| format!("{e:#}")))
    });
    match built {
        None => None,
        Some(Ok(e)) => Some(e),
        Some(Err(why)) => panic!("the kernel emulator could not be built: {why}"),
    }
}

/// $CXX, or c++.
fn compiler() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "c++".into())
}

impl Emulator {
    fn build(cxx: &str) -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let csrc = root.join("csrc");
        let dir = std::env::temp_dir().join(format!("zoft-emu-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let unit = dir.join("kernels_emulated.cpp");
        std::fs::write(&unit, translation_unit(&csrc)?)?;
        let lib_path = dir.join("libzoft_emu.so");
        let out = Command::new(cxx)
            .args(["-std=c++20", "-O1", "-fPIC", "-shared", "-ffp-contract=off"])
            .arg("-I")
            .arg(csrc.join("emu"))
            .arg("-I")
            .arg(&csrc)
            .arg("-include")
            .arg(csrc.join("emu/cuda_emu.h"))
            .arg(&unit)
            .arg(csrc.join("emu/runtime.cpp"))
            .arg("-o")
            .arg(&lib_path)
            .output()
            .map_err(|e| anyhow!("running the C++ compiler {cxx:?}: {e}"))?;
        if !out.status.success() {
            bail!(
                "compiling the kernels for the CPU ({}) failed:\n{}",
                unit.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // SAFETY: a library built just now from our sources; its initializers only zero arrays.
        let lib = unsafe { libloading::Library::new(&lib_path) }
            .map_err(|e| anyhow!("loading {}: {e}", lib_path.display()))?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(Emulator {
            lib,
            lock: Mutex::new(()),
        })
    }
}

/// One C++ file: the dynamic shared arrays, every csrc/*.cu with `__shared__` made `static` (a
/// block's threads share it; blocks run one at a time), and a trampoline per kernel of KERNELS
/// that unpacks a CUDA-style parameter array into the kernel's arguments.
fn translation_unit(csrc: &Path) -> Result<String> {
    let mut sources: Vec<PathBuf> = std::fs::read_dir(csrc)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    let mut unit = String::from("#include <type_traits>\n#include <utility>\n");
    let mut body = String::new();
    for path in &sources {
        let src = std::fs::read_to_string(path)?;
        for line in src.lines().filter(|l| l.contains("extern __shared__")) {
            // `extern __shared__ TYPE NAME[];`
            let decl = line.split("extern __shared__").nth(1).unwrap_or("");
            let decl = decl.split("//").next().unwrap_or("");
            let words: Vec<&str> = decl
                .trim()
                .trim_end_matches(';')
                .split_whitespace()
                .collect();
            let (ty, name) = match words.as_slice() {
                [ty, name] if name.ends_with("[]") => (*ty, name.trim_end_matches("[]")),
                _ => bail!(
                    "{}: unexpected dynamic shared array: {line}",
                    path.display()
                ),
            };
            writeln!(
                unit,
                "alignas(16) {ty} {name}[{DYNAMIC_SMEM_BYTES} / sizeof({ty})];"
            )?;
        }
        writeln!(body, "#line 1 \"{}\"", path.display())?;
        body.push_str(
            &src.replace("extern __shared__", "extern")
                .replace("__shared__", "static"),
        );
        body.push('\n');
    }
    unit.push_str(&body);
    unit.push_str(
        "\ntemplate <typename F, F f> struct ZfTrampoline;\n\
         template <typename... A, void (*f)(A...)> struct ZfTrampoline<void (*)(A...), f> {\n\
         \x20 template <size_t... I> static void call(void** p, std::index_sequence<I...>) {\n\
         \x20   f(*static_cast<std::remove_cv_t<A>*>(p[I])...);\n\
         \x20 }\n\
         \x20 static void run(void** p) { call(p, std::index_sequence_for<A...>{}); }\n\
         };\n",
    );
    for k in KERNELS {
        writeln!(
            unit,
            "extern \"C\" void (*zf_emu_kernel_{k}())(void**) {{ return &ZfTrampoline<decltype(&{k}), &{k}>::run; }}"
        )?;
    }
    Ok(unit)
}

impl Launch for Emulator {
    fn launch(
        &self,
        name: &'static str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: usize,
        args: Args,
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let threads = block.0 as u64 * block.1 as u64 * block.2 as u64;
        if threads == 0 || threads > 1024 {
            bail!("kernel {name}: block {block:?} has {threads} threads (1 to 1024)");
        }
        if smem > DYNAMIC_SMEM_BYTES {
            bail!("kernel {name}: {smem} bytes of shared memory (the emulator has {DYNAMIC_SMEM_BYTES})");
        }
        let _one = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: symbols of the library built from csrc; every KERNELS name has a trampoline.
        let (kernel, launch) = unsafe {
            let lookup = self
                .lib
                .get::<KernelLookup>(format!("zf_emu_kernel_{name}").as_bytes())
                .map_err(|_| anyhow!("unknown kernel {name}"))?;
            let launch = self.lib.get::<LaunchFn>(b"zf_emu_launch")?;
            (lookup(), *launch)
        };
        let mut slots = args.into_slots();
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        // SAFETY: the launcher's argument list mirrors the kernel's signature, as for the GPU;
        // the pointers it passes are host addresses the test owns.
        let rc = unsafe {
            launch(
                kernel,
                params.as_mut_ptr(),
                grid.0,
                grid.1,
                grid.2,
                block.0,
                block.1,
                block.2,
            )
        };
        if rc != 0 {
            bail!("kernel {name} (grid {grid:?}, block {block:?}) deadlocked in the emulator");
        }
        Ok(())
    }
}

/// The address of a host buffer, as a kernel argument.
pub(crate) fn addr<T>(v: &[T]) -> u64 {
    v.as_ptr() as u64
}

/// Relative norm error |got - want| / |want|.
pub(crate) fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        num += (*g as f64 - *w as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    (num / den.max(1e-300)).sqrt()
}

/// Asserts bit equality, naming the first difference.
pub(crate) fn same_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!(
            "{what}: element {i} of {} differs: emulated kernel {} ({:#010x}), CPU {} ({:#010x})",
            got.len(),
            got[i],
            got[i].to_bits(),
            want[i],
            want[i].to_bits()
        );
    }
}
