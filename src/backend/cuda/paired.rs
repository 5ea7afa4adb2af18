//! `--perturb paired` on the GPU, the twin of the CPU hook in src/zo/paired.rs: the step's two
//! forwards run in lockstep (`Llama::hidden_paired`), and whichever stream reaches a matrix
//! first writes both perturbed copies, w + eps z for itself and w - eps z for the other, from
//! one draw of z (one launch of `zo_perturbed_copy` with a second destination). The other
//! stream then multiplies by the copy it was left instead of drawing z again, so the linears
//! of a step draw their z twice (the paired forward and the update) where the fused mode draws
//! it three times. Each copy has the bits the fused hook writes, so the two modes give the
//! same losses and weights.
//!
//! The extra memory is the other stream's copies of one group of matrices (at most one
//! layer's MLP, three matrices) and the second stream's own scratch (one block of LM-head
//! rows, or one low-rank matrix), beside the forward's second residual stream. What the paired
//! forward does not share goes through each stream's own fused hook: the norm gains, the
//! embedding rows, the LM head (a block of vocabulary rows at a time, as in the fused mode, so
//! the head's z is drawn once per stream) and TeZO's matrices, each stream copying its own
//! from its own coefficients (w0 plus the virtual update plus or minus eps z are not one draw
//! apart, so they share only the factors, which the kernel regenerates anyway).

use super::fused::CudaFusedHook;
use super::{elt, kernels, CudaAct, CudaBackend, CudaWeight};
use crate::backend::mem::Tag;
use crate::backend::{Backend, LinearHook, PairedHook, ParamId};
use crate::zo::direction::StepKey;
use crate::zo::ZoOptimizer;
use anyhow::Result;

/// One stream's perturbed copy of one matrix, written by the other stream from the same draw
/// of z.
struct Held {
    id: ParamId,
    /// The stream it is for.
    stream: usize,
    weight: CudaWeight,
}

pub struct CudaPairedHook<'a> {
    /// Stream 0 sees w + eps z, stream 1 sees w - eps z.
    streams: [CudaFusedHook<'a>; 2],
    /// The stream the model runs now (set by `stream`).
    current: usize,
    /// The copies the current group has written for its second stream.
    held: Vec<Held>,
    /// Device buffers of earlier groups, kept so that each group does not allocate afresh.
    spare: Vec<CudaWeight>,
}

impl<'a> CudaPairedHook<'a> {
    pub fn new(opt: &'a ZoOptimizer<CudaBackend>, key: StepKey, eps: f32) -> Self {
        CudaPairedHook {
            streams: [
                CudaFusedHook::new(opt, key, eps),
                CudaFusedHook::new(opt, key, -eps),
            ],
            current: 0,
            held: vec![],
            spare: vec![],
        }
    }

    /// Perturbs and multiplies the LM head `rows` vocabulary rows at a time (see
    /// `CudaFusedHook::with_head_block_rows`).
    pub fn with_head_block_rows(self, rows: usize) -> Self {
        let [s0, s1] = self.streams;
        CudaPairedHook {
            streams: [s0.with_head_block_rows(rows), s1.with_head_block_rows(rows)],
            ..self
        }
    }

    /// A buffer for stream `stream`'s copy of parameter `id` (named and shaped as `w`), as
    /// the index of its entry in `held`: the smallest spare buffer that fits, else a new one,
    /// for which the spare buffers too small for it are freed first (so that an attention
    /// block's buffers do not linger beside the larger ones of the MLP after it).
    fn hold(
        &mut self,
        g: &CudaBackend,
        w: &CudaWeight,
        id: ParamId,
        stream: usize,
    ) -> Result<usize> {
        let bytes = w.numel() * elt(w.dtype);
        let fits = (self.spare.iter().enumerate())
            .filter(|(_, s)| s.buf.bytes() >= bytes)
            .min_by_key(|(_, s)| s.buf.bytes())
            .map(|(i, _)| i);
        let mut weight = match fits {
            Some(i) => self.spare.swap_remove(i),
            None => {
                self.spare.clear();
                CudaWeight {
                    buf: g.alloc_buf(bytes.max(1), Tag::Scratch, "a paired forward's held copy")?,
                    dtype: w.dtype,
                    shape: vec![],
                    name: String::new(),
                }
            }
        };
        weight.dtype = w.dtype;
        weight.shape = w.shape.clone();
        weight.name = format!("{} (perturbed, held)", w.name);
        self.held.push(Held { id, stream, weight });
        Ok(self.held.len() - 1)
    }
}

impl LinearHook<CudaBackend> for CudaPairedHook<'_> {
    fn param<'b>(
        &'b mut self,
        g: &CudaBackend,
        w: &'b CudaWeight,
        id: ParamId,
    ) -> Result<&'b CudaWeight> {
        // Norm gains: vectors, whose z costs little to draw per stream.
        self.streams[self.current].param(g, w, id)
    }

    fn embed(
        &mut self,
        g: &CudaBackend,
        table: &CudaWeight,
        ids: &[u32],
        id: ParamId,
        out: &mut CudaAct,
    ) -> Result<()> {
        // Only the gathered rows are perturbed, so there is little to share.
        self.streams[self.current].embed(g, table, ids, id, out)
    }

    fn head_target_logprobs(
        &mut self,
        g: &CudaBackend,
        hidden: &CudaAct,
        head: &CudaWeight,
        id: ParamId,
        targets: &[i32],
    ) -> Result<Vec<f32>> {
        self.streams[self.current].head_target_logprobs(g, hidden, head, id, targets)
    }

    fn head_logits_rows(
        &mut self,
        g: &CudaBackend,
        hidden: &CudaAct,
        head: &CudaWeight,
        id: ParamId,
        rows: &[usize],
    ) -> Result<Vec<f32>> {
        self.streams[self.current].head_logits_rows(g, hidden, head, id, rows)
    }

    fn linear(
        &mut self,
        g: &CudaBackend,
        x: &CudaAct,
        w: &CudaWeight,
        id: ParamId,
        out: &mut CudaAct,
    ) -> Result<()> {
        let s = self.current;
        let view = self.streams[s].view();
        if !view.moves(id) || view.low_rank(&w.shape).is_some() {
            return self.streams[s].linear(g, x, w, id, out);
        }
        if let Some(h) = self.held.iter().find(|h| h.id == id && h.stream == s) {
            return g.matmul(x, &h.weight, out);
        }
        let (key, z) = self.streams[s].elem_key_and_z(id);
        let scales = [
            self.streams[s].view().scale,
            self.streams[1 - s].view().scale,
        ];
        let k = self.hold(g, w, id, 1 - s)?;
        let other = self.held[k].weight.ptr();
        let own = self.streams[s].scratch_for(g, &w.name, &w.shape, w.dtype)?;
        kernels::zo_perturbed_copy(
            &g.dev,
            w.ptr(),
            w.dtype,
            w.numel(),
            0,
            key,
            z,
            (own.ptr(), scales[0]),
            Some((other, scales[1])),
        )?;
        g.matmul(x, own, out)
    }
}

impl PairedHook<CudaBackend> for CudaPairedHook<'_> {
    fn stream(&mut self, s: usize) -> &mut dyn LinearHook<CudaBackend> {
        assert!(s < 2, "a paired forward has streams 0 and 1, not {s}");
        self.current = s;
        self
    }

    fn next_group(&mut self) {
        let held = std::mem::take(&mut self.held);
        self.spare.extend(held.into_iter().map(|h| h.weight));
    }

    fn head_target_logprobs(
        &mut self,
        g: &CudaBackend,
        hidden: [&CudaAct; 2],
        head: &CudaWeight,
        id: ParamId,
        targets: &[i32],
    ) -> Result<[Vec<f32>; 2]> {
        let [s0, s1] = &mut self.streams;
        Ok([
            s0.head_target_logprobs(g, hidden[0], head, id, targets)?,
            s1.head_target_logprobs(g, hidden[1], head, id, targets)?,
        ])
    }

    fn head_logits_rows(
        &mut self,
        g: &CudaBackend,
        hidden: [&CudaAct; 2],
        head: &CudaWeight,
        id: ParamId,
        rows: &[usize],
    ) -> Result<[Vec<f32>; 2]> {
        let [s0, s1] = &mut self.streams;
        Ok([
            s0.head_logits_rows(g, hidden[0], head, id, rows)?,
            s1.head_logits_rows(g, hidden[1], head, id, rows)?,
        ])
    }
}
