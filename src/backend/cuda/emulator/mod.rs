//! The kernels of csrc/ run on the CPU, for tests on machines without a GPU. csrc/emu/ holds
//! the emulation: every CUDA thread is a fiber, blocks run in turn, barriers and warp shuffles
//! synchronize the fibers, and the rounded float intrinsics keep their IEEE meaning, so the
//! kernels built only from them (Philox normals, the ZO passes) must give the CPU's bits here as
//! on the GPU. What it cannot show: timing, races between blocks, and last-place differences of
//! the device's libm and fma contraction.
//!
//! Two ways in:
//! - `emulator()` (unit tests): an `Emulator` that implements `Launch`, so the launchers of
//!   kernels.rs run unchanged on host buffers (zo_ops.rs, forward_ops.rs).
//! - `install()` (tests/cuda_*.rs, ZOFT_CUDA_EMULATOR=1): a stand-in for the CUDA driver and
//!   cuBLAS (the subset zoft calls, csrc/emu/driver.cpp and cublas.cpp), loaded under the
//!   sonames libcuda.so and libcublas.so before cudarc looks for them, so the whole unchanged
//!   CUDA backend runs on it.
//!
//! The sources are compiled once per process with the system C++ compiler ($CXX, or c++).

#[cfg(test)]
mod forward_ops;
#[cfg(test)]
mod zo_ops;

use super::context::{Args, Launch, KERNELS};
use anyhow::{anyhow, bail, Result};
use std::ffi::c_void;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Bytes of dynamic shared memory each `extern __shared__` array gets (the largest an H100
/// block can opt into is 227 KB); csrc/emu/driver.cpp reports the same limit.
const DYNAMIC_SMEM_BYTES: usize = 256 * 1024;

/// Kernels of csrc/emu/selftest.inc, which test the emulator itself.
const SELFTEST_KERNELS: &[&str] = &["zf_emu_selftest_deadlock"];

type Trampoline = unsafe extern "C" fn(*mut *mut c_void);
type KernelLookup = unsafe extern "C" fn(*const std::ffi::c_char) -> Option<Trampoline>;
type LaunchFn =
    unsafe extern "C" fn(Trampoline, *mut *mut c_void, u32, u32, u32, u32, u32, u32) -> i32;

/// The emulated kernels and driver (libcuda.so) and cuBLAS (libcublas.so), loaded for the
/// life of the process.
pub struct Emulator {
    driver: libloading::Library,
    _blas: libloading::Library,
}

/// The emulator, built and loaded on first use. None (after saying why) when there is no C++
/// compiler, unless ZOFT_REQUIRE_KERNELS=1, where that fails as a missing nvcc does; a compiler
/// that rejects the sources always fails.
pub fn emulator() -> Option<&'static Emulator> {
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

/// Makes the emulated device the CUDA device of this process: after it, `CudaBackend::new(0)`
/// runs on the CPU. Returns false when the emulator cannot be built here (see `emulator`).
/// Call it only where no real driver is loaded (`cuda_available()` failed).
pub fn install() -> bool {
    emulator().is_some()
}

/// $CXX, or c++.
fn compiler() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "c++".into())
}

impl Emulator {
    fn build(cxx: &str) -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let csrc = root.join("csrc");
        let emu = csrc.join("emu");
        let dir = std::env::temp_dir().join(format!("zoft-emu-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let unit = dir.join("kernels_emulated.cpp");
        std::fs::write(&unit, translation_unit(&csrc)?)?;
        let compile = |out: &Path, soname: &str, sources: &[&Path]| -> Result<()> {
            let res = Command::new(cxx)
                // _longjmp between fiber stacks is what the scheduler does; the fortified longjmp
                // would take it for stack corruption.
                .args(["-std=c++20", "-O2", "-fPIC", "-shared", "-ffp-contract=off"])
                .arg("-U_FORTIFY_SOURCE")
                .arg(format!("-Wl,-soname,{soname}"))
                .arg("-I")
                .arg(&emu)
                .arg("-I")
                .arg(&csrc)
                .args(sources)
                .arg("-o")
                .arg(out)
                .output()
                .map_err(|e| anyhow!("running the C++ compiler {cxx:?}: {e}"))?;
            if !res.status.success() {
                bail!(
                    "compiling {soname} for the CPU failed:\n{}",
                    String::from_utf8_lossy(&res.stderr)
                );
            }
            Ok(())
        };
        let driver = dir.join("libcuda.so");
        compile(
            &driver,
            "libcuda.so",
            &[&unit, &emu.join("runtime.cpp"), &emu.join("driver.cpp")],
        )?;
        let blas = dir.join("libcublas.so");
        compile(&blas, "libcublas.so", &[&emu.join("cublas.cpp")])?;
        // Global, so that cudarc's dlopen("libcuda.so") and dlopen("libcublas.so") find these by
        // soname rather than searching the library path.
        let open = |p: &Path| -> Result<libloading::Library> {
            let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL;
            // SAFETY: libraries built just now from our sources; their initializers only set up
            // plain data.
            unsafe { libloading::os::unix::Library::open(Some(p), flags) }
                .map(Into::into)
                .map_err(|e| anyhow!("loading {}: {e}", p.display()))
        };
        let driver = open(&driver)?;
        let blas = open(&blas)?;
        // SAFETY: the setter's signature in cublas.cpp; host_gemm lives as long as the process.
        unsafe {
            let set = blas.get::<unsafe extern "C" fn(HostGemm)>(b"zf_emu_set_host_gemm")?;
            set(host_gemm);
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(Emulator {
            driver,
            _blas: blas,
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
    let mut unit = String::from(
        "#include \"cuda_emu.h\"\n#include <cstring>\n#include <type_traits>\n#include <utility>\n",
    );
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
    let selftest = csrc.join("emu/selftest.inc");
    writeln!(unit, "#line 1 \"{}\"", selftest.display())?;
    unit.push_str(&std::fs::read_to_string(&selftest)?);
    // Back in the generated file: the trampolines and the lookup.
    unit.push_str("#line 1 \"kernels_emulated.cpp (generated)\"\n");
    unit.push_str(
        "\ntemplate <typename F, F f> struct ZfTrampoline;\n\
         template <typename... A, void (*f)(A...)> struct ZfTrampoline<void (*)(A...), f> {\n\
         \x20 template <size_t... I> static void call(void** p, std::index_sequence<I...>) {\n\
         \x20   f(*static_cast<std::remove_cv_t<A>*>(p[I])...);\n\
         \x20 }\n\
         \x20 static void run(void** p) { call(p, std::index_sequence_for<A...>{}); }\n\
         };\n",
    );
    unit.push_str("extern \"C\" void (*zf_emu_kernel(const char* name))(void**) {\n");
    for k in KERNELS.iter().chain(SELFTEST_KERNELS) {
        writeln!(
            unit,
            "  if (!std::strcmp(name, \"{k}\")) return &ZfTrampoline<decltype(&{k}), &{k}>::run;"
        )?;
    }
    unit.push_str("  return nullptr;\n}\n");
    Ok(unit)
}

type HostGemm = unsafe extern "C" fn(i32, i32, i32, *const f32, *const f32, *mut f32);

/// The emulated cuBLAS's products, on all cores: out (column-major [m x n]) = a b^T for
/// row-major a [m x k] and b [n x k] (cublas.cpp widens, transposes and scales around it).
unsafe extern "C" fn host_gemm(
    m: i32,
    n: i32,
    k: i32,
    a: *const f32,
    b: *const f32,
    out: *mut f32,
) {
    let (m, n, k) = (m as usize, n as usize, k as usize);
    // SAFETY: cublas.cpp passes buffers of m k, n k and m n floats.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            m as isize,
            1,
            false,
            a,
            1,
            k as isize,
            b,
            k as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
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
        let cname = std::ffi::CString::new(name)?;
        // SAFETY: symbols of the library built from csrc, with these signatures.
        let (kernel, launch) = unsafe {
            let lookup = self.driver.get::<KernelLookup>(b"zf_emu_kernel")?;
            let launch = self.driver.get::<LaunchFn>(b"zf_emu_launch")?;
            (lookup(cname.as_ptr()), *launch)
        };
        let kernel = kernel.ok_or_else(|| anyhow!("unknown kernel {name}"))?;
        // SAFETY: the launcher's argument list mirrors the kernel's signature, as for the GPU;
        // the pointers it passes are host addresses the test owns.
        let rc = args.with_params(|params| unsafe {
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
        });
        if rc != 0 {
            bail!("kernel {name} (grid {grid:?}, block {block:?}) deadlocked in the emulator");
        }
        Ok(())
    }
}

/// The address of a host buffer the kernel only reads, as a kernel argument.
#[cfg(test)]
pub(crate) fn addr<T>(v: &[T]) -> u64 {
    v.as_ptr() as u64
}

/// The address of a host buffer the kernel writes (taken from a unique borrow, so that the
/// compiler does not assume the buffer unchanged).
#[cfg(test)]
pub(crate) fn addr_mut<T>(v: &mut [T]) -> u64 {
    v.as_mut_ptr() as u64
}

/// Relative norm error |got - want| / |want|.
#[cfg(test)]
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
#[cfg(test)]
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

#[cfg(test)]
mod launch_checks {
    //! The emulator's own failures: what a GPU would refuse or hang on is an error here.
    use super::*;

    fn out() -> Vec<f32> {
        vec![f32::NAN; 64]
    }

    #[test]
    fn a_block_that_can_never_finish_is_reported_not_hung() {
        let Some(emu) = emulator() else { return };
        let mut v = out();
        let args = Args::default().ptr(addr_mut(&mut v));
        let err = emu
            .launch("zf_emu_selftest_deadlock", (2, 1, 1), (32, 1, 1), 0, args)
            .unwrap_err();
        assert!(err.to_string().contains("deadlocked"), "{err}");
        // The fibers left waiting do not poison later launches.
        let mut words = vec![0u32; 8];
        let key = super::super::kernels::PhiloxKey {
            seed: 1,
            step: 2,
            tensor: 3,
        };
        super::super::kernels::philox_words(emu, addr_mut(&mut words), 2, key, 0).unwrap();
        let p = crate::rng::Philox::new(1, 2, 3);
        assert_eq!(words, [p.block(0), p.block(1)].concat());
    }

    #[test]
    fn launch_shapes_a_gpu_refuses_are_refused() {
        let Some(emu) = emulator() else { return };
        let mut v = out();
        for (block, smem, what) in [
            ((2048, 1, 1), 0, "threads"),
            ((0, 1, 1), 0, "threads"),
            ((32, 1, 1), DYNAMIC_SMEM_BYTES + 4, "shared memory"),
        ] {
            let args = Args::default().ptr(addr_mut(&mut v));
            let err = emu
                .launch("zf_emu_selftest_deadlock", (1, 1, 1), block, smem, args)
                .unwrap_err();
            assert!(err.to_string().contains(what), "{block:?} {smem}: {err}");
        }
        let err = emu
            .launch("no_such_kernel", (1, 1, 1), (32, 1, 1), 0, Args::default())
            .unwrap_err();
        assert!(
            err.to_string().contains("unknown kernel no_such_kernel"),
            "{err}"
        );
    }
}
