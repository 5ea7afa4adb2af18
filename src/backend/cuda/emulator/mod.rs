//! The kernels of csrc/ run on the CPU, for tests on machines without a GPU. csrc/emu/ holds
//! the emulation: every CUDA thread is a fiber, blocks run in turn, barriers and warp shuffles
//! synchronize the fibers, and the rounded float intrinsics keep their IEEE meaning, so the
//! kernels built only from them (Philox normals, the ZO passes) must give the CPU's bits here as
//! on the GPU. Every load and store of a kernel is checked (csrc/emu/checker.cpp): one out of
//! its allocation, out of the shared memory the launch asked for, not aligned to its size,
//! racing with another thread's (no barrier between, or another block), or reading shared
//! memory the block never wrote fails the launch with a report naming the kernel, the threads
//! and the memory. What it cannot show: timing, and last-place differences of the device's libm
//! and of where nvcc (rather than the C++ compiler) contracts into fused multiply-adds.
//!
//! Two ways in:
//! - `emulator()` (unit tests): an `Emulator` that implements `Launch`, so the launchers of
//!   kernels.rs run unchanged on host buffers (zo_ops.rs, forward_ops.rs).
//! - `install()` (tests/cuda_*.rs, ZOFT_CUDA_EMULATOR=1): a stand-in for the CUDA driver and
//!   cuBLAS (the subset zoft calls, csrc/emu/driver.cpp and cublas.cpp), loaded under the
//!   sonames libcuda.so and libcublas.so before cudarc looks for them, so the whole unchanged
//!   CUDA backend runs on it.
//!
//! The sources are compiled once per process with the system C++ compiler ($CXX, or c++); the
//! kernels with its thread-sanitizer instrumentation, whose hooks the checker defines.
//! ZOFT_EMU_CHECK=0 turns the checks off (for long emulated runs).

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
const SELFTEST_KERNELS: &[&str] = &["zf_emu_selftest_deadlock", "zf_emu_selftest_checker"];

type Trampoline = unsafe extern "C" fn(*mut *mut c_void);
type KernelLookup = unsafe extern "C" fn(*const std::ffi::c_char) -> Option<Trampoline>;
type LaunchFn = unsafe extern "C" fn(
    *const std::ffi::c_char,
    Trampoline,
    *mut *mut c_void,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    usize,
) -> i32;

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

/// Plain float expressions in the kernels contract into fused multiply-adds where the CPU has
/// them, as nvcc contracts by default (-fmad=true), so that a kernel whose bits the tests pin
/// must get them from intrinsics, which neither compiler fuses (cuda_emu.h keeps them apart).
fn contraction() -> &'static [&'static str] {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        return &["-ffp-contract=fast", "-mfma"];
    }
    &["-ffp-contract=off"]
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
        let run = |what: &str, args: &[&std::ffi::OsStr]| -> Result<()> {
            let res = Command::new(cxx)
                // _longjmp between fiber stacks is what the scheduler does; the fortified longjmp
                // would take it for stack corruption.
                .args(["-std=c++20", "-O2", "-fPIC"])
                .arg("-U_FORTIFY_SOURCE")
                .arg("-I")
                .arg(&emu)
                .arg("-I")
                .arg(&csrc)
                .args(args)
                .output()
                .map_err(|e| anyhow!("running the C++ compiler {cxx:?}: {e}"))?;
            if !res.status.success() {
                bail!(
                    "compiling {what} for the CPU failed:\n{}",
                    String::from_utf8_lossy(&res.stderr)
                );
            }
            Ok(())
        };
        // The kernels alone carry the checker's instrumentation; -z defs makes a hook the
        // compiler wants and checker.cpp lacks a build error, not a failure to load. Static
        // initializers (ZF_SHARED's) need no locking: launches run one at a time.
        let kernels = dir.join("kernels_emulated.o");
        let mut args: Vec<&std::ffi::OsStr> = [
            "-fsanitize=thread",
            "-fno-threadsafe-statics",
            // A float4 load stays one 16-byte access, whose alignment the checker can see.
            "-fno-tree-sra",
            "-fno-ipa-sra",
            "-c",
        ]
        .iter()
        .chain(contraction())
        .map(|a| a.as_ref())
        .collect();
        args.extend([unit.as_os_str(), "-o".as_ref(), kernels.as_os_str()]);
        run("the kernels", &args)?;
        let link = |out: &Path, soname: &str, sources: &[&Path]| -> Result<()> {
            let mut args: Vec<&std::ffi::OsStr> = vec!["-shared".as_ref(), "-Wl,-z,defs".as_ref()];
            let soname = format!("-Wl,-soname,{soname}");
            args.push(soname.as_ref());
            args.extend(sources.iter().map(|p| p.as_os_str()));
            args.extend(["-o".as_ref(), out.as_os_str()]);
            run(&out.display().to_string(), &args)
        };
        let driver = dir.join("libcuda.so");
        link(
            &driver,
            "libcuda.so",
            &[
                &kernels,
                &emu.join("runtime.cpp"),
                &emu.join("driver.cpp"),
                &emu.join("checker.cpp"),
            ],
        )?;
        let blas = dir.join("libcublas.so");
        link(&blas, "libcublas.so", &[&emu.join("cublas.cpp")])?;
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
        // SAFETY: the setters' signatures in cublas.cpp; host_gemm, and the driver library
        // (kept in the Emulator, which lives as long as the process) outlive every call.
        unsafe {
            let set = blas.get::<unsafe extern "C" fn(HostGemm)>(b"zf_emu_set_host_gemm")?;
            set(host_gemm);
            let check = *driver.get::<RangeCheck>(b"zf_check_device_range")?;
            let set = blas.get::<unsafe extern "C" fn(RangeCheck)>(b"zf_emu_set_range_check")?;
            set(check);
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(Emulator {
            driver,
            _blas: blas,
        })
    }
}

/// One C++ file: the dynamic shared arrays (and their list, for the checker), every csrc/*.cu
/// with `__shared__` made `ZF_SHARED` (static: a block's threads share it; blocks run one at a
/// time), and a trampoline per kernel of KERNELS that unpacks a CUDA-style parameter array into
/// the kernel's arguments.
fn translation_unit(csrc: &Path) -> Result<String> {
    let mut sources: Vec<PathBuf> = std::fs::read_dir(csrc)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    sources.push(csrc.join("emu/selftest.inc"));
    let mut unit = String::from(
        "#include \"cuda_emu.h\"\n#include <cstring>\n#include <type_traits>\n#include <utility>\n",
    );
    let mut body = String::new();
    let mut dynamic = Vec::new();
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
            dynamic.push(format!("(float*){name}"));
        }
        writeln!(body, "#line 1 \"{}\"", path.display())?;
        for line in src.lines() {
            match line.split_once("__shared__") {
                Some((head, _)) if head.trim_end().ends_with("extern") => {
                    body.push_str(&line.replace("extern __shared__", "extern"))
                }
                Some((head, decl)) => {
                    let shared = static_shared(decl).ok_or_else(|| {
                        anyhow!("{}: unexpected shared array: {line}", path.display())
                    })?;
                    body.push_str(head);
                    body.push_str(&shared);
                }
                None => body.push_str(line),
            }
            body.push('\n');
        }
    }
    dynamic.push("nullptr".into()); // never empty: C++ has no zero-length arrays
    writeln!(
        unit,
        "extern \"C\" float* const zf_emu_dsmem_arrays[] = {{{}}};\n\
         extern \"C\" const unsigned zf_emu_dsmem_count = {};\n\
         extern \"C\" const size_t zf_emu_dsmem_bytes = {DYNAMIC_SMEM_BYTES};",
        dynamic.join(", "),
        dynamic.len() - 1
    )?;
    unit.push_str(&body);
    // Back in the generated file: the trampolines and the lookup.
    unit.push_str("#line 1 \"kernels_emulated.cpp (generated)\"\n");
    unit.push_str(
        "\ntemplate <typename F, F f> struct ZfTrampoline;\n\
         template <typename... A, void (*f)(A...)> struct ZfTrampoline<void (*)(A...), f> {\n\
         \x20 // Not checked: the parameter array is the launcher's memory, not the kernel's.\n\
         \x20 template <size_t... I> __attribute__((no_sanitize(\"thread\")))\n\
         \x20 static void call(void** p, std::index_sequence<I...>) {\n\
         \x20   f(*static_cast<std::remove_cv_t<A>*>(p[I])...);\n\
         \x20 }\n\
         \x20 __attribute__((no_sanitize(\"thread\")))\n\
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

/// ` T name[N]...; // ...` (what follows `__shared__`) as `ZF_SHARED(T, name, [N]...); // ...`
/// (csrc/emu/cuda_emu.h); None for any other form.
fn static_shared(decl: &str) -> Option<String> {
    let (decl, rest) = decl.split_once(';')?;
    let (head, dims) = match decl.find('[') {
        Some(i) => decl.split_at(i),
        None => (decl, ""),
    };
    let (ty, name) = head.trim().rsplit_once(char::is_whitespace)?;
    let ident = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_');
    if !ident(name) || ty.contains(',') || ty.trim().is_empty() || dims.contains(',') {
        return None;
    }
    Some(format!(
        "ZF_SHARED({}, {name}, {});{rest}",
        ty.trim(),
        dims.trim()
    ))
}

type RangeCheck = unsafe extern "C" fn(usize, usize, *mut std::ffi::c_char, usize) -> i32;

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
                cname.as_ptr(),
                kernel,
                params.as_mut_ptr(),
                grid.0,
                grid.1,
                grid.2,
                block.0,
                block.1,
                block.2,
                smem,
            )
        });
        match rc {
            0 => Ok(()),
            2 => bail!("{}", self.last_report()),
            _ => bail!("kernel {name} (grid {grid:?}, block {block:?}) deadlocked in the emulator"),
        }
    }
}

impl Emulator {
    /// What the checker said of the last launch it stopped.
    fn last_report(&self) -> String {
        // SAFETY: checker.cpp's accessor; the report is a NUL-terminated static buffer.
        unsafe {
            let report = self
                .driver
                .get::<unsafe extern "C" fn() -> *const std::ffi::c_char>(b"zf_emu_last_report")
                .expect("zf_emu_last_report is defined by checker.cpp");
            std::ffi::CStr::from_ptr(report())
                .to_string_lossy()
                .into_owned()
        }
    }

    /// Lets kernels launched from this thread use `bytes` bytes at `base` as device memory (host
    /// buffers given to them directly, in the unit tests); the checker refuses accesses outside
    /// every such range.
    #[cfg(test)]
    fn track(&self, base: usize, bytes: usize) {
        // SAFETY: checker.cpp's registration, which only records the range.
        unsafe {
            let track = self
                .driver
                .get::<unsafe extern "C" fn(usize, usize)>(b"zf_check_track_host")
                .expect("zf_check_track_host is defined by checker.cpp");
            track(base, bytes);
        }
    }
}

/// The address of a host buffer the kernel only reads, as a kernel argument; the kernel may
/// read all of the buffer and nothing else.
#[cfg(test)]
pub(crate) fn addr<T>(v: &[T]) -> u64 {
    if let Some(emu) = emulator() {
        emu.track(v.as_ptr() as usize, std::mem::size_of_val(v));
    }
    v.as_ptr() as u64
}

/// The address of a host buffer the kernel writes (taken from a unique borrow, so that the
/// compiler does not assume the buffer unchanged); the kernel may use all of the buffer and
/// nothing else.
#[cfg(test)]
pub(crate) fn addr_mut<T>(v: &mut [T]) -> u64 {
    addr(v);
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

    // The emulated driver's entry points the tests below call directly.
    type MemAlloc = unsafe extern "C" fn(*mut u64, usize) -> i32;
    type MemcpyDtoH = unsafe extern "C" fn(*mut c_void, u64, usize) -> i32;

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

    /// zf_emu_selftest_checker in `mode` on the first 8 floats of a 16-float buffer (the other
    /// 8 are not the kernel's), blocks of 64 threads.
    fn checker_case(emu: &Emulator, mode: i32, grid: u32, smem: usize) -> (Result<()>, Vec<f32>) {
        let mut v = vec![f32::NAN; 16];
        let args = Args::default().ptr(addr_mut(&mut v[..8])).i32(8).i32(mode);
        let res = emu.launch(
            "zf_emu_selftest_checker",
            (grid, 1, 1),
            (64, 1, 1),
            smem,
            args,
        );
        (res, v)
    }

    #[test]
    fn the_checker_reports_accesses_out_of_bounds_and_races() {
        let Some(emu) = emulator() else { return };
        let cases: &[(i32, u32, usize, &[&str])] = &[
            (
                1,
                1,
                0,
                &[
                    "thread (0, 0, 0) of block (0, 0, 0) writes 4 bytes",
                    "outside every device allocation: 0 bytes past the end of the 32-byte one",
                ],
            ),
            (
                2,
                1,
                0,
                &[
                    "race on static shared array tile (256 bytes)",
                    "thread (32, 0, 0) of block (0, 0, 0) reads 4 bytes",
                    "that thread (0, 0, 0) of block (0, 0, 0) wrote, with no __syncthreads between",
                ],
            ),
            (
                3,
                2,
                0,
                &[
                    "race on device memory",
                    "thread (0, 0, 0) of block (1, 0, 0) writes",
                    "that thread (0, 0, 0) of block (0, 0, 0) wrote",
                    "the blocks of a launch are not ordered",
                ],
            ),
            (
                5,
                1,
                0,
                &[
                    "thread (1, 0, 0) of block (0, 0, 0) reads 4 bytes",
                    "or warp barrier",
                ],
            ),
            (
                6,
                1,
                32,
                &[
                    "reads 4 bytes",
                    "offset 32 of dynamic shared memory, of which the launch asked for 32 bytes",
                ],
            ),
            (
                7,
                1,
                0,
                &[
                    "thread (5, 0, 0) of block (0, 0, 0) writes 4 bytes",
                    "that thread (3, 0, 0)",
                ],
            ),
            (
                8,
                1,
                0,
                &[
                    "reads 16 bytes",
                    "which is not 16-byte aligned (a GPU faults",
                ],
            ),
            (
                9,
                3,
                0,
                &[
                    "thread (0, 0, 0) of block (2, 0, 0) writes 4 bytes",
                    "that threads of several blocks read",
                ],
            ),
            (
                10,
                1,
                0,
                &[
                    "reads 4 bytes",
                    "in static shared array tile (256 bytes), which no thread of this block wrote",
                ],
            ),
        ];
        for &(mode, grid, smem, says) in cases {
            let (res, v) = checker_case(emu, mode, grid, smem);
            let err = res.unwrap_err().to_string();
            assert!(
                err.starts_with("kernel zf_emu_selftest_checker (grid ("),
                "mode {mode}: {err}"
            );
            assert!(
                err.contains("[in zf_emu_selftest_checker+"),
                "mode {mode}: {err}"
            );
            for s in says {
                assert!(err.contains(s), "mode {mode}: {s:?} not in {err:?}");
            }
            // The launch stopped before the offending access: nothing past out[8) changed.
            assert!(v[8..].iter().all(|x| x.is_nan()), "mode {mode}: {v:?}");
        }
    }

    #[test]
    fn the_checker_passes_what_barriers_order() {
        let Some(emu) = emulator() else { return };
        // Through __syncthreads: thread t wrote tile[t], thread i < 8 reads tile[63 - i].
        let (res, v) = checker_case(emu, 0, 1, 0);
        res.unwrap();
        let want: Vec<f32> = (0..8).map(|i| (63 - i) as f32).collect();
        assert_eq!(v[..8], want);
        // Through a shuffle, within a warp.
        let (res, v) = checker_case(emu, 4, 1, 0);
        res.unwrap();
        assert_eq!(v[1], 2.0);
    }

    #[test]
    fn the_driver_fails_launches_as_a_gpu_would_and_fresh_memory_is_garbage() {
        use std::ffi::{c_char, CStr};
        use std::ptr::null_mut;
        let Some(emu) = emulator() else { return };
        type Launch = unsafe extern "C" fn(
            *mut c_void,
            u32,
            u32,
            u32,
            u32,
            u32,
            u32,
            u32,
            *mut c_void,
            *mut *mut c_void,
            *mut *mut c_void,
        ) -> i32;
        type Describe = unsafe extern "C" fn(i32, *mut *const c_char) -> i32;
        // SAFETY: driver.cpp's entry points, with the CUDA driver API's signatures.
        unsafe {
            let d = &emu.driver;
            let alloc = d.get::<MemAlloc>(b"cuMemAlloc_v2");
            let free = d
                .get::<unsafe extern "C" fn(u64) -> i32>(b"cuMemFree_v2")
                .unwrap();
            let dtoh = d.get::<MemcpyDtoH>(b"cuMemcpyDtoH_v2").unwrap();
            let function = d
                .get::<unsafe extern "C" fn(*mut *mut c_void, *mut c_void, *const c_char) -> i32>(
                    b"cuModuleGetFunction",
                )
                .unwrap();
            let launch = d.get::<Launch>(b"cuLaunchKernel").unwrap();
            let name = d.get::<Describe>(b"cuGetErrorName").unwrap();
            let string = d.get::<Describe>(b"cuGetErrorString").unwrap();
            let describe = |f: &Describe, rc: i32| {
                let mut s = std::ptr::null();
                f(rc, &mut s);
                CStr::from_ptr(s).to_string_lossy().into_owned()
            };

            let mut buf = 0u64;
            assert_eq!(alloc.unwrap()(&mut buf, 32), 0);
            let mut fresh = [0u8; 32];
            assert_eq!(dtoh(fresh.as_mut_ptr().cast(), buf, 32), 0);
            assert_eq!(fresh, [0xff; 32], "fresh device memory reads as NaN");

            let mut kernel = null_mut();
            assert_eq!(
                function(&mut kernel, null_mut(), c"zf_emu_selftest_checker".as_ptr()),
                0
            );
            // zf_emu_selftest_checker in `mode` on buf, blocks of 64 threads; the result code.
            let run = |mode: i32, grid: (u32, u32), smem: u32| {
                let (mut out, mut n, mut mode) = (buf, 8i32, mode);
                let mut params: [*mut c_void; 3] = [
                    (&mut out as *mut u64).cast(),
                    (&mut n as *mut i32).cast(),
                    (&mut mode as *mut i32).cast(),
                ];
                let (gx, gy) = grid;
                let args = params.as_mut_ptr();
                launch(
                    kernel,
                    gx,
                    gy,
                    1,
                    64,
                    1,
                    1,
                    smem,
                    null_mut(),
                    args,
                    null_mut(),
                )
            };
            for (mode, blocks, code, says) in [
                (
                    1,
                    1,
                    "CUDA_ERROR_ILLEGAL_ADDRESS",
                    "outside every device allocation: 0 bytes past the end of the 32-byte one",
                ),
                (
                    3,
                    2,
                    "CUDA_ERROR_LAUNCH_FAILED",
                    "race on device memory (offset 0 of the 32-byte",
                ),
                (
                    8,
                    1,
                    "CUDA_ERROR_MISALIGNED_ADDRESS",
                    "which is not 16-byte aligned",
                ),
                (
                    10,
                    1,
                    "CUDA_ERROR_LAUNCH_FAILED",
                    "which no thread of this block wrote",
                ),
            ] {
                let rc = run(mode, (blocks, 1), 0);
                assert_eq!(describe(&name, rc), code, "mode {mode}");
                let text = describe(&string, rc);
                assert!(
                    text.starts_with("kernel zf_emu_selftest_checker") && text.contains(says),
                    "mode {mode}: {text}"
                );
            }

            // A grid stops at 65535 blocks in y; over 48 KB of shared memory needs the kernel's
            // opt-in, up to 227 KB, as on an H100 (mode 0 is a correct kernel).
            let set = d
                .get::<unsafe extern "C" fn(*mut c_void, i32, i32) -> i32>(b"cuFuncSetAttribute")
                .unwrap();
            let correct = |grid_y: u32, smem: u32| describe(&name, run(0, (1, grid_y), smem));
            const MAX_DYNAMIC_SMEM: i32 = 8;
            assert_eq!(set(kernel, MAX_DYNAMIC_SMEM, 48 << 10), 0);
            assert_eq!(correct(1, 48 << 10), "CUDA_SUCCESS");
            assert_eq!(correct(1, 64 << 10), "CUDA_ERROR_INVALID_VALUE");
            assert_eq!(set(kernel, MAX_DYNAMIC_SMEM, 64 << 10), 0);
            assert_eq!(correct(1, 64 << 10), "CUDA_SUCCESS");
            assert_eq!(
                describe(&name, set(kernel, MAX_DYNAMIC_SMEM, 228 << 10)),
                "CUDA_ERROR_INVALID_VALUE"
            );
            assert_eq!(correct(65536, 0), "CUDA_ERROR_INVALID_VALUE");
            assert_eq!(free(buf), 0);
            assert_eq!(
                free(buf),
                1,
                "a pointer freed already is CUDA_ERROR_INVALID_VALUE"
            );
        }
    }

    #[test]
    fn the_emulated_cublas_multiplies_and_refuses_operands_past_their_allocations() {
        use std::ptr::null_mut;
        let Some(emu) = emulator() else { return };
        type Gemm = unsafe extern "C" fn(
            *mut c_void,
            i32,
            i32,
            i32,
            i32,
            i32,
            *const f32,
            u64,
            i32,
            i32,
            u64,
            i32,
            i32,
            *const f32,
            u64,
            i32,
            i32,
            i32,
            i32,
        ) -> i32;
        const N: i32 = 0;
        const F32: i32 = 0;
        // SAFETY: driver.cpp's and cublas.cpp's entry points, with CUDA's signatures.
        unsafe {
            let alloc = emu.driver.get::<MemAlloc>(b"cuMemAlloc_v2").unwrap();
            let htod = emu
                .driver
                .get::<unsafe extern "C" fn(u64, *const c_void, usize) -> i32>(b"cuMemcpyHtoD_v2")
                .unwrap();
            let dtoh = emu.driver.get::<MemcpyDtoH>(b"cuMemcpyDtoH_v2").unwrap();
            let gemm = emu._blas.get::<Gemm>(b"cublasGemmEx").unwrap();
            let upload = |v: &[f32]| {
                let mut d = 0u64;
                assert_eq!(alloc(&mut d, 4 * v.len()), 0);
                assert_eq!(htod(d, v.as_ptr().cast(), 4 * v.len()), 0);
                d
            };
            // Column-major a [2 x 3], b [3 x 2].
            let (a, b) = (
                [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0],
                [1.0f32, 0.5, -1.0, 2.0, 0.0, 1.0],
            );
            let (da, db, dc) = (upload(&a), upload(&b), upload(&[f32::NAN; 4]));
            let (one, zero) = (1.0f32, 0.0f32);
            let run = |k: i32, lda: i32| {
                gemm(
                    null_mut(),
                    N,
                    N,
                    2,
                    2,
                    k,
                    &one,
                    da,
                    F32,
                    lda,
                    db,
                    F32,
                    3,
                    &zero,
                    dc,
                    F32,
                    2,
                    0,
                    -1,
                )
            };
            assert_eq!(run(3, 2), 0);
            let mut c = [0.0f32; 4];
            assert_eq!(dtoh(c.as_mut_ptr().cast(), dc, 16), 0);
            let want: Vec<f32> = (0..4)
                .map(|idx| {
                    let (i, j) = (idx % 2, idx / 2);
                    (0..3).map(|l| a[i + 2 * l] * b[l + 3 * j]).sum()
                })
                .collect();
            assert_eq!(c.to_vec(), want);
            // lda 3 spans (3 - 1) 3 + 2 = 8 floats of a 6-float allocation: refused as a failure.
            assert_eq!(run(3, 3), 13, "CUBLAS_STATUS_EXECUTION_FAILED");
            // lda below the rows of a: refused as cuBLAS does.
            assert_eq!(run(3, 1), 7, "CUBLAS_STATUS_INVALID_VALUE");
        }
    }

    #[test]
    fn shared_declarations_are_rewritten_or_refused() {
        assert_eq!(
            static_shared(" float scratch[32];  // per warp").as_deref(),
            Some("ZF_SHARED(float, scratch, [32]);  // per warp")
        );
        assert_eq!(
            static_shared(" double tile[32][33];").as_deref(),
            Some("ZF_SHARED(double, tile, [32][33]);")
        );
        assert_eq!(
            static_shared(" unsigned long long count;").as_deref(),
            Some("ZF_SHARED(unsigned long long, count, );")
        );
        for unexpected in [" float a[2], b[2];", " float a[2]", " float[4];", " x;"] {
            assert_eq!(static_shared(unexpected), None, "{unexpected:?}");
        }
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
