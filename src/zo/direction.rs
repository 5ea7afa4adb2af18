//! The shared perturbation machinery: how the direction z of a step is drawn for each tensor,
//! regenerated from Philox keys (never stored), and the element passes that add it.
//!
//! z for tensor `id` at step `t` of a run with seed `s`:
//! - dense: z[j] = normal(s, t, id)[j];
//! - sparse: the same, but zero where |w0[j]| > h[id] (w0 = the unperturbed weight);
//! - low rank (matrices [m x n]): Z = U diag(tau) V^T / sqrt(r), U [m x r] and V [n x r] fixed for
//!   the run (keys (s, FACTOR_U/V, id)), tau = normal(s, t, id)[0..r]; vectors stay dense.
//!   The 1/sqrt(r) makes Z's entries unit-variance, so eps and lr mean what they mean for MeZO.

use super::passes::{Rule, ZSpec, ZoBackend};
use crate::backend::cpu::simd::wide;
use crate::model::HostTensor;
use crate::rng::Philox;
use anyhow::Result;
use rayon::prelude::*;

/// Elements per parallel work item (a multiple of 4, the Philox block width).
const CHUNK: usize = 1 << 14;
pub const FACTOR_U: u32 = 0xFFFF_FF00;
pub const FACTOR_V: u32 = 0xFFFF_FF01;

#[derive(Clone, Debug, PartialEq)]
pub enum Direction {
    Dense,
    /// Per-tensor thresholds h: only elements with |w0| <= h move.
    Sparse {
        thresholds: Vec<f32>,
    },
    LowRank {
        rank: usize,
    },
}

/// The random keys of one step.
#[derive(Clone, Copy, Debug)]
pub struct StepKey {
    pub seed: u64,
    pub step: u32,
}

impl StepKey {
    pub fn stream(&self, id: usize) -> Philox {
        Philox::new(self.seed, self.step, id as u32)
    }
}

/// Fixed factors of a low-rank direction for one matrix: U [m x r] and V [n x r] (kept
/// transposed, see `vt`).
pub struct Factors {
    /// U, [m][r].
    pub u: Vec<f32>,
    /// V transposed, [r][n]: V is drawn as [n][r] (element b * r + k), stored k-major so a row
    /// of z is r contiguous axpys.
    pub vt: Vec<f32>,
    pub rank: usize,
}

impl Factors {
    pub fn generate(seed: u64, id: usize, m: usize, n: usize, rank: usize) -> Self {
        let mut u = vec![0.0; m * rank];
        let mut v = vec![0.0; n * rank];
        Philox::new(seed, FACTOR_U, id as u32).fill_normal(0, &mut u);
        Philox::new(seed, FACTOR_V, id as u32).fill_normal(0, &mut v);
        let mut vt = vec![0.0; rank * n];
        for (b, vb) in v.chunks_exact(rank).enumerate() {
            for (k, &x) in vb.iter().enumerate() {
                vt[k * n + b] = x;
            }
        }
        Factors { u, vt, rank }
    }

    /// The step's coefficients tau (length r).
    pub fn tau(key: StepKey, id: usize, rank: usize) -> Vec<f32> {
        let mut t = vec![0.0; rank];
        key.stream(id).fill_normal(0, &mut t);
        t
    }

    /// Row `a` of U diag(c) V^T / sqrt(r) into `out` (length n).
    pub fn row(&self, a: usize, c: &[f32], out: &mut [f32]) {
        let r = self.rank;
        let n = out.len();
        let norm = 1.0 / (r as f32).sqrt();
        // Each element is the in-order sum over k of v[b][k] * (u[a][k] c[k] / sqrt(r)),
        // multiply then add, exactly as the CUDA twin adds; the loop over b vectorizes.
        low_rank_row(&self.u[a * r..(a + 1) * r], c, &self.vt[..r * n], norm, out);
    }
}

wide! {
    /// out = sum over k of vt[k] * (u_row[k] * c[k] * norm), k in order.
    fn low_rank_row(u_row: &[f32], c: &[f32], vt: &[f32], norm: f32, out: &mut [f32]) {
        // 64 sums at a time stay in registers over all k, instead of a pass over `out` per k.
        const BLOCK: usize = 64;
        let n = out.len();
        let full = n / BLOCK * BLOCK;
        let terms = || u_row.iter().zip(c).zip(vt.chunks_exact(n));
        for (i, o) in out[..full].chunks_exact_mut(BLOCK).enumerate() {
            let mut acc = [0.0f32; BLOCK];
            for ((&u, &ck), vk) in terms() {
                let y = u * ck * norm;
                let x: &[f32; BLOCK] = vk[i * BLOCK..(i + 1) * BLOCK].try_into().unwrap();
                for (a, &x) in acc.iter_mut().zip(x) {
                    *a += x * y;
                }
            }
            o.copy_from_slice(&acc);
        }
        let tail = &mut out[full..];
        tail.fill(0.0);
        for ((&u, &ck), vk) in terms() {
            let y = u * ck * norm;
            for (a, &x) in tail.iter_mut().zip(&vk[full..]) {
                *a += x * y;
            }
        }
    }
}

/// Whether a tensor gets a low-rank direction under `Direction::LowRank`.
pub fn is_matrix(t: &HostTensor) -> bool {
    t.shape.len() == 2
}

wide! {
    /// w <- rule(w0, z) element by element, where w holds w0 + offset * z. With a threshold
    /// (sparse z) the perturbation was applied only where |w0| <= h; elsewhere the weight never
    /// moved and the rule sees z = 0, so the mask is recomputed from w0 rather than stored.
    /// `m` and `v` are the Adam moments of the same elements (empty for the other rules).
    #[allow(clippy::too_many_arguments)]
    fn unperturb_apply(
        w: &mut [f32],
        z: &[f32],
        offset: f32,
        threshold: Option<f32>,
        rule: Rule,
        m: &mut [f32],
        v: &mut [f32],
    ) {
        // The mask and the rule are chosen once per call, so that each (mask, rule) pair is a
        // tight loop with both matches folded away.
        match threshold {
            None => apply_rule(w, z, rule, m, v, |w, z| (unperturbed(w, z, offset), z)),
            Some(h) => apply_rule(w, z, rule, m, v, |w, z| {
                let w0 = unperturbed(w, z, offset);
                if w0.abs() <= h {
                    (w0, z)
                } else {
                    (w, 0.0)
                }
            }),
        }
    }
}

wide! {
    /// out = w0 + s z element by element, read from `w0` where `unperturb_apply` with offset 0
    /// and `Rule::Move { to: s }` would have read a copy of it in `out`: the same operations,
    /// so the same bits (signed zeros included), without writing and rereading the copy.
    fn perturb_from(w0: &[f32], z: &[f32], s: f32, threshold: Option<f32>, out: &mut [f32]) {
        let elems = out.iter_mut().zip(w0.iter().zip(z));
        let moved = |w: f32, z: f32| Rule::Move { to: s }.apply(unperturbed(w, z, 0.0), z, None);
        match threshold {
            None => elems.for_each(|(o, (&w, &z))| *o = moved(w, z)),
            Some(h) => elems.for_each(|(o, (&w, &z))| {
                *o = if unperturbed(w, z, 0.0).abs() <= h {
                    moved(w, z)
                } else {
                    Rule::Move { to: s }.apply(w, 0.0, None)
                }
            }),
        }
    }
}

/// w0 from w = w0 + offset z. An offset of 0 leaves w's bits: w - 0 z would turn a -0
/// weight into +0 wherever z < 0 (so that an update at lr 0 would not be the identity).
#[inline(always)]
pub(crate) fn unperturbed(w: f32, z: f32, offset: f32) -> f32 {
    if offset == 0.0 {
        w
    } else {
        w - offset * z
    }
}

/// w <- rule(w0, z) over a segment, with (w0, z) = unperturbed(w, z) of each element.
/// Inlined into each `wide!` variant of `unperturb_apply`, so it runs at that one's width.
#[inline(always)]
fn apply_rule(
    w: &mut [f32],
    z: &[f32],
    rule: Rule,
    m: &mut [f32],
    v: &mut [f32],
    unperturbed: impl Fn(f32, f32) -> (f32, f32),
) {
    // One loop per rule, each with the rule's variant fixed so its match folds away too.
    match rule {
        Rule::Move { to } => for_each(w, z, |w, z| {
            let (w0, z) = unperturbed(w, z);
            Rule::Move { to }.apply(w0, z, None)
        }),
        Rule::Sgd { lr, g, wd } => for_each(w, z, |w, z| {
            let (w0, z) = unperturbed(w, z);
            Rule::Sgd { lr, g, wd }.apply(w0, z, None)
        }),
        Rule::Adam(a) => {
            assert!(
                m.len() == w.len() && v.len() == w.len(),
                "an Adam pass needs its moments"
            );
            let elems = w.iter_mut().zip(z).zip(m.iter_mut().zip(v.iter_mut()));
            for ((w, &z), mv) in elems {
                let (w0, z) = unperturbed(*w, z);
                *w = Rule::Adam(a).apply(w0, z, Some(mv));
            }
        }
    }
}

#[inline(always)]
fn for_each(w: &mut [f32], z: &[f32], f: impl Fn(f32, f32) -> f32) {
    for (w, &z) in w.iter_mut().zip(z) {
        *w = f(*w, z);
    }
}

/// Elements of z generated at a time inside a chunk: z stays in registers and L1 between its
/// generation and its use (256 measured best of 128, 256, 512 and 2048).
const SEGMENT: usize = 256;
/// How far ahead of the segment being generated the weights are prefetched. Without it a
/// single-threaded pass waits on memory (227 -> 170 ms over the default model on a Zen 4 core).
const PREFETCH_AHEAD: usize = 8 * SEGMENT;

/// Splits a tensor into chunks of CHUNK elements and runs `run(start, values)` on each in
/// parallel, through an f32 copy of the chunk when the tensor is not f32.
pub fn for_each_chunk(t: &mut HostTensor, run: impl Fn(usize, &mut [f32]) + Sync) {
    if let Some(w) = t.f32s_mut() {
        w.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, w)| run(c * CHUNK, w));
        return;
    }
    let dtype = t.dtype;
    let bytes = t.bytes_mut();
    let es = dtype.size();
    bytes
        .par_chunks_mut(CHUNK * es)
        .enumerate()
        .for_each(|(c, b)| {
            let n = b.len() / es;
            let mut buf = vec![0.0f32; n];
            crate::model::tensor::decode_into(dtype, b, &mut buf);
            run(c * CHUNK, &mut buf);
            crate::model::tensor::encode_from(dtype, &buf, b);
        });
}

/// A raw pointer to per-element f32 data (optimizer state, or a perturbed copy being written
/// tile by tile), shared by the parallel chunks of one pass. Each element index is touched by
/// exactly one chunk, which is what makes `slice` sound.
#[derive(Clone, Copy)]
pub struct ElemState(*mut f32);
unsafe impl Send for ElemState {}
unsafe impl Sync for ElemState {}

impl ElemState {
    pub fn new(v: &mut [f32]) -> Self {
        ElemState(v.as_mut_ptr())
    }
    /// # Safety
    /// `start..start + len` is in bounds and no other thread touches it during the pass.
    pub unsafe fn slice<'a>(self, start: usize, len: usize) -> &'a mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// The z of one tensor at one step, ready to be generated on the CPU.
pub enum TensorZ {
    Dense(Philox),
    Sparse(Philox, f32),
    /// The matrix's fixed factors and the coefficients of this pass.
    LowRank(Factors, Vec<f32>),
}

impl TensorZ {
    /// The z that `z` describes for tensor `t`, parameter `id`, at `key`.
    pub fn from_spec(t: &HostTensor, id: usize, key: StepKey, z: ZSpec) -> Result<Self> {
        Ok(match z {
            ZSpec::Dense => TensorZ::Dense(key.stream(id)),
            ZSpec::Sparse { threshold } => TensorZ::Sparse(key.stream(id), threshold),
            ZSpec::LowRank { coef } => {
                if !is_matrix(t) {
                    anyhow::bail!("{}: a low-rank direction needs a matrix", t.name);
                }
                let fac = Factors::generate(key.seed, id, t.shape[0], t.shape[1], coef.len());
                TensorZ::LowRank(fac, coef.to_vec())
            }
        })
    }

    /// Writes `rule(w0, z)` over tensor `t`, which currently holds w0 + offset * z. `moments`
    /// (the tensor's Adam m and v) are required by `Rule::Adam` and ignored otherwise.
    pub fn pass(
        &self,
        t: &mut HostTensor,
        offset: f32,
        rule: Rule,
        moments: Option<(&mut [f32], &mut [f32])>,
    ) {
        let cols = *t.shape.last().unwrap_or(&1);
        let state = moments.map(|(m, v)| (ElemState::new(m), ElemState::new(v)));
        for_each_chunk(t, |start, w| {
            // SAFETY: chunks are disjoint ranges of the tensor, so of its moments too.
            let mv =
                state.map(|(m, v)| unsafe { (m.slice(start, w.len()), v.slice(start, w.len())) });
            self.pass_slice(start, w, cols, offset, rule, mv)
        });
    }

    /// The perturbed weights w0 + s z of elements start .. start + out.len() into `out`, read
    /// from `w0` (those elements of an f32 tensor): the bits `pass_slice` with offset 0 and
    /// `Rule::Move { to: s }` leaves on a copy of `w0`, without the copy. Dense and sparse z.
    pub fn perturbed_from(&self, start: usize, w0: &[f32], s: f32, out: &mut [f32]) {
        assert_eq!(w0.len(), out.len(), "perturbed_from: lengths differ");
        let h = self.threshold();
        self.segments(start, w0.len(), None, Some(Ahead::of(w0)), |r, z| {
            perturb_from(&w0[r.clone()], z, s, h, &mut out[r])
        });
    }

    /// `perturbed_from` at two scales from one draw of z: w0 + s[0] z into `out` and
    /// w0 + s[1] z into `other` (a paired forward's two streams), each with its own bits.
    pub fn perturbed_pair_from(
        &self,
        start: usize,
        w0: &[f32],
        s: [f32; 2],
        out: &mut [f32],
        other: &mut [f32],
    ) {
        assert!(w0.len() == out.len() && w0.len() == other.len());
        let h = self.threshold();
        self.segments(start, w0.len(), None, Some(Ahead::of(w0)), |r, z| {
            perturb_from(&w0[r.clone()], z, s[0], h, &mut out[r.clone()]);
            perturb_from(&w0[r.clone()], z, s[1], h, &mut other[r]);
        });
    }

    /// `perturbed_pair_from` where `other` holds w0 on entry (a tensor stored in another
    /// dtype, decoded there) and is moved in place.
    pub fn perturbed_pair_in_place(
        &self,
        start: usize,
        s: [f32; 2],
        out: &mut [f32],
        other: &mut [f32],
    ) {
        assert_eq!(out.len(), other.len());
        let h = self.threshold();
        // Freshly decoded, so in cache: nothing to prefetch.
        self.segments(start, out.len(), None, None, |r, z| {
            perturb_from(&other[r.clone()], z, s[0], h, &mut out[r.clone()]);
            let rule = Rule::Move { to: s[1] };
            unperturb_apply(&mut other[r], z, 0.0, h, rule, &mut [], &mut []);
        });
    }

    /// Runs `each(range, z)` over elements start .. start + len of z, a segment at a time
    /// (ranges relative to `start`): up to SEGMENT normals of a dense or sparse z, or the rest
    /// of a row of a low-rank z over rows of `cols` elements (a range may start and end inside
    /// a row; `None` where the caller takes no low-rank z). `ahead`, the weights being read
    /// or written, is prefetched while each segment's z is generated.
    fn segments(
        &self,
        start: usize,
        len: usize,
        cols: Option<usize>,
        ahead: Option<Ahead>,
        mut each: impl FnMut(std::ops::Range<usize>, &[f32]),
    ) {
        let mut dense = [0.0f32; SEGMENT];
        let mut row = match (self, cols) {
            (TensorZ::LowRank(..), Some(cols)) => vec![0.0f32; cols],
            (TensorZ::LowRank(..), None) => panic!("a low-rank z needs its row length"),
            _ => Vec::new(),
        };
        let mut k = 0;
        while k < len {
            let j = start + k;
            let n = match (self, cols) {
                (TensorZ::LowRank(..), Some(cols)) => cols - j % cols,
                _ => SEGMENT,
            }
            .min(len - k);
            if let Some(a) = ahead {
                a.prefetch(k + PREFETCH_AHEAD, n);
            }
            let z: &[f32] = match self {
                TensorZ::Dense(p) | TensorZ::Sparse(p, _) => {
                    let z = &mut dense[..n];
                    p.fill_normal(j as u64, z);
                    z
                }
                TensorZ::LowRank(fac, c) => {
                    let cols = row.len();
                    fac.row(j / cols, c, &mut row);
                    &row[j % cols..j % cols + n]
                }
            };
            each(k..k + n, z);
            k += n;
        }
    }

    /// The sparse mask's threshold h, if z is sparse.
    fn threshold(&self) -> Option<f32> {
        match self {
            TensorZ::Sparse(_, h) => Some(*h),
            _ => None,
        }
    }

    /// `pass` over elements [start, start + w.len()) of a tensor with rows of `cols`
    /// elements, held in `w` as f32 (e.g. a few gathered rows); `moments` cover the same
    /// elements.
    pub fn pass_slice(
        &self,
        start: usize,
        w: &mut [f32],
        cols: usize,
        offset: f32,
        rule: Rule,
        mut moments: Option<(&mut [f32], &mut [f32])>,
    ) {
        let threshold = self.threshold();
        let ahead = Ahead::of(w);
        self.segments(start, w.len(), Some(cols), Some(ahead), |seg, z| {
            let (m, v) = match moments.as_mut() {
                Some((m, v)) => (&mut m[seg.clone()], &mut v[seg.clone()]),
                None => (&mut [][..], &mut [][..]),
            };
            unperturb_apply(&mut w[seg], z, offset, threshold, rule, m, v);
        });
    }
}

/// Weights to prefetch while z is generated, held by address so that the pass may write
/// them meanwhile: a prefetch reads nothing the program sees and never faults.
#[derive(Clone, Copy)]
struct Ahead {
    ptr: *const f32,
    len: usize,
}

impl Ahead {
    fn of(w: &[f32]) -> Self {
        Ahead {
            ptr: w.as_ptr(),
            len: w.len(),
        }
    }

    /// Prefetches elements at .. at + n, clipped to the weights.
    fn prefetch(self, at: usize, n: usize) {
        let at = at.min(self.len);
        let n = n.min(self.len - at);
        crate::backend::cpu::simd::prefetch(self.ptr.wrapping_add(at), n);
    }
}

/// In-place perturbation: a tensor at w0 + from*z moves to w0 + to*z.
pub fn perturb_tensor<B: ZoBackend>(
    backend: &B,
    t: &mut B::Weight,
    id: usize,
    key: StepKey,
    dir: &Direction,
    from: f32,
    to: f32,
) -> Result<()> {
    match dir {
        Direction::LowRank { rank } if B::weight_shape(t).len() == 2 => {
            // Low-rank z is linear in its coefficients, so the move is one pass with
            // coefficients (to - from) * tau.
            let c: Vec<f32> = Factors::tau(key, id, *rank)
                .iter()
                .map(|x| (to - from) * x)
                .collect();
            let z = ZSpec::LowRank { coef: &c };
            backend.zo_pass(t, id, key, z, 0.0, Rule::Move { to: 1.0 }, None)
        }
        _ => backend.zo_pass(
            t,
            id,
            key,
            super::elem_spec(dir, id),
            from,
            Rule::Move { to },
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::simd::{force, Level};
    use crate::zo::passes::AdamArgs;

    /// rule(w0, z) of element j, written out from the definitions one element at a time.
    fn element(
        tz: &TensorZ,
        cols: usize,
        j: usize,
        w: f32,
        offset: f32,
        rule: Rule,
        mv: (&mut f32, &mut f32),
    ) -> f32 {
        let z = match tz {
            TensorZ::Dense(s) | TensorZ::Sparse(s, _) => s.normal(j as u64),
            TensorZ::LowRank(fac, c) => {
                let (a, b, r) = (j / cols, j % cols, fac.rank);
                let norm = 1.0 / (r as f32).sqrt();
                (0..r).fold(0.0, |acc, k| {
                    acc + fac.vt[k * cols + b] * (fac.u[a * r + k] * c[k] * norm)
                })
            }
        };
        let w0 = if offset == 0.0 { w } else { w - offset * z };
        let (w0, z) = match tz {
            TensorZ::Sparse(_, h) if w0.abs() > *h => (w, 0.0),
            _ => (w0, z),
        };
        rule.apply(w0, z, Some(mv))
    }

    /// Panics naming the first element whose bits differ.
    fn same_bits(got: &[f32], expect: &[f32], what: &str) {
        assert_eq!(got.len(), expect.len(), "{what}: length");
        if let Some(j) = (0..got.len()).find(|&j| got[j].to_bits() != expect[j].to_bits()) {
            panic!(
                "{what}: element {j} is {} where {} is expected",
                got[j], expect[j]
            );
        }
    }

    #[test]
    fn a_pass_is_its_element_definition_at_every_vector_width() {
        // Rows of 300: segments of z cross rows and end inside them; 2100 is no multiple of
        // a segment or of the Philox block.
        let (rows, cols) = (7, 300);
        let n = rows * cols;
        let normals = |seed: u64| {
            let mut v = vec![0.0f32; n];
            Philox::new(seed, 0, 0).fill_normal(0, &mut v);
            v
        };
        let w = normals(1);
        let m: Vec<f32> = normals(2).iter().map(|x| 0.1 * x).collect();
        let v: Vec<f32> = normals(3).iter().map(|x| 0.01 * x * x).collect();
        let key = StepKey { seed: 9, step: 3 };
        let adam = AdamArgs {
            g: 0.7,
            lr: 1e-2,
            wd: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            c1: 0.19,
            c2: 0.003,
            eps: 1e-8,
        };
        let rules = [
            Rule::Move { to: -2e-3 },
            Rule::Sgd {
                lr: 1e-2,
                g: 0.7,
                wd: 0.1,
            },
            Rule::Adam(adam),
        ];
        let coef = [0.3, -1.2, 0.7];
        let specs = [
            ZSpec::Dense,
            ZSpec::Sparse { threshold: 0.6 },
            ZSpec::LowRank { coef: &coef },
        ];
        let offset = 1e-3;
        let t = HostTensor::from_f32("w", vec![rows, cols], &w);
        for spec in specs {
            let tz = TensorZ::from_spec(&t, 5, key, spec).unwrap();
            for rule in rules {
                let (mut me, mut ve) = (m.clone(), v.clone());
                let expect: Vec<f32> = (0..n)
                    .map(|j| element(&tz, cols, j, w[j], offset, rule, (&mut me[j], &mut ve[j])))
                    .collect();
                for level in [Level::Baseline, Level::Avx2, Level::Avx512] {
                    force(level);
                    let what = format!("{spec:?} {rule:?} at {level:?}");
                    let (mut mt, mut vt) = (m.clone(), v.clone());
                    let mut got = HostTensor::from_f32("w", vec![rows, cols], &w);
                    tz.pass(&mut got, offset, rule, Some((&mut mt, &mut vt)));
                    same_bits(&got.to_f32_vec(), &expect, &format!("{what}: weights"));
                    if let Rule::Adam(_) = rule {
                        same_bits(&mt, &me, &format!("{what}: m"));
                        same_bits(&vt, &ve, &format!("{what}: v"));
                    }
                    // A slice that starts inside a row and a Philox block, as the fused hook
                    // passes gathered rows.
                    let (start, len) = (301, 1000);
                    let mut part = w[start..start + len].to_vec();
                    let (mut mp, mut vp) = (
                        m[start..start + len].to_vec(),
                        v[start..start + len].to_vec(),
                    );
                    tz.pass_slice(
                        start,
                        &mut part,
                        cols,
                        offset,
                        rule,
                        Some((&mut mp, &mut vp)),
                    );
                    let range = start..start + len;
                    same_bits(&part, &expect[range.clone()], &format!("{what}: slice"));
                    if let Rule::Adam(_) = rule {
                        same_bits(&mp, &me[range.clone()], &format!("{what}: slice m"));
                        same_bits(&vp, &ve[range], &format!("{what}: slice v"));
                    }
                }
            }
        }
        force(Level::Avx512);
    }

    #[test]
    fn perturbed_copies_from_the_weights_are_move_passes_on_copies_at_every_vector_width() {
        let (rows, cols) = (7, 300);
        let n = rows * cols;
        let mut w = vec![0.0f32; n];
        Philox::new(1, 0, 0).fill_normal(0, &mut w);
        // Signed zeros, where w - 0 z and w differ in the sign bit, and weights on the mask's
        // edge.
        for j in (0..n).step_by(37) {
            w[j] = if j % 2 == 0 { -0.0 } else { 0.0 };
        }
        w[5] = 0.6;
        w[6] = -0.6;
        let t = HostTensor::from_f32("w", vec![rows, cols], &w);
        let key = StepKey { seed: 9, step: 3 };
        for spec in [ZSpec::Dense, ZSpec::Sparse { threshold: 0.6 }] {
            let tz = TensorZ::from_spec(&t, 5, key, spec).unwrap();
            for s in [-2e-3, 0.0, 1e-3] {
                for level in [Level::Baseline, Level::Avx2, Level::Avx512] {
                    force(level);
                    for (start, len) in [(0, n), (301, 1000)] {
                        let what = format!("{spec:?} s {s} at {level:?}, {start}+{len}");
                        let w0 = &w[start..start + len];
                        let mut expect = w0.to_vec();
                        tz.pass_slice(start, &mut expect, cols, 0.0, Rule::Move { to: s }, None);
                        let mut got = vec![f32::NAN; len];
                        tz.perturbed_from(start, w0, s, &mut got);
                        same_bits(&got, &expect, &format!("{what}: one scale"));
                        // Two scales from one draw, from the weights or in place.
                        let mut expect_other = w0.to_vec();
                        let rule = Rule::Move { to: 0.5 };
                        tz.pass_slice(start, &mut expect_other, cols, 0.0, rule, None);
                        let (mut got, mut got_other) = (vec![f32::NAN; len], vec![f32::NAN; len]);
                        tz.perturbed_pair_from(start, w0, [s, 0.5], &mut got, &mut got_other);
                        same_bits(&got, &expect, &format!("{what}: pair"));
                        same_bits(&got_other, &expect_other, &format!("{what}: pair, other"));
                        let (mut got, mut got_other) = (vec![f32::NAN; len], w0.to_vec());
                        tz.perturbed_pair_in_place(start, [s, 0.5], &mut got, &mut got_other);
                        same_bits(&got, &expect, &format!("{what}: pair in place"));
                        same_bits(
                            &got_other,
                            &expect_other,
                            &format!("{what}: pair in place, other"),
                        );
                    }
                }
            }
        }
        force(Level::Avx512);
    }
}
