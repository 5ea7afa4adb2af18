//! Runtime dispatch of plain-Rust loops to the widest vector unit.
//!
//! The crate is built for baseline x86-64 (SSE2), so a loop the compiler vectorizes runs four
//! lanes wide. `wide!` compiles one body three times, for AVX-512, for AVX2 + FMA and for the
//! baseline, and picks one at run time. Every variant runs the same IEEE operations in the
//! same order (Rust never contracts a * b + c into an FMA on its own), so all three give the
//! same bits: only the speed differs.

/// A vector unit `wide!` bodies can be compiled for, narrowest first (so `min` caps).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Baseline,
    Avx2,
    Avx512,
}

static LEVEL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// The level in use: detected once, capped by `ZOFT_SIMD=baseline|avx2|avx512` (to compare
/// variants).
pub fn level() -> Level {
    match LEVEL.load(std::sync::atomic::Ordering::Relaxed) {
        1 => Level::Avx512,
        2 => Level::Avx2,
        3 => Level::Baseline,
        _ => {
            let cap = std::env::var("ZOFT_SIMD").unwrap_or_default();
            let l = match parse_cap(&cap) {
                Ok(cap) => detected().min(cap),
                Err(e) => {
                    eprintln!("zoft: {e}; using the widest vector unit this CPU has");
                    detected()
                }
            };
            store(l);
            l
        }
    }
}

/// The cap a `ZOFT_SIMD` value asks for; empty means none.
pub fn parse_cap(s: &str) -> Result<Level, String> {
    match s {
        "" | "avx512" => Ok(Level::Avx512),
        "avx2" => Ok(Level::Avx2),
        "baseline" => Ok(Level::Baseline),
        other => Err(format!(
            "ZOFT_SIMD={other:?} is not one of baseline, avx2, avx512"
        )),
    }
}

/// Runs later `wide!` calls at `l`, or at the detected level if that is lower. All levels give
/// the same bits, which the tests check by switching between them.
pub fn force(l: Level) {
    store(detected().min(l));
}

fn store(l: Level) {
    let code = match l {
        Level::Avx512 => 1,
        Level::Avx2 => 2,
        Level::Baseline => 3,
    };
    LEVEL.store(code, std::sync::atomic::Ordering::Relaxed);
}

fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") {
            if has!("avx512f") && has!("avx512vl") && has!("avx512bw") {
                return Level::Avx512;
            }
            return Level::Avx2;
        }
    }
    Level::Baseline
}

/// Asks the CPU to bring the `len` floats from `ptr` into the L1 cache, so that memory is read
/// while the caller computes something else (the ZO passes generate z meanwhile). Only the
/// addresses are used, so the caller may be writing those floats through another reference.
#[inline]
pub fn prefetch(ptr: *const f32, len: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..len).step_by(16) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch never faults and reads nothing the program sees.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ptr.wrapping_add(line).cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (ptr, len);
}

/// `wide! { fn name(args) -> ret { body } }` defines `name`, whose body is compiled for each
/// `Level` and dispatched at run time (see the module doc). Arguments are passed by value to
/// the chosen variant, so they must be plain types (slices, references, numbers).
macro_rules! wide {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                match $crate::backend::cpu::simd::level() {
                    // SAFETY: level() detected these features at run time.
                    $crate::backend::cpu::simd::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::backend::cpu::simd::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::backend::cpu::simd::Level::Baseline => {}
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use wide;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_parse_and_a_typo_is_named() {
        assert_eq!(parse_cap(""), Ok(Level::Avx512));
        assert_eq!(parse_cap("avx2"), Ok(Level::Avx2));
        assert_eq!(parse_cap("baseline"), Ok(Level::Baseline));
        let e = parse_cap("avx-512").unwrap_err();
        assert!(e.contains("\"avx-512\"") && e.contains("baseline"), "{e}");
    }
}
