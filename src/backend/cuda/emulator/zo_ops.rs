//! The generator's and the ZO passes' kernels (csrc/random.cu, csrc/zo.cu, lse_block of
//! csrc/logits.cu), emulated on the CPU, against their CPU twins: bit for bit, since they are
//! built only from correctly rounded operations. Inputs are fresh random values; outputs are
//! poisoned first where the kernel writes a buffer of its own.

use super::{addr, addr_mut, emulator, same_bits};
use crate::backend::cpu::head::RunningLogSumExp;
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::kernels::{self, ElemRule, ElemZ, PhiloxKey};
use crate::model::{DType, HostTensor};
use crate::rng::Philox;
use crate::zo::direction::{StepKey, FACTOR_U, FACTOR_V};
use crate::zo::passes::{AdamArgs, Rule, ZSpec, ZoBackend};

const SEED: u64 = 0x0123_4567_89AB_CDEF;

#[test]
fn philox_words_and_normals_are_the_cpu_generators() {
    let Some(emu) = emulator() else { return };
    let key = PhiloxKey {
        seed: SEED,
        step: 9,
        tensor: 4,
    };
    let p = Philox::new(SEED, 9, 4);
    // Blocks on both sides of 2^32: the counter's high word must carry.
    let (first, n) = ((1u64 << 32) - 5, 300);
    let mut words = vec![0xDEAD_BEEFu32; 4 * n];
    kernels::philox_words(emu, addr_mut(&mut words), n, key, first).unwrap();
    let want: Vec<u32> = (0..n as u64).flat_map(|b| p.block(first + b)).collect();
    assert_eq!(words, want, "Philox words");
    words.clear();

    // From an element that is not the first of its block, over a length that ends mid-block.
    let (start, n) = (3u64, 1001);
    let mut got = vec![f32::NAN; n];
    kernels::fill_normal(
        emu,
        addr_mut(&mut got),
        crate::model::DType::F32,
        n,
        key,
        start,
        1.0,
        0.0,
    )
    .unwrap();
    let mut want = vec![0.0; n];
    p.fill_normal(start, &mut want);
    same_bits(&got, &want, "normals");
}

const KEY: StepKey = StepKey {
    seed: SEED,
    step: 9,
};

/// Adam hyperparameters with bias corrections of an early step.
const ADAM: AdamArgs = AdamArgs {
    g: 2.5,
    lr: 1e-3,
    wd: 0.01,
    beta1: 0.9,
    beta2: 0.999,
    c1: 0.19,
    c2: 0.002,
    eps: 1e-8,
};

fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let p = Philox::new(seed, 5, 1);
    (0..n).map(|i| scale * p.normal(i as u64)).collect()
}

fn tensor(values: &[f32], shape: &[usize], dtype: DType) -> HostTensor {
    HostTensor::from_f32_as("w", shape.to_vec(), values, dtype)
}

fn copy(t: &HostTensor) -> HostTensor {
    HostTensor::from_bytes(t.name.clone(), t.shape.clone(), t.dtype, t.bytes())
}

/// The host address of a tensor's storage, for a kernel to write in place.
fn storage(t: &mut HostTensor) -> u64 {
    addr_mut(t.bytes_mut())
}

/// A tensor's bytes copied to `shift` bytes past a 16-byte boundary. The kernels move each
/// Philox block's eight elements with 16-byte accesses where the addresses allow it and element
/// by element where they do not, so the tests run both: at shift 0 and at one element.
struct Placed {
    store: Vec<u128>,
    shift: usize,
    like: HostTensor,
}

impl Placed {
    fn new(t: &HostTensor, shift: usize) -> Self {
        let len = t.bytes().len();
        let mut store = vec![0u128; (shift + len).div_ceil(16)];
        bytemuck::cast_slice_mut::<u128, u8>(&mut store)[shift..shift + len]
            .copy_from_slice(t.bytes());
        Placed {
            store,
            shift,
            like: copy(t),
        }
    }

    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u128, u8>(&self.store)[self.shift..][..self.like.bytes().len()]
    }

    /// The address of the bytes, for a kernel to read or write.
    fn addr(&mut self) -> u64 {
        let len = self.like.bytes().len();
        addr_mut(&mut bytemuck::cast_slice_mut::<u128, u8>(&mut self.store)[self.shift..][..len])
    }

    fn values(&self) -> Vec<f32> {
        let t = &self.like;
        HostTensor::from_bytes(t.name.clone(), t.shape.clone(), t.dtype, self.bytes()).to_f32_vec()
    }
}

/// Byte shifts that give 16-byte-aligned and misaligned addresses for elements of `dtype`.
fn shifts(dtype: DType) -> [usize; 2] {
    [0, dtype.size()]
}

fn elem_z(z: ZSpec) -> ElemZ {
    match z {
        ZSpec::Dense => ElemZ::Dense,
        ZSpec::Sparse { threshold } => ElemZ::Sparse { threshold },
        ZSpec::LowRank { .. } => unreachable!("element-wise z only"),
    }
}

/// The sparse threshold that leaves about a fifth of `values` free to move.
fn fifth_threshold(values: &[f32]) -> f32 {
    crate::zo::passes::abs_percentile(values.to_vec(), 0.8)
}

/// A tensor at w0 + eps z, as the first pass of a step leaves it, on the CPU.
fn perturbed(
    values: &[f32],
    shape: &[usize],
    dtype: DType,
    id: usize,
    z: ZSpec,
    eps: f32,
) -> HostTensor {
    let mut t = tensor(values, shape, dtype);
    CpuBackend::new()
        .zo_pass(&mut t, id, KEY, z, 0.0, Rule::Move { to: eps }, None)
        .unwrap();
    t
}

#[test]
fn element_wise_passes_leave_the_cpu_bits() {
    let Some(emu) = emulator() else { return };
    // 17 x 59 = 1003 elements: the last Philox block is partial.
    let (shape, id, eps) = ([17usize, 59], 6, 1e-3f32);
    let n = shape[0] * shape[1];
    let values = randn(n, 11, 0.05);
    let sparse = ZSpec::Sparse {
        threshold: fifth_threshold(&values),
    };
    for dtype in [DType::F32, DType::BF16] {
        for (z, shift) in [ZSpec::Dense, sparse]
            .into_iter()
            .flat_map(|z| shifts(dtype).map(|s| (z, s)))
        {
            let what = format!("{dtype:?} {z:?} at shift {shift}");
            let key = PhiloxKey::of_tensor(KEY, id);
            // +eps z from the unperturbed weights.
            let mut got = Placed::new(&tensor(&values, &shape, dtype), shift);
            kernels::zo_pass(
                emu,
                got.addr(),
                dtype,
                n,
                key,
                elem_z(z),
                0.0,
                ElemRule::Move { to: eps },
            )
            .unwrap();
            let want = perturbed(&values, &shape, dtype, id, z, eps);
            same_bits(&got.values(), &want.to_f32_vec(), &format!("{what} +eps z"));
            // Then the two rules that follow it: -eps z (a Move to -eps), and the restore +
            // SGD update with weight decay.
            for (rule, erule) in [
                (Rule::Move { to: -eps }, ElemRule::Move { to: -eps }),
                (
                    Rule::Sgd {
                        lr: 0.3,
                        g: -1.7,
                        wd: 0.05,
                    },
                    ElemRule::Sgd {
                        lr: 0.3,
                        g: -1.7,
                        wd: 0.05,
                    },
                ),
            ] {
                let mut got = Placed::new(&want, shift);
                kernels::zo_pass(emu, got.addr(), dtype, n, key, elem_z(z), eps, erule).unwrap();
                let mut cpu = copy(&want);
                CpuBackend::new()
                    .zo_pass(&mut cpu, id, KEY, z, eps, rule, None)
                    .unwrap();
                same_bits(
                    &got.values(),
                    &cpu.to_f32_vec(),
                    &format!("{what} {rule:?}"),
                );
            }
        }
    }
}

#[test]
fn adam_passes_leave_the_cpu_weights_and_moments() {
    let Some(emu) = emulator() else { return };
    let (shape, id, eps) = ([9usize, 45], 3, 1e-3f32);
    let n = shape[0] * shape[1];
    let values = randn(n, 12, 0.05);
    let m0 = randn(n, 13, 1e-3);
    let v0: Vec<f32> = randn(n, 14, 1e-3).iter().map(|x| x * x).collect();
    let a = ADAM;
    let sparse = ZSpec::Sparse {
        threshold: fifth_threshold(&values),
    };
    for dtype in [DType::F32, DType::BF16] {
        for z in [ZSpec::Dense, sparse] {
            let start = perturbed(&values, &shape, dtype, id, z, eps);
            let backend = CpuBackend::new();
            let state = |v: &[f32]| backend.zo_state(v).unwrap();
            let (mut cpu, mut cm, mut cv) = (copy(&start), state(&m0), state(&v0));
            backend
                .zo_pass(
                    &mut cpu,
                    id,
                    KEY,
                    z,
                    eps,
                    Rule::Adam(a),
                    Some((&mut cm, &mut cv)),
                )
                .unwrap();
            // All three aligned, then each of them alone misaligned.
            let elt = dtype.size();
            for (ws, ms, vs) in [(0, 0, 0), (elt, 0, 0), (0, 4, 0), (0, 0, 4)] {
                let moments = |v: &[f32], shift| Placed::new(&tensor(v, &[n], DType::F32), shift);
                let mut got = Placed::new(&start, ws);
                let (mut gm, mut gv) = (moments(&m0, ms), moments(&v0, vs));
                let key = PhiloxKey::of_tensor(KEY, id);
                kernels::zo_adam_pass(
                    emu,
                    got.addr(),
                    dtype,
                    gm.addr(),
                    gv.addr(),
                    n,
                    key,
                    elem_z(z),
                    eps,
                    &a,
                )
                .unwrap();
                let what = format!("{dtype:?} {z:?} Adam, shifts {ws} {ms} {vs}");
                same_bits(&got.values(), &cpu.to_f32_vec(), &format!("{what} weights"));
                same_bits(&gm.values(), &cm.data, &format!("{what} first moments"));
                same_bits(&gv.values(), &cv.data, &format!("{what} second moments"));
            }
        }
    }
}

#[test]
fn low_rank_passes_and_decay_leave_the_cpu_bits() {
    let Some(emu) = emulator() else { return };
    // 70 rows: two full tiles of 32 and a partial one; 300 columns: two blocks of 128 and a
    // partial one.
    let (rows, cols, id, eps) = (70usize, 300usize, 8, 1e-3f32);
    let values = randn(rows * cols, 15, 0.05);
    for dtype in [DType::F32, DType::BF16] {
        for rank in [1usize, 5, 8] {
            let coef = randn(rank, 16 + rank as u64, 1.0);
            let z = ZSpec::LowRank { coef: &coef };
            let what = format!("{dtype:?} rank {rank}");
            // From +eps z to -eps z: the pass must take the old perturbation off first.
            let start = perturbed(&values, &[rows, cols], dtype, id, z, eps);
            let mut cpu = copy(&start);
            CpuBackend::new()
                .zo_pass(&mut cpu, id, KEY, z, eps, Rule::Move { to: -eps }, None)
                .unwrap();
            let factors = (FACTOR_U, FACTOR_V);
            // In place, and from the tensor into a copy that starts poisoned.
            for into_copy in [false, true] {
                let mut src = copy(&start);
                let mut got = if into_copy {
                    tensor(&vec![f32::NAN; rows * cols], &[rows, cols], dtype)
                } else {
                    copy(&start)
                };
                let dst = storage(&mut got);
                let at = (dst, if into_copy { storage(&mut src) } else { dst });
                kernels::zo_low_rank_move(
                    emu,
                    at,
                    dtype,
                    rows,
                    cols,
                    addr(&coef),
                    rank,
                    KEY.seed,
                    id as u32,
                    factors,
                    eps,
                    -eps,
                )
                .unwrap();
                let what = format!("{what}, into a copy: {into_copy}");
                same_bits(&got.to_f32_vec(), &cpu.to_f32_vec(), &what);
                let source = format!("{what}: the source");
                same_bits(&src.to_f32_vec(), &start.to_f32_vec(), &source);
            }
        }
        let mut cpu = tensor(&values, &[rows, cols], dtype);
        let mut got = copy(&cpu);
        CpuBackend::new().zo_decay(&mut cpu, 3e-3).unwrap();
        kernels::zo_decay(emu, storage(&mut got), dtype, rows * cols, 3e-3).unwrap();
        same_bits(
            &got.to_f32_vec(),
            &cpu.to_f32_vec(),
            &format!("{dtype:?} decay"),
        );
    }
}

#[test]
fn a_batch_of_low_rank_moves_is_each_matrixs_move() {
    let Some(emu) = emulator() else { return };
    let eps = 1e-3f32;
    // (rows, cols, rank, dtype, id, into a copy): several column blocks and row tiles, ranks
    // that differ within the batch (shared memory for the largest), an empty matrix, a tall
    // one whose blocks each walk more than one row tile, and moves in place and into copies.
    let matrices = [
        (70usize, 300usize, 5usize, DType::F32, 8usize, false),
        (33, 129, 8, DType::BF16, 9, true),
        (0, 16, 3, DType::F32, 10, false),
        (9, 7, 1, DType::BF16, 11, false),
        (32 * 1030, 2, 2, DType::F32, 12, true),
    ];
    let mut jobs = kernels::LowRankJobs::default();
    let mut sources = vec![];
    let mut got = vec![];
    let mut wants = vec![];
    for &(rows, cols, rank, dtype, id, into_copy) in &matrices {
        let values = randn(rows * cols, 70 + id as u64, 0.05);
        let coef = randn(rank, 80 + id as u64, 1.0);
        let z = ZSpec::LowRank { coef: &coef };
        // From +eps z to -eps z: each move must take the old perturbation off first.
        let start = perturbed(&values, &[rows, cols], dtype, id, z, eps);
        let mut cpu = copy(&start);
        CpuBackend::new()
            .zo_pass(&mut cpu, id, KEY, z, eps, Rule::Move { to: -eps }, None)
            .unwrap();
        wants.push(cpu.to_f32_vec());
        let mut src = copy(&start);
        let mut dst = if into_copy {
            tensor(&vec![f32::NAN; rows * cols], &[rows, cols], dtype)
        } else {
            copy(&start)
        };
        let at = (storage(&mut dst), storage(&mut src));
        let at = if into_copy { at } else { (at.0, at.0) };
        let shape = (rows, cols);
        jobs.push(at, dtype, shape, id as u32, &coef, eps, -eps)
            .unwrap();
        sources.push((start, src, into_copy));
        got.push(dst);
    }
    let jobs_made = jobs.jobs.jobs.len();
    assert_eq!(
        jobs_made,
        matrices.len() - 1,
        "the empty matrix makes no job"
    );
    let walkers = jobs.jobs.jobs.last().map(|j| j.grid_y());
    assert!(
        walkers < Some(1030),
        "the tall matrix's blocks walk its row tiles"
    );
    let coefficients = jobs.coefficients.clone();
    jobs.resolve(addr(&coefficients));
    let table = (
        addr(bytemuck::cast_slice::<_, u8>(&jobs.jobs.jobs)),
        jobs_made,
        jobs.jobs.blocks,
    );
    let factors = (FACTOR_U, FACTOR_V);
    kernels::zo_low_rank_move_jobs(emu, table, jobs.max_rank(), KEY.seed, factors).unwrap();
    for (i, (w, want)) in got.iter().zip(&wants).enumerate() {
        same_bits(&w.to_f32_vec(), want, &format!("matrix {i} of the batch"));
        let (start, src, into_copy) = &sources[i];
        if *into_copy {
            let what = format!("the source of copy {i}");
            same_bits(&src.to_f32_vec(), &start.to_f32_vec(), &what);
        }
    }

    // Ranks the kernel cannot take are refused by name.
    for coef in [vec![], vec![0.5; kernels::LR_MAX_RANK + 1]] {
        let e = (jobs.push((0, 0), DType::F32, (4, 4), 1, &coef, 0.0, 1.0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("zo_low_rank_move_jobs: rank"), "{e}");
    }
    // A batch of more thread blocks than a one-dimensional grid holds is refused, not cut.
    let too_many = (table.0, 1, 1u64 << 31);
    let e = kernels::zo_low_rank_move_jobs(emu, too_many, 4, KEY.seed, factors)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("2147483648 thread blocks exceed the grid"),
        "{e}"
    );
}

#[test]
fn perturbed_copies_and_gathered_rows_have_the_cpu_pass_bits() {
    let Some(emu) = emulator() else { return };
    let (rows, cols, id, to) = (37, 130, 4, -2e-2);
    let values = randn(rows * cols, 3, 0.05);
    let sparse = ZSpec::Sparse {
        threshold: fifth_threshold(&values),
    };
    for dtype in [DType::F32, DType::BF16] {
        for z in [ZSpec::Dense, sparse] {
            let what = format!("{dtype:?} {z:?}");
            let key = PhiloxKey::of_tensor(KEY, id);
            // The CPU twin: an in-place Move pass from offset 0 over the whole tensor.
            let w = tensor(&values, &[rows, cols], dtype);
            let moved_to = |to: f32| {
                let mut moved = copy(&w);
                CpuBackend::new()
                    .zo_pass(&mut moved, id, KEY, z, 0.0, Rule::Move { to }, None)
                    .unwrap();
                moved.to_f32_vec()
            };
            let want = moved_to(to);

            // Blocks of 20 rows whose z starts inside the tensor: from row 3 (element 390, inside
            // a Philox block), and from row 4 (element 520, on a block's edge) with each of the
            // table, the copy and the other stream's copy at an aligned address or not.
            let elt = dtype.size();
            let want_other = moved_to(-3.0 * to);
            let nr = 20;
            let n = nr * cols;
            for (r0, [src_shift, dst_shift, other_shift]) in [
                (3, [0, 0, 0]),
                (4, [0, 0, 0]),
                (4, [elt, 0, 0]),
                (4, [0, elt, 0]),
                (4, [0, 0, elt]),
            ] {
                let what =
                    format!("{what} rows {r0}.., shifts {src_shift} {dst_shift} {other_shift}");
                let mut table = Placed::new(&w, src_shift);
                let src = table.addr() + (r0 * cols * elt) as u64;
                let start = (r0 * cols) as u64;
                let poisoned = || tensor(&vec![f32::NAN; n], &[nr, cols], dtype);
                let copy_to = |dst: &mut Placed, other: Option<(&mut Placed, f32)>| {
                    let other = other.map(|(o, to)| (o.addr(), to));
                    kernels::zo_perturbed_copy(
                        emu,
                        src,
                        dtype,
                        n,
                        start,
                        key,
                        elem_z(z),
                        (dst.addr(), to),
                        other,
                    )
                    .unwrap();
                };
                let mut dst = Placed::new(&poisoned(), dst_shift);
                copy_to(&mut dst, None);
                let block = &want[r0 * cols..(r0 + nr) * cols];
                same_bits(&dst.values(), block, &format!("{what} block copy"));

                // Both streams' copies of a paired forward from one launch: the second with the
                // bits of a Move pass to -3 to.
                let mut pair = Placed::new(&poisoned(), dst_shift);
                let mut other = Placed::new(&poisoned(), other_shift);
                copy_to(&mut pair, Some((&mut other, -3.0 * to)));
                same_bits(&pair.values(), block, &format!("{what} paired copy"));
                let block_other = &want_other[r0 * cols..(r0 + nr) * cols];
                same_bits(&other.values(), block_other, &format!("{what} other copy"));
            }

            // Gathered rows (as the embedding kernel widens them), one row twice.
            let ids = [5u32, 0, 36, 5];
            let table = w.to_f32_vec();
            let mut gathered: Vec<f32> = ids
                .iter()
                .flat_map(|&t| table[t as usize * cols..(t as usize + 1) * cols].to_vec())
                .collect();
            kernels::zo_perturb_gathered(
                emu,
                addr_mut(&mut gathered),
                addr(&ids),
                dtype,
                ids.len(),
                cols,
                key,
                elem_z(z),
                to,
            )
            .unwrap();
            let want_rows: Vec<f32> = ids
                .iter()
                .flat_map(|&t| want[t as usize * cols..(t as usize + 1) * cols].to_vec())
                .collect();
            same_bits(&gathered, &want_rows, &format!("{what} gathered rows"));
        }
    }
}

#[test]
fn a_batch_of_perturbed_copies_is_each_tensors_copy() {
    let Some(emu) = emulator() else { return };
    let to = 3e-2;
    // (shape, dtype, parameter id, sparse, byte shift of the copy): a norm-like f32 vector,
    // bf16 and f32 matrices whose sizes are no multiple of a Philox block, one of them
    // written to a misaligned copy, and an empty tensor between them.
    let tensors: [(&[usize], DType, usize, bool, usize); 5] = [
        (&[61], DType::F32, 1, false, 0),
        (&[13, 37], DType::BF16, 2, true, 0),
        (&[0], DType::BF16, 3, false, 0),
        (&[9, 21], DType::BF16, 4, false, 2),
        (&[17, 5], DType::F32, 7, true, 0),
    ];
    let mut sources = vec![];
    let mut copies = vec![];
    let mut wants = vec![];
    let mut jobs = kernels::CopyJobs::default();
    for (i, &(shape, dtype, id, sparse, shift)) in tensors.iter().enumerate() {
        let n: usize = shape.iter().product();
        let values = randn(n, 40 + i as u64, 0.05);
        let z = if sparse {
            ZSpec::Sparse {
                threshold: fifth_threshold(&values),
            }
        } else {
            ZSpec::Dense
        };
        let w = tensor(&values, shape, dtype);
        let mut want = copy(&w);
        CpuBackend::new()
            .zo_pass(&mut want, id, KEY, z, 0.0, Rule::Move { to }, None)
            .unwrap();
        wants.push(want.to_f32_vec());
        let mut src = Placed::new(&w, 0);
        let mut dst = Placed::new(&tensor(&vec![f32::NAN; n], shape, dtype), shift);
        let key = PhiloxKey::of_tensor(KEY, id);
        jobs.push((src.addr(), dst.addr()), dtype, n, key.tensor, elem_z(z))
            .unwrap();
        sources.push(src);
        copies.push(dst);
    }
    assert_eq!(jobs.jobs.len(), 4, "the empty tensor makes no job");
    let table = addr(bytemuck::cast_slice::<_, u8>(&jobs.jobs));
    let key = PhiloxKey::of_tensor(KEY, 0);
    kernels::zo_perturbed_copy_jobs(emu, table, jobs.jobs.len(), jobs.blocks, key, to).unwrap();
    for (i, (got, want)) in copies.iter().zip(&wants).enumerate() {
        same_bits(&got.values(), want, &format!("tensor {i} of the batch"));
    }
}

#[test]
fn a_batch_of_factors_is_each_matrixs_factors() {
    let Some(emu) = emulator() else { return };
    // (tensor word, m, n, rank, byte shift): sizes off the Philox block, a one-row U, ranks
    // that are not a power of two, factors at aligned and misaligned addresses.
    let matrices = [
        (3u32, 45, 13, 7, 0),
        (4, 8, 21, 16, 4),
        (9, 1, 3, 5, 0),
        (11, 30, 9, 3, 12),
    ];
    let mut jobs = kernels::FactorJobs::default();
    let mut placed = vec![];
    let mut wants = vec![];
    let coefficients: Vec<Vec<f32>> = (matrices.iter())
        .map(|&(tensor, _, _, rank, _)| randn(rank, 60 + tensor as u64, 1e-2))
        .collect();
    for (&(tensor, m, n, rank, shift), coef) in matrices.iter().zip(&coefficients) {
        let norm = 1.0 / (rank as f32).sqrt();
        let f = crate::zo::direction::Factors::generate(SEED, tensor as usize, m, n, rank);
        let us: Vec<f32> = (f.u.iter().enumerate())
            .map(|(i, x)| x * coef[i % rank] * norm)
            .collect();
        let v: Vec<f32> = (0..n * rank)
            .map(|i| f.vt[(i % rank) * n + i / rank])
            .collect();
        for (want, step, scale) in [
            (us, FACTOR_U, Some((addr(coef), norm))),
            (v, FACTOR_V, None),
        ] {
            let poisoned = tensor_f32(&vec![f32::NAN; want.len()]);
            let mut dst = Placed::new(&poisoned, shift);
            let key = PhiloxKey {
                seed: SEED,
                step,
                tensor,
            };
            jobs.push(dst.addr(), want.len(), rank, key, scale).unwrap();
            placed.push(dst);
            wants.push(want);
        }
    }
    assert_eq!(jobs.jobs.len(), 2 * matrices.len());
    let table = addr(bytemuck::cast_slice::<_, u8>(&jobs.jobs));
    kernels::zo_factor_jobs(emu, table, jobs.jobs.len(), jobs.blocks, SEED).unwrap();
    for (i, (got, want)) in placed.iter().zip(&wants).enumerate() {
        let which = if i % 2 == 0 {
            "U diag(c) / sqrt(r)"
        } else {
            "V"
        };
        same_bits(&got.values(), want, &format!("{which} of matrix {}", i / 2));
    }

    // An empty factor adds no job; a factor no columns wide is refused.
    let key = PhiloxKey {
        seed: SEED,
        step: FACTOR_V,
        tensor: 1,
    };
    let before = jobs.jobs.len();
    jobs.push(table, 0, 4, key, None).unwrap();
    assert_eq!(jobs.jobs.len(), before, "an empty factor made a job");
    let e = jobs.push(table, 8, 0, key, None).unwrap_err().to_string();
    assert!(e.contains("0 columns"), "{e}");
}

fn tensor_f32(values: &[f32]) -> HostTensor {
    tensor(values, &[values.len()], DType::F32)
}

#[test]
fn a_batch_of_element_passes_is_each_tensors_pass() {
    let Some(emu) = emulator() else { return };
    let eps = 1e-3f32;
    let adam = ADAM;
    let sgd = Rule::Sgd {
        lr: 0.3,
        g: -1.7,
        wd: 0.05,
    };
    // (shape, dtype, id, sparse, rule, byte shifts of w and of the moments): every rule and
    // dtype, sizes off the Philox block, an empty tensor, misaligned weights and moments.
    type Case = (&'static [usize], DType, usize, bool, Rule, (usize, usize));
    let cases: [Case; 6] = [
        (&[61], DType::F32, 1, false, Rule::Move { to: -eps }, (0, 0)),
        (&[13, 37], DType::BF16, 2, true, sgd, (0, 0)),
        (&[0], DType::BF16, 3, false, sgd, (0, 0)),
        (&[9, 21], DType::BF16, 4, false, Rule::Adam(adam), (0, 0)),
        (&[17, 5], DType::F32, 7, true, Rule::Adam(adam), (4, 8)),
        (&[3, 50], DType::BF16, 8, false, sgd, (2, 0)),
    ];
    let mut jobs = kernels::PassJobs::default();
    let mut held = vec![];
    for (i, &(shape, dtype, id, sparse, rule, (ws, ms))) in cases.iter().enumerate() {
        let n: usize = shape.iter().product();
        let values = randn(n, 60 + i as u64, 0.05);
        let z = match sparse {
            true => ZSpec::Sparse {
                threshold: fifth_threshold(&values),
            },
            false => ZSpec::Dense,
        };
        // From w0 + eps z, as a step's last pass finds the weights.
        let start = perturbed(&values, shape, dtype, id, z, eps);
        let (m0, v0) = (randn(n, 70 + i as u64, 1e-3), randn(n, 80 + i as u64, 1e-2));
        let v0: Vec<f32> = v0.iter().map(|x| x * x).collect();
        let backend = CpuBackend::new();
        let (mut cm, mut cv) = (
            backend.zo_state(&m0).unwrap(),
            backend.zo_state(&v0).unwrap(),
        );
        let mut want = copy(&start);
        backend
            .zo_pass(&mut want, id, KEY, z, eps, rule, Some((&mut cm, &mut cv)))
            .unwrap();
        let mut w = Placed::new(&start, ws);
        let moments = |v: &[f32]| Placed::new(&tensor(v, &[n], DType::F32), ms);
        let (mut m, mut v) = (moments(&m0), moments(&v0));
        let job_rule = match rule {
            Rule::Move { to } => kernels::JobRule::Elem(ElemRule::Move { to }),
            Rule::Sgd { lr, g, wd } => kernels::JobRule::Elem(ElemRule::Sgd { lr, g, wd }),
            Rule::Adam(_) => kernels::JobRule::Adam {
                m: m.addr(),
                v: v.addr(),
                args: &adam,
            },
        };
        let tensor = PhiloxKey::of_tensor(KEY, id).tensor;
        jobs.push(w.addr(), dtype, n, tensor, elem_z(z), eps, job_rule)
            .unwrap();
        held.push((w, m, v, want, cm.data.clone(), cv.data.clone(), rule));
    }
    assert_eq!(jobs.jobs.len(), 5, "the empty tensor makes no job");
    let table = addr(bytemuck::cast_slice::<_, u8>(&jobs.jobs));
    let key = PhiloxKey::of_tensor(KEY, 0);
    kernels::zo_pass_jobs(emu, table, jobs.jobs.len(), jobs.blocks, key).unwrap();
    for (i, (w, m, v, want, cm, cv, rule)) in held.iter().enumerate() {
        let what = format!("tensor {i} of the batch ({rule:?})");
        same_bits(&w.values(), &want.to_f32_vec(), &what);
        if let Rule::Adam(_) = rule {
            same_bits(&m.values(), cm, &format!("{what}: m"));
            same_bits(&v.values(), cv, &format!("{what}: v"));
        }
    }
}

#[test]
fn vocabulary_blocks_and_scaled_factors_match_their_cpu_twins() {
    let Some(emu) = emulator() else { return };
    // Running log-sum-exp over blocks of 64 of 300 logits (the last block short).
    let (rows, vocab, block) = (6, 300, 64);
    let logits = randn(rows * vocab, 7, 3.0);
    let targets = [0i32, 299, 64, 63, 150, 7];
    let mut want = vec![RunningLogSumExp::EMPTY; rows];
    let mut run_max = vec![f32::NEG_INFINITY; rows];
    let mut run_sum = vec![0.0f64; rows];
    let mut run_tgt = vec![f32::NAN; rows];
    for v0 in (0..vocab).step_by(block) {
        let nv = block.min(vocab - v0);
        let part: Vec<f32> = (0..rows)
            .flat_map(|r| logits[r * vocab + v0..r * vocab + v0 + nv].to_vec())
            .collect();
        for (run, (p, &t)) in want.iter_mut().zip(part.chunks(nv).zip(&targets)) {
            run.add_block(p, v0, t as usize);
        }
        kernels::lse_block(
            emu,
            addr(&part),
            nv,
            v0,
            addr(&targets),
            addr_mut(&mut run_max),
            addr_mut(&mut run_sum),
            addr_mut(&mut run_tgt),
            rows,
        )
        .unwrap();
    }
    for (r, w) in want.iter().enumerate() {
        assert_eq!(run_max[r].to_bits(), w.max.to_bits(), "row {r}: maximum");
        assert_eq!(
            run_tgt[r].to_bits(),
            w.target.to_bits(),
            "row {r}: target logit"
        );
        // exp comes from the host's libm here and CUDA's on the device, the CPU's from its own
        // vectorized code, and the f64 sums run in different orders.
        let e = (run_sum[r] - w.sum).abs() / w.sum;
        assert!(e < 1e-5, "row {r}: sum of exponentials off by {e:e}");
    }

    // U diag(c) / sqrt(r), multiplied in the low-rank kernel's order.
    let (m, rank) = (45, 7);
    let u = randn(m * rank, 8, 1.0);
    let coef = randn(rank, 9, 1e-2);
    let norm = 1.0 / (rank as f32).sqrt();
    let mut x = u.clone();
    kernels::scale_cols(emu, addr_mut(&mut x), m * rank, rank, addr(&coef), norm).unwrap();
    let want: Vec<f32> = u
        .iter()
        .enumerate()
        .map(|(i, v)| v * coef[i % rank] * norm)
        .collect();
    same_bits(&x, &want, "scaled U");
}

#[test]
fn scaled_and_shifted_fills_and_axpy_are_the_cpu_expressions() {
    let Some(emu) = emulator() else { return };
    let key = PhiloxKey {
        seed: SEED,
        step: 2,
        tensor: 17,
    };
    let p = Philox::new(SEED, 2, 17);
    let n = 517;
    let elems = |f: &dyn Fn(usize) -> f32| (0..n).map(f).collect::<Vec<f32>>();

    // The random model's norm gains and weights: 1 + 0.1 z in f32, 0.05 z rounded to bf16;
    // from an element inside a Philox block, and from one on a block's edge at an aligned
    // address or not.
    for (start, shift) in [(6u64, 0usize), (8, 0), (8, 1)] {
        let z = |i: usize| p.normal(start + i as u64);
        let what = format!("from {start} at shift {shift} elements");
        let mut got = Placed::new(&tensor(&vec![f32::NAN; n], &[n], DType::F32), 4 * shift);
        kernels::fill_normal(emu, got.addr(), DType::F32, n, key, start, 0.1, 1.0).unwrap();
        same_bits(
            &got.values(),
            &elems(&|i| 1.0 + 0.1 * z(i)),
            &format!("1 + 0.1 z {what}"),
        );
        let mut got = Placed::new(&tensor(&vec![f32::NAN; n], &[n], DType::BF16), 2 * shift);
        kernels::fill_normal(emu, got.addr(), DType::BF16, n, key, start, 0.05, 0.0).unwrap();
        let want = tensor(&elems(&|i| 0.05 * z(i)), &[n], DType::BF16);
        same_bits(
            &got.values(),
            &want.to_f32_vec(),
            &format!("0.05 z in bf16 {what}"),
        );

        let base = randn(n, 21, 1.0);
        for dtype in [DType::F32, DType::BF16] {
            let from = tensor(&base, &[n], dtype);
            let mut got = Placed::new(&from, shift * dtype.size());
            kernels::axpy_normal(emu, got.addr(), dtype, n, key, start, -3e-2).unwrap();
            let from = from.to_f32_vec();
            let want = tensor(&elems(&|i| from[i] + -3e-2 * z(i)), &[n], dtype);
            same_bits(
                &got.values(),
                &want.to_f32_vec(),
                &format!("{dtype:?} w + s z {what}"),
            );
        }
    }

    let start = 6;
    let mut got = vec![f32::NAN; n];
    kernels::fill_rademacher(emu, addr_mut(&mut got), n, key, start, 0.5).unwrap();
    same_bits(
        &got,
        &elems(&|i| 0.5 * p.rademacher(start + i as u64)),
        "Rademacher signs",
    );
}
