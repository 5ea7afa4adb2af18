//! `--perturb paired` on the CPU: the fused perturbation with the step's two forwards run in
//! lockstep (`Llama::hidden_paired`). Whichever stream reaches a matrix first draws its z once
//! and builds both w + eps z, for itself (a tile at a time inside the bf16 GEMM, else in
//! scratch), and w - eps z, which it leaves for the other stream; so a step draws its dense or
//! sparse z twice (the paired forward and the update) where the fused mode draws it three
//! times, and the second stream reads its weights instead of rebuilding them. Each perturbed
//! weight has the bits the fused mode builds, so the two modes give the same losses and the
//! same weights.
//!
//! The extra memory is the second stream's weights of one group (at most one layer's MLP,
//! three matrices) and of one block of LM-head rows, beside the forward's second residual
//! stream. Low-rank z (TeZO's matrices) costs r multiply-adds an element to rebuild and goes
//! through each stream's own fused hook.

use super::direction::{ElemState, TensorZ};
use super::hook::{perturbed_range_pair, FusedHook};
use super::ZoOptimizer;
use crate::backend::cpu::gemm_bf16::WeightRows;
use crate::backend::cpu::head::{self, HeadBlocks};
use crate::backend::cpu::{CpuAct, CpuBackend};
use crate::backend::mem::{MemCounters, Tag};
use crate::backend::{Backend, LinearHook, PairedHook, ParamId};
use crate::model::HostTensor;
use crate::zo::direction::StepKey;
use anyhow::Result;
use std::sync::Arc;

/// One stream's perturbed weights of one tensor, built by the other stream from the same draw
/// of z, in the first `len` elements of a reusable buffer.
struct Held {
    id: ParamId,
    /// The stream they are for.
    stream: usize,
    len: usize,
    buf: Vec<f32>,
}

pub struct PairedFusedHook<'a> {
    /// Stream 0 sees w + eps z, stream 1 sees w - eps z. A stream's own perturbed copy (with
    /// the f32 GEMM) goes to stream 0's scratch buffer whatever the stream, since the streams
    /// run one after the other.
    streams: [FusedHook<'a>; 2],
    /// The stream the model runs now (set by `stream`).
    current: usize,
    /// The weights the current group has built for its second stream.
    held: Vec<Held>,
    /// Buffers of earlier groups, kept so that each group does not allocate (and fault in)
    /// its buffers afresh.
    spare: Vec<Vec<f32>>,
    /// The second stream's rows of one LM-head block.
    head_held: Vec<f32>,
    /// Bytes of held, spare and head_held, as accounted under `Tag::Scratch`.
    bytes: usize,
    mem: Arc<MemCounters>,
}

impl<'a> PairedFusedHook<'a> {
    pub fn new(opt: &'a ZoOptimizer, key: StepKey, eps: f32, backend: &CpuBackend) -> Self {
        PairedFusedHook {
            streams: [
                FusedHook::new(opt, key, eps, backend),
                FusedHook::new(opt, key, -eps, backend),
            ],
            current: 0,
            held: vec![],
            spare: vec![],
            head_held: vec![],
            bytes: 0,
            mem: backend.mem.clone(),
        }
    }

    /// Perturbs the LM head `rows` vocabulary rows at a time (see `FusedHook`).
    pub fn with_head_block_rows(mut self, rows: usize) -> Self {
        for s in &mut self.streams {
            s.set_head_block_rows(rows);
        }
        self
    }

    /// The signed perturbation sizes of stream `s` and of the other stream.
    fn scales(&self, s: usize) -> [f32; 2] {
        [
            self.streams[s].view().scale,
            self.streams[1 - s].view().scale,
        ]
    }

    /// The element-wise z both streams share for parameter `id`, if it has one (a moving
    /// parameter whose z is dense or sparse rather than low-rank).
    fn shared_z(&self, w: &HostTensor, id: ParamId) -> Result<Option<TensorZ>> {
        let v = self.streams[0].view();
        if !v.moves(id) || v.low_rank(&w.shape).is_some() {
            return Ok(None);
        }
        Ok(Some(TensorZ::from_spec(w, id, v.key, v.elem_z(id))?))
    }

    /// A buffer of `len` elements for stream `stream`'s weights of parameter `id`, as the
    /// index of its entry in `held`.
    fn hold(&mut self, id: ParamId, stream: usize, len: usize) -> usize {
        if let Some(k) = self
            .held
            .iter()
            .position(|h| h.id == id && h.stream == stream)
        {
            let stale = self.held.swap_remove(k);
            self.spare.push(stale.buf);
        }
        // The smallest spare buffer that fits, else the largest one grown.
        let fits = |b: &&Vec<f32>| b.len() >= len;
        let pick = (self.spare.iter().filter(fits).map(Vec::len).min())
            .and_then(|l| self.spare.iter().position(|b| b.len() == l))
            .or_else(|| (0..self.spare.len()).max_by_key(|&i| self.spare[i].len()));
        let mut buf = pick.map_or_else(Vec::new, |i| self.spare.swap_remove(i));
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        self.held.push(Held {
            id,
            stream,
            len,
            buf,
        });
        self.account();
        self.held.len() - 1
    }

    /// Brings the `Tag::Scratch` account to the bytes now held.
    fn account(&mut self) {
        let floats = self.held.iter().map(|h| h.buf.len()).sum::<usize>()
            + self.spare.iter().map(Vec::len).sum::<usize>()
            + self.head_held.len();
        let bytes = floats * 4;
        if bytes > self.bytes {
            self.mem.add(Tag::Scratch, bytes - self.bytes);
        } else {
            self.mem.sub(Tag::Scratch, self.bytes - bytes);
        }
        self.bytes = bytes;
    }

    /// Room in `head_held` for one block of the head's rows.
    fn reserve_head_block(&mut self, head: &HostTensor) -> usize {
        let (vocab, d) = (head.shape[0], head.shape[1]);
        let block = self.streams[0].head_block_rows().min(vocab);
        if self.head_held.len() < block * d {
            self.head_held.resize(block * d, 0.0);
            self.account();
        }
        block
    }
}

impl Drop for PairedFusedHook<'_> {
    fn drop(&mut self) {
        self.mem.sub(Tag::Scratch, self.bytes);
    }
}

impl LinearHook<CpuBackend> for PairedFusedHook<'_> {
    fn param<'b>(
        &'b mut self,
        b: &CpuBackend,
        w: &'b HostTensor,
        id: ParamId,
    ) -> Result<&'b HostTensor> {
        // Norm gains: vectors, whose z costs little to draw per stream.
        self.streams[self.current].param(b, w, id)
    }

    fn embed(
        &mut self,
        b: &CpuBackend,
        table: &HostTensor,
        ids: &[u32],
        id: ParamId,
        out: &mut CpuAct,
    ) -> Result<()> {
        // Only the gathered rows are perturbed, so there is little to share.
        self.streams[self.current].embed(b, table, ids, id, out)
    }

    fn head_target_logprobs(
        &mut self,
        b: &CpuBackend,
        hidden: &CpuAct,
        head: &HostTensor,
        id: ParamId,
        targets: &[i32],
    ) -> Result<Vec<f32>> {
        self.streams[self.current].head_target_logprobs(b, hidden, head, id, targets)
    }

    fn head_logits_rows(
        &mut self,
        b: &CpuBackend,
        hidden: &CpuAct,
        head: &HostTensor,
        id: ParamId,
        rows: &[usize],
    ) -> Result<Vec<f32>> {
        self.streams[self.current].head_logits_rows(b, hidden, head, id, rows)
    }

    fn linear(
        &mut self,
        b: &CpuBackend,
        x: &CpuAct,
        w: &HostTensor,
        id: ParamId,
        out: &mut CpuAct,
    ) -> Result<()> {
        let Some(tz) = self.shared_z(w, id)? else {
            return self.streams[self.current].linear(b, x, w, id, out);
        };
        let s = self.current;
        if let Some(h) = self.held.iter().find(|h| h.id == id && h.stream == s) {
            let weights = WeightRows::Stored(&h.buf[..h.len]);
            return b.matmul_weight_rows(x, &w.name, &w.shape, weights, out);
        }
        let len = w.shape.iter().product();
        let k = self.hold(id, 1 - s, len);
        let scales = self.scales(s);
        if b.packs_weight_tiles() {
            // Each tile of w + s z is built as the GEMM packs it, with the other stream's rows
            // beside it: `param_pair`'s bits.
            let (cols, other) = (w.shape[1], ElemState::new(&mut self.held[k].buf[..len]));
            let build = |n0: usize, rows: &mut [f32]| {
                let at = n0 * cols;
                // SAFETY: a GEMM builds each tile once, and its tiles are disjoint rows.
                let other = unsafe { other.slice(at, rows.len()) };
                perturbed_range_pair(w, &tz, scales, at, rows, other)
            };
            return b.matmul_weight_rows(x, &w.name, &w.shape, WeightRows::Built(&build), out);
        }
        let Self { streams, held, .. } = self;
        let copy = streams[0].param_pair(w, &tz, scales, &mut held[k].buf[..len]);
        b.matmul(x, copy, out)
    }
}

/// The LM head as the two streams see it, a block at a time, from one draw of each block's
/// z: the first stream to ask for a block builds the other's rows beside its own.
struct PairedHead<'h, 'a> {
    hook: &'h mut PairedFusedHook<'a>,
    head: &'h HostTensor,
    tz: &'h TensorZ,
    /// The first vocabulary row of the block whose rows `hook.head_held` holds, and the
    /// stream they are for.
    held: Option<(usize, usize)>,
    /// Whether the GEMM builds each tile of the perturbed block as it packs it.
    tiles: bool,
}

impl HeadBlocks for PairedHead<'_, '_> {
    fn block(
        &mut self,
        v0: usize,
        rows: usize,
        stream: usize,
        product: &mut dyn FnMut(WeightRows),
    ) {
        let (head, tz, d) = (self.head, self.tz, self.head.shape[1]);
        let scales = self.hook.scales(stream);
        let PairedFusedHook {
            streams, head_held, ..
        } = &mut *self.hook;
        let other = &mut head_held[..rows * d];
        if self.held == Some((v0, stream)) {
            return product(WeightRows::Stored(other));
        }
        self.held = Some((v0, 1 - stream));
        if self.tiles {
            // `head_block_pair`'s bits, a tile at a time inside the GEMM.
            let other = ElemState::new(other);
            let build = |r0: usize, out: &mut [f32]| {
                let at = r0 * d;
                // SAFETY: a GEMM builds each tile once, and its tiles are disjoint rows; the
                // products of one block run one after another.
                let other = unsafe { other.slice(at, out.len()) };
                perturbed_range_pair(head, tz, scales, v0 * d + at, out, other)
            };
            return product(WeightRows::Built(&build));
        }
        let block = streams[0].head_block_pair(head, tz, (v0, rows), scales, other);
        product(WeightRows::Stored(block))
    }
}

impl PairedHook<CpuBackend> for PairedFusedHook<'_> {
    fn stream(&mut self, s: usize) -> &mut dyn LinearHook<CpuBackend> {
        assert!(s < 2, "a paired forward has streams 0 and 1, not {s}");
        self.current = s;
        self
    }

    fn next_group(&mut self) {
        let held = std::mem::take(&mut self.held);
        self.spare.extend(held.into_iter().map(|h| h.buf));
    }

    fn head_target_logprobs(
        &mut self,
        b: &CpuBackend,
        hidden: [&CpuAct; 2],
        head: &HostTensor,
        id: ParamId,
        targets: &[i32],
    ) -> Result<[Vec<f32>; 2]> {
        let Some(tz) = self.shared_z(head, id)? else {
            let [s0, s1] = &mut self.streams;
            return Ok([
                s0.head_target_logprobs(b, hidden[0], head, id, targets)?,
                s1.head_target_logprobs(b, hidden[1], head, id, targets)?,
            ]);
        };
        let block = self.reserve_head_block(head);
        let mut blocks = PairedHead {
            hook: self,
            head,
            tz: &tz,
            held: None,
            tiles: b.packs_weight_tiles(),
        };
        head::target_logprobs_streams(b, hidden, targets, head.shape[0], block, &mut blocks)
    }

    fn head_logits_rows(
        &mut self,
        b: &CpuBackend,
        hidden: [&CpuAct; 2],
        head: &HostTensor,
        id: ParamId,
        rows: &[usize],
    ) -> Result<[Vec<f32>; 2]> {
        let Some(tz) = self.shared_z(head, id)? else {
            let [s0, s1] = &mut self.streams;
            return Ok([
                s0.head_logits_rows(b, hidden[0], head, id, rows)?,
                s1.head_logits_rows(b, hidden[1], head, id, rows)?,
            ]);
        };
        let block = self.reserve_head_block(head);
        let mut blocks = PairedHead {
            hook: self,
            head,
            tz: &tz,
            held: None,
            tiles: b.packs_weight_tiles(),
        };
        head::logits_rows_streams(b, hidden, rows, head.shape[0], block, &mut blocks)
    }
}
