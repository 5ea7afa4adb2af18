//! out[m, n] = x[m, k] · w[n, k]^T with both operands rounded to bf16 and f32 accumulation,
//! on CPUs with AVX512-BF16 (`vdpbf16ps`: 32 multiply-adds per instruction, twice the f32 FMA
//! rate). The same contract as cuBLAS's bf16 GEMM on the GPU; the f32 GEMM stays the reference.
//!
//! Layout: k is taken in pairs, one u32 per pair (element 2p in the low half, 2p+1 in the high
//! half), so a row of x is already a row of pairs and one pair broadcasts to all 16 lanes. w is
//! packed a tile of `NR` rows at a time into [pairs][NR] so each step of the microkernel loads
//! three vectors of w and broadcasts `MR` pairs of x into 24 accumulators.

use super::SendPtr;
use rayon::prelude::*;

/// Rows of x per microkernel call.
const MR: usize = 8;
/// Rows of w (output columns) per packed tile: three 16-lane vectors.
const NR: usize = 48;

/// Round-to-nearest-even f32 -> bf16, as `vcvtneps2bf16` and CUDA's `__float2bfloat16_rn` do
/// for finite inputs; NaN stays NaN.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) as u32 | (bf16_bits(hi) as u32) << 16
}

/// Whether this CPU runs the bf16 kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Row-major [rows][cols] f32 as [rows][ceil(cols / 2)] bf16 pairs, an odd last column paired
/// with zero.
pub fn to_pairs(src: &[f32], rows: usize, cols: usize) -> Vec<u32> {
    to_pairs_padded(src, rows, cols, rows, cols.div_ceil(2))
}

/// `to_pairs` into a zero-padded [padded_rows][padded_pairs] layout, for kernels that take
/// whole tiles of rows and of k.
pub fn to_pairs_padded(
    src: &[f32],
    rows: usize,
    cols: usize,
    padded_rows: usize,
    padded_pairs: usize,
) -> Vec<u32> {
    assert!(available(), "the bf16 GEMM needs AVX512-BF16");
    let kp = cols.div_ceil(2);
    assert!(src.len() == rows * cols && padded_rows >= rows && padded_pairs >= kp);
    let mut out = vec![0u32; padded_rows * padded_pairs];
    out.par_chunks_mut(padded_pairs * 64)
        .zip(src.par_chunks(cols.max(1) * 64))
        .for_each(|(o, s)| {
            for (orow, srow) in o.chunks_mut(padded_pairs).zip(s.chunks(cols.max(1))) {
                // SAFETY: available() was checked above.
                unsafe { row_pairs(srow, &mut orow[..kp]) };
            }
        });
    out
}

/// The 32 values at `src` as 16 bf16 pairs, in order, in one instruction. The conversion
/// rounds to nearest even like `bf16_bits` (it may flush subnormal inputs to zero, far below
/// what a GEMM of model weights can resolve).
///
/// # Safety
/// The CPU has AVX512-BF16; `src` points at 32 readable values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn pairs32(src: *const f32) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    // The first operand fills the upper half: the 32 values stay in order.
    std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(
        _mm512_loadu_ps(src.add(16)),
        _mm512_loadu_ps(src),
    ))
}

/// One row's pairs into `out` (ceil(row.len() / 2) long), 32 values per instruction.
///
/// # Safety
/// The CPU has AVX512-BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn row_pairs(row: &[f32], out: &mut [u32]) {
    use std::arch::x86_64::*;
    assert_eq!(out.len(), row.len().div_ceil(2));
    let full = row.len() / 32;
    for c in 0..full {
        let packed = pairs32(row.as_ptr().add(c * 32));
        _mm512_storeu_si512(out.as_mut_ptr().add(c * 16) as *mut _, packed);
    }
    for (p, o) in out.iter_mut().enumerate().skip(full * 16) {
        *o = pair(row[2 * p], row.get(2 * p + 1).copied().unwrap_or(0.0));
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn row_pairs(_: &[f32], _: &mut [u32]) {
    unreachable!("available() is false off x86_64")
}

/// Bytes a call holds besides its operands: x's pairs and one packed tile per thread (and,
/// for a built w, one tile of its rows in f32 per thread).
pub fn scratch_bytes(m: usize, k: usize, threads: usize, w: WeightRows) -> usize {
    let kp = k.div_ceil(2);
    (m * kp + threads.max(1) * kp * NR) * 4 + threads.max(1) * w.buffer_bytes(NR, k)
}

/// The w [n][k] of a GEMM: rows in memory, or rows built a tile at a time, so that a weight
/// seen only inside one product (w + s z in a fused ZO forward) is never whole in memory.
#[derive(Clone, Copy)]
pub enum WeightRows<'a> {
    Stored(&'a [f32]),
    /// `build(n0, rows)` writes rows n0 .. n0 + rows.len() / k of w into `rows`, once for each
    /// tile of one product (so a builder may also write what it makes of those rows elsewhere,
    /// each tile's own part). It runs inside the GEMM's parallel tasks, so it must not wait on
    /// rayon itself (the AMX kernel's tile registers belong to the task running on the thread).
    Built(&'a (dyn Fn(usize, &mut [f32]) + Sync)),
}

impl WeightRows<'_> {
    /// Bytes of the f32 rows one task holds for a tile of `nr` rows.
    pub fn buffer_bytes(self, nr: usize, k: usize) -> usize {
        match self {
            WeightRows::Stored(_) => 0,
            WeightRows::Built(_) => nr * k * 4,
        }
    }

    /// `pack_rows` of rows [n0, n0 + nr) of this w, built into `buf` first if need be.
    pub fn pack(
        self,
        n: usize,
        k: usize,
        n0: usize,
        nr: usize,
        buf: &mut Vec<f32>,
        tile: &mut [u32],
    ) {
        match self {
            WeightRows::Stored(w) => pack_rows(w, n, k, n0, nr, tile),
            WeightRows::Built(build) => {
                let rows = nr.min(n - n0);
                buf.resize(rows * k, 0.0);
                build(n0, &mut buf[..rows * k]);
                pack_rows(&buf[..rows * k], rows, k, 0, nr, tile)
            }
        }
    }

    /// Whether a stored w holds n * k values.
    pub(super) fn check(self, n: usize, k: usize) {
        if let WeightRows::Stored(w) = self {
            assert_eq!(w.len(), n * k);
        }
    }
}

/// w rows [n0, n0 + nr) as [pairs][nr] bf16 pairs, where pairs = tile.len() / nr may exceed
/// ceil(k / 2): pairs past k and rows past `n` are zero. `nr` is a multiple of 16.
pub fn pack_rows(w: &[f32], n: usize, k: usize, n0: usize, nr: usize, tile: &mut [u32]) {
    let kp = k.div_ceil(2);
    assert!(nr.is_multiple_of(16) && tile.len().is_multiple_of(nr) && tile.len() / nr >= kp);
    assert!(available() && n0 < n && w.len() >= n * k);
    // SAFETY: available() was checked; the bounds were asserted above.
    unsafe { pack_tile_avx512(w, n, k, n0, nr, tile) }
    tile[kp * nr..].fill(0);
}

/// Each 16 rows x 16 pairs block is converted row by row (32 values per instruction) and
/// transposed in registers, so the tile is written a whole 64-byte line at a time; writing it
/// one pair at a time with a stride of NR cost 10-17% of the GEMM.
///
/// # Safety
/// The CPU has AVX512-BF16; `tile` holds ceil(k / 2) * nr pairs, `w` n * k values, n0 < n
/// and nr is a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_tile_avx512(w: &[f32], n: usize, k: usize, n0: usize, nr: usize, tile: &mut [u32]) {
    use std::arch::x86_64::*;
    let kp = k.div_ceil(2);
    let blocks = k / 32;
    let tp = tile.as_mut_ptr();
    for g in (0..nr).step_by(16) {
        let rows = n.saturating_sub(n0 + g).min(16);
        for b in 0..blocks {
            let mut v = [_mm512_setzero_si512(); 16];
            for (j, vj) in v.iter_mut().enumerate().take(rows) {
                *vj = pairs32(w.as_ptr().add((n0 + g + j) * k + 32 * b));
            }
            let cols = transpose16(v);
            for (p, c) in cols.iter().enumerate() {
                _mm512_storeu_si512(tp.add((16 * b + p) * nr + g) as *mut _, *c);
            }
        }
        // The last k % 32 values (an odd last column paired with zero).
        for j in 0..16 {
            let row = &w[(n0 + g + j).min(n - 1) * k..][..k];
            for p in 16 * blocks..kp {
                let value = if j < rows {
                    pair(row[2 * p], row.get(2 * p + 1).copied().unwrap_or(0.0))
                } else {
                    0
                };
                *tp.add(p * nr + g + j) = value;
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_tile_avx512(_: &[f32], _: usize, _: usize, _: usize, _: usize, _: &mut [u32]) {
    unreachable!("available() is false off x86_64")
}

/// The 16 x 16 transpose of 32-bit lanes: row r of the input is r[0..16], column c of the
/// output holds r[c] of every row in order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn transpose16(v: [std::arch::x86_64::__m512i; 16]) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;
    // Within each 128-bit lane L: 2 x 2 blocks, then 4 x 4, so u[4 i + c] lane L holds
    // column 4 L + c of rows 4 i .. 4 i + 4.
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    // Across lanes: column 4 L + c gathers lane L of u[c], u[4 + c], u[8 + c], u[12 + c].
    let mut out = [_mm512_setzero_si512(); 16];
    for c in 0..4 {
        let even_lo = _mm512_shuffle_i32x4::<0x88>(u[c], u[4 + c]); // lanes 0, 2 of each
        let odd_lo = _mm512_shuffle_i32x4::<0xDD>(u[c], u[4 + c]); // lanes 1, 3
        let even_hi = _mm512_shuffle_i32x4::<0x88>(u[8 + c], u[12 + c]);
        let odd_hi = _mm512_shuffle_i32x4::<0xDD>(u[8 + c], u[12 + c]);
        out[c] = _mm512_shuffle_i32x4::<0x88>(even_lo, even_hi);
        out[8 + c] = _mm512_shuffle_i32x4::<0xDD>(even_lo, even_hi);
        out[4 + c] = _mm512_shuffle_i32x4::<0x88>(odd_lo, odd_hi);
        out[12 + c] = _mm512_shuffle_i32x4::<0xDD>(odd_lo, odd_hi);
    }
    out
}

/// out = x · w^T. `x` holds the pairs of an [m][k] matrix (see `to_pairs`), `w` is f32 [n][k].
/// Panics when the CPU lacks AVX512-BF16 (check `available` first).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    x: &[u32],
    w: WeightRows,
    out: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    threads: usize,
) {
    assert!(available(), "the bf16 GEMM needs AVX512-BF16");
    let kp = k.div_ceil(2);
    assert_eq!(x.len(), m * kp);
    w.check(n, k);
    assert_eq!(out.len(), m * n);
    let tiles = n.div_ceil(NR);
    // Each task owns a run of whole tiles, i.e. a run of output columns; out is shared through
    // a raw pointer because those columns are strided in memory.
    let per_task = tiles.div_ceil(threads.max(1) * 4).max(1);
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..tiles)
        .step_by(per_task)
        .collect::<Vec<_>>()
        .into_par_iter()
        .for_each_init(
            || (vec![0u32; kp * NR], vec![]),
            |(tile, rows), t0| {
                for t in t0..(t0 + per_task).min(tiles) {
                    let n0 = t * NR;
                    w.pack(n, k, n0, NR, rows, tile);
                    let cols = NR.min(n - n0);
                    let mut r0 = 0;
                    while r0 < m {
                        let rows = MR.min(m - r0);
                        // SAFETY: tasks write disjoint column ranges [n0, n0 + cols) of out.
                        unsafe {
                            let dst = out_ptr.get().add(r0 * n + n0);
                            let x = &x[r0 * kp..];
                            match rows {
                                8 => kernel::<8>(x, kp, tile, dst, n, cols),
                                7 => kernel::<7>(x, kp, tile, dst, n, cols),
                                6 => kernel::<6>(x, kp, tile, dst, n, cols),
                                5 => kernel::<5>(x, kp, tile, dst, n, cols),
                                4 => kernel::<4>(x, kp, tile, dst, n, cols),
                                3 => kernel::<3>(x, kp, tile, dst, n, cols),
                                2 => kernel::<2>(x, kp, tile, dst, n, cols),
                                _ => kernel::<1>(x, kp, tile, dst, n, cols),
                            }
                        }
                        r0 += rows;
                    }
                }
            },
        );
}

/// One ROWS x NR block of out over the full k (ROWS <= MR).
///
/// # Safety
/// `dst` points at out[r0][n0] of a row-major matrix with row stride `ldo`, valid for ROWS
/// rows of `cols` columns; `x` holds ROWS rows of `kp` pairs; the CPU has AVX512-BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel<const ROWS: usize>(
    x: &[u32],
    kp: usize,
    tile: &[u32],
    dst: *mut f32,
    ldo: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 3]; ROWS];
    debug_assert!(x.len() >= (ROWS - 1) * kp + kp && ROWS <= MR);
    let xp = x.as_ptr();
    let tp = tile.as_ptr();
    for p in 0..kp {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(tp.add(p * NR) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(tp.add(p * NR + 16) as *const _));
        let b2: __m512bh = std::mem::transmute(_mm512_loadu_si512(tp.add(p * NR + 32) as *const _));
        for (r, a) in acc.iter_mut().enumerate() {
            let xa: __m512bh = std::mem::transmute(_mm512_set1_epi32(*xp.add(r * kp + p) as i32));
            a[0] = _mm512_dpbf16_ps(a[0], xa, b0);
            a[1] = _mm512_dpbf16_ps(a[1], xa, b1);
            a[2] = _mm512_dpbf16_ps(a[2], xa, b2);
        }
    }
    for (r, a) in acc.iter().enumerate() {
        let row = dst.add(r * ldo);
        if cols == NR {
            _mm512_storeu_ps(row, a[0]);
            _mm512_storeu_ps(row.add(16), a[1]);
            _mm512_storeu_ps(row.add(32), a[2]);
        } else {
            let mut buf = [0f32; NR];
            _mm512_storeu_ps(buf.as_mut_ptr(), a[0]);
            _mm512_storeu_ps(buf.as_mut_ptr().add(16), a[1]);
            _mm512_storeu_ps(buf.as_mut_ptr().add(32), a[2]);
            std::ptr::copy_nonoverlapping(buf.as_ptr(), row, cols);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel<const ROWS: usize>(
    _: &[u32],
    _: usize,
    _: &[u32],
    _: *mut f32,
    _: usize,
    _: usize,
) {
    unreachable!("available() is false off x86_64")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::rng::Philox;

    fn bf16_value(x: f32) -> f64 {
        f32::from_bits((bf16_bits(x) as u32) << 16) as f64
    }

    /// Runs `product` (out = x · w^T with bf16 inputs) on fresh normals of each (m, n, k),
    /// the output poisoned first, and checks it against an f64 product of the same
    /// bf16-rounded inputs (relative norm error below 1e-6). Each bf16 kernel's test calls it.
    pub(crate) fn check_against_rounded_product(
        seed: u64,
        shapes: &[(usize, usize, usize)],
        product: impl Fn(&[f32], &[f32], &mut [f32], usize, usize, usize),
    ) {
        let rng = Philox::new(seed, 0, 0);
        for (case, &(m, n, k)) in shapes.iter().enumerate() {
            let mut x = vec![0f32; m * k];
            let mut w = vec![0f32; n * k];
            rng.fill_normal((case as u64) << 32, &mut x);
            rng.fill_normal(((case as u64) << 32) + (1 << 31), &mut w);
            let mut out = vec![f32::NAN; m * n];
            product(&x, &w, &mut out, m, n, k);
            let (mut err, mut norm) = (0.0f64, 0.0f64);
            for i in 0..m {
                for j in 0..n {
                    let r: f64 = (0..k)
                        .map(|p| bf16_value(x[i * k + p]) * bf16_value(w[j * k + p]))
                        .sum();
                    err += (out[i * n + j] as f64 - r).powi(2);
                    norm += r * r;
                }
            }
            let rel = (err / norm).sqrt();
            assert!(rel < 1e-6, "{m}x{n}x{k}: relative error {rel:e}");
        }
    }

    #[test]
    fn rounding_is_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        assert_eq!(bf16_bits(-2.0), 0xc000);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: ties go up to even.
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0 + 1e-6), 0x3f81);
        assert!(f32::from_bits((bf16_bits(f32::NAN) as u32) << 16).is_nan());
        assert_eq!(bf16_bits(f32::INFINITY), 0x7f80);
    }

    /// The vector conversion gives the same bits as `bf16_bits` on normal values, ties
    /// included, across a full 32-value block and the scalar tail of an odd row.
    #[test]
    fn vector_conversion_matches_scalar_rounding() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX512-BF16");
            return;
        }
        let cols = 75;
        let mut row = vec![0f32; 2 * cols];
        Philox::new(5, 0, 0).fill_normal(0, &mut row);
        // Exact ties between two bf16 values, rounding down and up to even.
        row[3] = 1.0 + 1.0 / 256.0;
        row[4] = 1.0 + 3.0 / 256.0;
        let pairs = to_pairs(&row, 2, cols);
        for (r, src) in row.chunks(cols).enumerate() {
            for p in 0..cols.div_ceil(2) {
                let hi = src.get(2 * p + 1).copied().unwrap_or(0.0);
                assert_eq!(pairs[r * 38 + p], pair(src[2 * p], hi), "row {r} pair {p}");
            }
        }
    }

    /// A packed tile is the scalar pairing of w's rows laid out [pair][row], zero past the
    /// last row, over k with whole 32-value blocks, a tail and an odd last column.
    #[test]
    fn packed_tile_is_the_transposed_pairs() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX512-BF16");
            return;
        }
        for (n, k, n0) in [(100, 77, 48), (100, 64, 96), (60, 1, 0), (48, 96, 0)] {
            let mut w = vec![0f32; n * k];
            Philox::new(3, n as u32, k as u32).fill_normal(0, &mut w);
            let kp = k.div_ceil(2);
            let mut tile = vec![0xdead_beef; kp * NR];
            pack_rows(&w, n, k, n0, NR, &mut tile);
            for p in 0..kp {
                for j in 0..NR {
                    let row = n0 + j;
                    let want = if row < n {
                        let hi = if 2 * p + 1 < k {
                            w[row * k + 2 * p + 1]
                        } else {
                            0.0
                        };
                        pair(w[row * k + 2 * p], hi)
                    } else {
                        0
                    };
                    assert_eq!(tile[p * NR + j], want, "n {n} k {k} pair {p} row {row}");
                }
            }
        }
    }

    /// The kernel against an f64 product of the same bf16-rounded inputs, over shapes with a
    /// row tail, a column tail and an odd k; the output is poisoned first.
    #[test]
    fn matches_f64_product_of_rounded_inputs() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX512-BF16");
            return;
        }
        let shapes = [
            (1, 1, 1),
            (8, 48, 64),
            (13, 100, 77),
            (37, 200, 576),
            (64, 49, 3),
        ];
        check_against_rounded_product(11, &shapes, |x, w, out, m, n, k| {
            matmul(&to_pairs(x, m, k), WeightRows::Stored(w), out, m, n, k, 2)
        });
    }
}
