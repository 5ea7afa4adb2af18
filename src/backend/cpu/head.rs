//! The LM head's log-probabilities of target tokens, a block of vocabulary rows at a time.
//!
//! The vocabulary is the outer loop and each block meets every row of x in one GEMM (rows past
//! `row_chunk` are taken in chunks), so the head is read, and packed by the bf16 kernels, once
//! per forward; a row's log-sum-exp runs across the blocks. A fused ZO forward perturbs each
//! block once the same way (`zo::hook`).

use super::gemm_bf16::WeightRows;
use super::{gather_rows, max_sum_exp, target_rows, CpuAct, CpuBackend, LOGIT_CHUNK_ROWS};
use crate::backend::mem::Tag;
use anyhow::Result;
use rayon::prelude::*;

/// Vocabulary rows of the head per block.
pub const HEAD_BLOCK_ROWS: usize = 1024;

/// A head seen block by block: `product` runs on rows v0 .. v0 + rows of the [vocab][d]
/// weight as stream `stream` of the rows sees it (a paired ZO forward scores two streams
/// through two perturbations of one head; a single forward has stream 0 only). The rows are
/// in memory, or built a tile at a time inside the GEMM (`WeightRows::Built`).
pub trait HeadBlocks {
    fn block(&mut self, v0: usize, rows: usize, stream: usize, product: &mut dyn FnMut(WeightRows));
}

/// An f32 head as stored.
pub struct PlainHead<'a> {
    pub w: &'a [f32],
    pub d: usize,
}

impl HeadBlocks for PlainHead<'_> {
    fn block(&mut self, v0: usize, rows: usize, _: usize, product: &mut dyn FnMut(WeightRows)) {
        product(WeightRows::Stored(
            &self.w[v0 * self.d..(v0 + rows) * self.d],
        ))
    }
}

/// log p(targets[r] | row r of `hidden`) for every row with a target (>= 0), 0 elsewhere,
/// through a head of `vocab` rows seen `block_rows` vocabulary rows at a time. The rows with a
/// target are gathered first; their [rows x block] logits are held a chunk of rows at a time,
/// within the LOGIT_CHUNK_ROWS x vocab that a row-chunked head would hold.
pub fn target_logprobs(
    be: &CpuBackend,
    hidden: &CpuAct,
    targets: &[i32],
    vocab: usize,
    block_rows: usize,
    head: &mut dyn HeadBlocks,
) -> Result<Vec<f32>> {
    let [lp] = target_logprobs_streams(be, [hidden], targets, vocab, block_rows, head)?;
    Ok(lp)
}

/// `target_logprobs` of N streams of hidden states with the same targets: each block of the
/// vocabulary meets every stream before the next block is asked for, so a head that prepares
/// something per block (the paired hook's z) prepares it once for all streams.
pub fn target_logprobs_streams<const N: usize>(
    be: &CpuBackend,
    hidden: [&CpuAct; N],
    targets: &[i32],
    vocab: usize,
    block_rows: usize,
    head: &mut dyn HeadBlocks,
) -> Result<[Vec<f32>; N]> {
    let d = hidden[0].cols;
    let rows = target_rows(targets, hidden[0].rows, vocab)?;
    let n = rows.len();
    let block = block_rows.clamp(1, vocab.max(1));
    let chunk = (LOGIT_CHUNK_ROWS * vocab / block).clamp(1, n.max(1));
    let bytes = N * (n * d * 4 + n * std::mem::size_of::<RunningLogSumExp>()) + chunk * block * 4;
    be.mem.add(Tag::Scratch, bytes);
    let mut xs = Vec::with_capacity(N);
    for h in hidden {
        xs.push(gather_rows(h, &rows).inspect_err(|_| be.mem.sub(Tag::Scratch, bytes))?);
    }
    let mut running = vec![vec![RunningLogSumExp::EMPTY; n]; N];
    let mut part = vec![0.0f32; chunk * block];
    for v0 in (0..vocab).step_by(block) {
        let nv = block.min(vocab - v0);
        for (stream, (x, running)) in xs.iter().zip(&mut running).enumerate() {
            head.block(v0, nv, stream, &mut |w| {
                for ((xs, run), rs) in x
                    .chunks(chunk * d)
                    .zip(running.chunks_mut(chunk))
                    .zip(rows.chunks(chunk))
                {
                    let part = &mut part[..rs.len() * nv];
                    be.matmul_rows(xs, w, part, rs.len(), nv, d);
                    part.par_chunks(nv)
                        .zip(run.par_iter_mut())
                        .zip(rs.par_iter())
                        .for_each(|((logits, run), &r)| {
                            run.add_block(logits, v0, targets[r] as usize)
                        });
                }
            });
        }
    }
    be.mem.sub(Tag::Scratch, bytes);
    Ok(std::array::from_fn(|s| {
        let mut out = vec![0.0f32; targets.len()];
        for (&r, run) in rows.iter().zip(&running[s]) {
            out[r] = run.logprob();
        }
        out
    }))
}

/// The full logits [rows.len() x vocab] of the listed rows of each of N streams, through a
/// head seen `block_rows` vocabulary rows at a time; as in `target_logprobs_streams`, each
/// block meets every stream before the next block is asked for.
pub fn logits_rows_streams<const N: usize>(
    be: &CpuBackend,
    hidden: [&CpuAct; N],
    rows: &[usize],
    vocab: usize,
    block_rows: usize,
    head: &mut dyn HeadBlocks,
) -> Result<[Vec<f32>; N]> {
    let d = hidden[0].cols;
    let mut xs = Vec::with_capacity(N);
    for h in hidden {
        xs.push(gather_rows(h, rows)?);
    }
    let block = block_rows.clamp(1, vocab.max(1));
    let part_bytes = rows.len() * block * 4;
    be.mem.add(Tag::Scratch, part_bytes);
    let mut out: [Vec<f32>; N] = std::array::from_fn(|_| vec![0.0f32; rows.len() * vocab]);
    let mut part = vec![0.0f32; rows.len() * block];
    for v0 in (0..vocab).step_by(block) {
        let nv = block.min(vocab - v0);
        for (stream, (x, out)) in xs.iter().zip(&mut out).enumerate() {
            head.block(v0, nv, stream, &mut |w| {
                let part = &mut part[..rows.len() * nv];
                be.matmul_rows(x, w, part, rows.len(), nv, d);
                for (o, p) in out.chunks_mut(vocab).zip(part.chunks(nv)) {
                    o[v0..v0 + nv].copy_from_slice(p);
                }
            });
        }
    }
    be.mem.sub(Tag::Scratch, part_bytes);
    Ok(out)
}

/// A row's log-sum-exp over the vocabulary, gathered a block of columns at a time, and the
/// logit of its target once the block holding it has passed.
#[derive(Clone, Copy)]
pub(crate) struct RunningLogSumExp {
    pub(crate) max: f32,
    /// The sum of exp(logit - max) so far.
    pub(crate) sum: f64,
    pub(crate) target: f32,
}

impl RunningLogSumExp {
    pub(crate) const EMPTY: Self = RunningLogSumExp {
        max: f32::NEG_INFINITY,
        sum: 0.0,
        target: f32::NAN,
    };

    /// Takes in the logits of vocabulary ids v0 .. v0 + logits.len().
    pub(crate) fn add_block(&mut self, logits: &[f32], v0: usize, target: usize) {
        let (m, s) = max_sum_exp(logits);
        if m > self.max {
            self.sum = self.sum * ((self.max - m) as f64).exp() + s;
            self.max = m;
        } else {
            self.sum += s * ((m - self.max) as f64).exp();
        }
        if let Some(t) = target.checked_sub(v0).filter(|&t| t < logits.len()) {
            self.target = logits[t];
        }
    }

    pub(crate) fn logprob(&self) -> f32 {
        self.target - (self.max + self.sum.ln() as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use crate::data::batch::log_sum_exp;

    #[test]
    fn running_log_sum_exp_equals_the_whole_row_as_later_blocks_raise_the_max() {
        // The running max rises by several units from block to block (a sum not rescaled to
        // a new max would be off by far more than rounding), and the last third sits low.
        let row: Vec<f32> = (0..300)
            .map(|i| {
                let x = i as f32;
                0.05 * x + 3.0 * (0.37 * x).sin() - if i > 200 { 15.0 } else { 0.0 }
            })
            .collect();
        let target = 123;
        let row64: Vec<f64> = row.iter().map(|&v| v as f64).collect();
        let exact = row64[target] - log_sum_exp(&row64);
        for block in [1, 7, 64, 300] {
            let mut run = RunningLogSumExp::EMPTY;
            for (b, logits) in row.chunks(block).enumerate() {
                run.add_block(logits, b * block, target);
            }
            let got = run.logprob() as f64;
            assert!(
                (got - exact).abs() < 1e-5 * exact.abs().max(1.0),
                "blocks of {block}: {got} where {exact} is expected"
            );
        }
    }

    /// The blocked head against f64 log-softmax of the same logits, with block sizes that do
    /// and do not divide the vocabulary, and more rows than one chunk holds.
    #[test]
    fn blocked_head_matches_f64_log_softmax() {
        let (rows, d, vocab) = (300, 24, 97);
        let rng = crate::rng::Philox::new(21, 0, 0);
        let mut x = vec![0f32; rows * d];
        let mut w = vec![0f32; vocab * d];
        rng.fill_normal(0, &mut x);
        rng.fill_normal(1 << 32, &mut w);
        // Every third row has no target.
        let targets: Vec<i32> = (0..rows)
            .map(|r| {
                if r % 3 == 2 {
                    -1
                } else {
                    ((r * 31) % vocab) as i32
                }
            })
            .collect();
        let be = CpuBackend::new();
        let mut hidden = be.alloc(rows, d, Tag::Activations).unwrap();
        hidden.data.copy_from_slice(&x);
        for block in [1, 10, 97, 4096] {
            let mut plain = PlainHead { w: &w, d };
            let got = target_logprobs(&be, &hidden, &targets, vocab, block, &mut plain).unwrap();
            for (r, (&g, &t)) in got.iter().zip(&targets).enumerate() {
                if t < 0 {
                    assert_eq!(g, 0.0, "row {r} has no target");
                    continue;
                }
                let t = t as usize;
                let logits: Vec<f64> = (0..vocab)
                    .map(|v| (0..d).map(|j| (x[r * d + j] * w[v * d + j]) as f64).sum())
                    .collect();
                let want = logits[t] - log_sum_exp(&logits);
                assert!(
                    (g as f64 - want).abs() < 1e-4 * want.abs().max(1.0),
                    "block {block} row {r}: {g} where {want} is expected"
                );
            }
        }
    }
}
