//! out[m, n] = x[m, k] · w[n, k]^T with bf16 inputs and f32 accumulation on Intel AMX tiles:
//! the contract of `gemm_bf16` (and of cuBLAS's bf16 GEMM), on the matrix unit of Sapphire
//! Rapids and later Xeons. One `tdpbf16ps` multiplies a 16 x 32 bf16 tile of x by a 32 x 16 one
//! of w into a 16 x 16 f32 tile: 16 384 flops, against 64 for one AVX512-BF16 `vdpbf16ps`.
//!
//! Layout: x is converted to bf16 pairs as `gemm_bf16` does, zero-padded to whole 32-row
//! blocks and whole 16-pair (32-value) steps of k, so a 16-row slice of it is an A tile as
//! stored. w is packed `NR` = 32 rows at a time into [pairs][32], so 16 pairs of 16 rows are a
//! B tile in AMX's pair-interleaved layout, with a row stride of 128 bytes. The microkernel
//! holds a 32 x 32 block of out in four accumulator tiles and, per step of k, loads two A and
//! two B tiles: every tile load feeds two products.
//!
//! Rust has no stable AMX intrinsics, so the tile instructions are inline assembly. Tiles are
//! state of the thread that configured them; the compiler never uses them, so a configuration
//! made at the start of a task holds until the task releases it.

use super::gemm_bf16::{to_pairs_padded, WeightRows};
use super::SendPtr;
use rayon::prelude::*;
use std::sync::OnceLock;

/// Rows of x per microkernel call: two 16-row A tiles.
pub const MR: usize = 32;
/// Rows of w (output columns) per packed tile: two 16-column B tiles.
const NR: usize = 32;
/// Pairs of k per step: one 64-byte tile row.
const KP_STEP: usize = 16;

/// Whether this CPU has AMX-BF16 and the OS lets this process use the tile registers (Linux
/// hands out the tile state only on request, once per process).
pub fn available() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| super::gemm_bf16::available() && cpu_has_amx_bf16() && request_tiles())
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_amx_bf16() -> bool {
    // CPUID leaf 7 subleaf 0, EDX: bit 22 AMX-BF16, bit 24 AMX-TILE.
    // Leaf 7 exists on every CPU that has AVX512-BF16, checked first by `available`.
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    edx & (1 << 22) != 0 && edx & (1 << 24) != 0
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_amx_bf16() -> bool {
    false
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tiles() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only asks for a permission; it touches no memory.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_tiles() -> bool {
    false
}

/// Pairs of k after padding to whole steps.
fn padded_pairs(k: usize) -> usize {
    k.div_ceil(2).div_ceil(KP_STEP) * KP_STEP
}

/// Bytes a call holds besides its operands: x's padded pairs and one packed tile per thread
/// (and, for a built w, one tile of its rows in f32 per thread).
pub fn scratch_bytes(m: usize, k: usize, threads: usize, w: WeightRows) -> usize {
    let kp = padded_pairs(k);
    (m.div_ceil(MR) * MR * kp + threads.max(1) * kp * NR) * 4
        + threads.max(1) * w.buffer_bytes(NR, k)
}

/// out = x · w^T for f32 x [m][k] and w [n][k], both rounded to bf16. Panics when `available`
/// is false.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    x: &[f32],
    w: WeightRows,
    out: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    threads: usize,
) {
    assert!(
        available(),
        "the AMX GEMM needs AMX-BF16 and the OS's tile permission"
    );
    assert_eq!(x.len(), m * k);
    w.check(n, k);
    assert_eq!(out.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    let kp = padded_pairs(k);
    let m_pad = m.div_ceil(MR) * MR;
    let pairs = to_pairs_padded(x, m, k, m_pad, kp);
    let tiles = n.div_ceil(NR);
    let per_task = tiles.div_ceil(threads.max(1) * 4).max(1);
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..tiles)
        .step_by(per_task)
        .collect::<Vec<_>>()
        .into_par_iter()
        .for_each_init(
            || (vec![0u32; kp * NR], vec![]),
            |(tile, rows), t0| {
                let _tiles = TileConfig::load();
                for t in t0..(t0 + per_task).min(tiles) {
                    let n0 = t * NR;
                    w.pack(n, k, n0, NR, rows, tile);
                    let cols = NR.min(n - n0);
                    for r0 in (0..m).step_by(MR) {
                        let rows = MR.min(m - r0);
                        let a = &pairs[r0 * kp..(r0 + MR) * kp];
                        // SAFETY: tasks write disjoint column ranges [n0, n0 + cols) of out;
                        // the tile configuration is loaded on this thread.
                        unsafe {
                            if rows == MR && cols == NR {
                                block(a, kp, tile, out_ptr.get().add(r0 * n + n0), n);
                            } else {
                                let mut buf = [0f32; MR * NR];
                                block(a, kp, tile, buf.as_mut_ptr(), NR);
                                for (r, src) in buf.chunks(NR).take(rows).enumerate() {
                                    let dst = out_ptr.get().add((r0 + r) * n + n0);
                                    std::ptr::copy_nonoverlapping(src.as_ptr(), dst, cols);
                                }
                            }
                        }
                    }
                }
            },
        );
}

/// The tile configuration of this thread while it lives: eight 16-row x 64-byte tiles. The
/// task that holds it must not wait on rayon (join, a nested parallel loop): another task run
/// on this thread meanwhile would release the tiles under it.
struct TileConfig;

/// The 64-byte operand of `ldtilecfg`, palette 1.
#[repr(C, align(64))]
struct TileCfgBytes {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    fn load() -> Self {
        let mut cfg = TileCfgBytes {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes_per_row: [0; 16],
            rows: [0; 16],
        };
        cfg.bytes_per_row[..8].fill(64);
        cfg.rows[..8].fill(16);
        // SAFETY: the CPU has AMX and the process holds the tile permission (`available`).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly));
        }
        TileConfig
    }
}

impl Drop for TileConfig {
    fn drop(&mut self) {
        // SAFETY: as in `load`; releasing returns the tiles to their initial state.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem));
        }
    }
}

/// One 32 x 32 block of out over the whole (padded) k: c[r][j] = sum_p a[r][p] · b[p][j].
///
/// tmm0..tmm3 accumulate the quadrants (rows 0-15 / 16-31 by columns 0-15 / 16-31), tmm4 and
/// tmm5 hold the two A tiles of a step, tmm6 and tmm7 the two B tiles.
///
/// # Safety
/// The thread's tiles are configured (`TileConfig`); `a` holds MR rows of `kp` pairs with kp a
/// multiple of KP_STEP; `b` holds kp rows of NR pairs; `c` is valid for MR rows of NR f32 at a
/// row stride of `ldc` floats.
#[cfg(target_arch = "x86_64")]
unsafe fn block(a: &[u32], kp: usize, b: &[u32], c: *mut f32, ldc: usize) {
    debug_assert!(kp.is_multiple_of(KP_STEP) && kp > 0 && a.len() >= MR * kp && b.len() >= kp * NR);
    let a_lo = a.as_ptr();
    let a_hi = a.as_ptr().add(16 * kp);
    let c_hi = c.add(16 * ldc);
    std::arch::asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "2:",
        // Each load sits right before the first product that needs it, so the next step's
        // loads overlap this step's last products.
        "tileloadd tmm4, [{a_lo} + {lda}*1]",
        "tileloadd tmm6, [{b} + {ldb}*1]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tileloadd tmm7, [{b} + {ldb}*1 + 64]",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tileloadd tmm5, [{a_hi} + {lda}*1]",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        // Next 16 pairs: 64 bytes along x's rows, 16 rows of 128 bytes down the packed tile.
        "add {a_lo}, 64",
        "add {a_hi}, 64",
        "add {b}, 2048",
        "dec {steps}",
        "jnz 2b",
        "tilestored [{c_lo} + {ldc}*1], tmm0",
        "tilestored [{c_lo} + {ldc}*1 + 64], tmm1",
        "tilestored [{c_hi} + {ldc}*1], tmm2",
        "tilestored [{c_hi} + {ldc}*1 + 64], tmm3",
        a_lo = inout(reg) a_lo => _,
        a_hi = inout(reg) a_hi => _,
        b = inout(reg) b.as_ptr() => _,
        steps = inout(reg) kp / KP_STEP => _,
        lda = in(reg) kp * 4,
        ldb = in(reg) NR * 4,
        c_lo = in(reg) c,
        c_hi = in(reg) c_hi,
        ldc = in(reg) ldc * 4,
        options(nostack),
    );
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block(_: &[u32], _: usize, _: &[u32], _: *mut f32, _: usize) {
    unreachable!("available() is false off x86_64")
}

#[cfg(test)]
mod tests {
    use super::super::gemm_bf16::tests::check_against_rounded_product;
    use super::*;

    /// Against an f64 product of the same bf16-rounded inputs, over shapes with row, column
    /// and k tails (k odd, k below one step) and full blocks.
    #[test]
    fn matches_f64_product_of_rounded_inputs() {
        if !available() {
            eprintln!("skipped: this CPU (or OS) offers no AMX-BF16");
            return;
        }
        let shapes = [
            (1, 1, 1),
            (32, 32, 32),
            (33, 70, 77),
            (64, 96, 576),
            (100, 33, 1536),
            (5, 200, 31),
        ];
        check_against_rounded_product(13, &shapes, |x, w, out, m, n, k| {
            matmul(x, WeightRows::Stored(w), out, m, n, k, 2)
        });
    }
}
