//! `--perturb paired` on the CPU: the fused perturbation with the step's two forwards run in
//! lockstep (`Llama::hidden_paired`). The normals of each group's matrices are drawn once and
//! serve both w + eps z and w - eps z, so a step draws its dense or sparse z twice (the paired
//! forward and the update) where the fused mode draws it three times. Each perturbed copy has
//! the bits the fused mode builds, so the two modes give the same losses and the same weights.
//!
//! The extra memory is the normals of one group (at most one layer's MLP, three matrices) and
//! of one block of LM-head rows, beside the forward's second residual stream. Low-rank z (TeZO's
//! matrices) is cheap to rebuild and rides on each stream's own fused hook.

use super::direction::TensorZ;
use super::hook::{perturbed_range_drawn, FusedHook, COPY_CHUNK};
use super::ZoOptimizer;
use crate::backend::cpu::gemm_bf16::WeightRows;
use crate::backend::cpu::head::{self, HeadBlocks};
use crate::backend::cpu::{CpuAct, CpuBackend};
use crate::backend::mem::{MemCounters, Tag};
use crate::backend::{Backend, LinearHook, PairedHook, ParamId};
use crate::model::HostTensor;
use crate::zo::direction::StepKey;
use anyhow::Result;
use rayon::prelude::*;
use std::sync::Arc;

/// Normals drawn for one tensor, in the first `len` elements of a reusable buffer.
struct Drawn {
    id: ParamId,
    len: usize,
    buf: Vec<f32>,
}

pub struct PairedFusedHook<'a> {
    /// Stream 0 sees w + eps z, stream 1 sees w - eps z. The perturbed copies built from
    /// drawn normals go to stream 0's scratch buffer whatever the stream, since the streams
    /// run one after the other.
    streams: [FusedHook<'a>; 2],
    /// The stream the model runs now (set by `stream`).
    current: usize,
    /// The current group's normals.
    drawn: Vec<Drawn>,
    /// Buffers of earlier groups, kept so that each group does not allocate (and fault in)
    /// its buffers afresh.
    spare: Vec<Vec<f32>>,
    /// Normals of one block of LM-head rows.
    head_z: Vec<f32>,
    /// Bytes of drawn, spare and head_z, as accounted under `Tag::Scratch`.
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
            drawn: vec![],
            spare: vec![],
            head_z: vec![],
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

    /// The signed perturbation size of stream `s`.
    fn scale(&self, s: usize) -> f32 {
        self.streams[s].view().scale
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

    /// The index in `drawn` of parameter `id`'s normals, drawing them if this group has not.
    fn draw(&mut self, w: &HostTensor, id: ParamId, tz: &TensorZ) -> usize {
        if let Some(k) = self.drawn.iter().position(|d| d.id == id) {
            return k;
        }
        let len = w.shape.iter().product();
        // The smallest spare buffer that fits, else the largest one grown.
        let fits = |b: &&Vec<f32>| b.len() >= len;
        let pick = (self.spare.iter().filter(fits).map(Vec::len).min())
            .and_then(|l| self.spare.iter().position(|b| b.len() == l))
            .or_else(|| (0..self.spare.len()).max_by_key(|&i| self.spare[i].len()));
        let mut buf = pick.map_or_else(Vec::new, |i| self.spare.swap_remove(i));
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        draw_into(tz, 0, &mut buf[..len]);
        self.drawn.push(Drawn { id, len, buf });
        self.account();
        self.drawn.len() - 1
    }

    /// Brings the `Tag::Scratch` account to the bytes now held.
    fn account(&mut self) {
        let floats = self.drawn.iter().map(|d| d.buf.len()).sum::<usize>()
            + self.spare.iter().map(Vec::len).sum::<usize>()
            + self.head_z.len();
        let bytes = floats * 4;
        if bytes > self.bytes {
            self.mem.add(Tag::Scratch, bytes - self.bytes);
        } else {
            self.mem.sub(Tag::Scratch, self.bytes - bytes);
        }
        self.bytes = bytes;
    }

    /// Room in `head_z` for one block of the head's rows.
    fn reserve_head_block(&mut self, head: &HostTensor) -> usize {
        let (vocab, d) = (head.shape[0], head.shape[1]);
        let block = self.streams[0].head_block_rows().min(vocab);
        if self.head_z.len() < block * d {
            self.head_z.resize(block * d, 0.0);
            self.account();
        }
        block
    }
}

/// The normals of elements start .. start + out.len() of `tz`, on every thread.
fn draw_into(tz: &TensorZ, start: usize, out: &mut [f32]) {
    out.par_chunks_mut(COPY_CHUNK)
        .enumerate()
        .for_each(|(c, z)| tz.draw(start + c * COPY_CHUNK, z));
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
        let k = self.draw(w, id, &tz);
        let z = &self.drawn[k].buf[..self.drawn[k].len];
        let s = self.scale(self.current);
        if b.packs_weight_tiles() {
            // Each tile of w + s z is built as the GEMM packs it: `param_from_drawn`'s bits.
            let cols = w.shape[1];
            let build = |n0: usize, rows: &mut [f32]| {
                let at = n0 * cols;
                perturbed_range_drawn(w, &tz, s, at, &z[at..at + rows.len()], rows)
            };
            return b.matmul_built(x, &w.name, &w.shape, &build, out);
        }
        let copy = self.streams[0].param_from_drawn(w, &tz, z, s);
        b.matmul(x, copy, out)
    }
}

/// The LM head as the two streams see it, a block at a time, from one draw of each block's
/// normals.
struct PairedHead<'h, 'a> {
    hook: &'h mut PairedFusedHook<'a>,
    head: &'h HostTensor,
    tz: &'h TensorZ,
    /// The first vocabulary row of the block whose normals `hook.head_z` holds.
    drawn_at: Option<usize>,
    /// Whether the GEMM builds each tile of the perturbed block as it packs it.
    tiles: bool,
}

impl PairedHead<'_, '_> {
    /// Draws the normals of rows v0 .. v0 + rows unless they are the ones held.
    fn draw(&mut self, v0: usize, rows: usize) {
        if self.drawn_at != Some(v0) {
            let d = self.head.shape[1];
            draw_into(self.tz, v0 * d, &mut self.hook.head_z[..rows * d]);
            self.drawn_at = Some(v0);
        }
    }
}

impl HeadBlocks for PairedHead<'_, '_> {
    fn block(
        &mut self,
        v0: usize,
        rows: usize,
        stream: usize,
        product: &mut dyn FnMut(WeightRows),
    ) {
        self.draw(v0, rows);
        let (head, tz, d) = (self.head, self.tz, self.head.shape[1]);
        let hook = &mut *self.hook;
        let (z, s) = (&hook.head_z[..rows * d], hook.scale(stream));
        if self.tiles {
            // `head_block_from_drawn`'s bits, a tile at a time inside the GEMM.
            let build = |r0: usize, out: &mut [f32]| {
                let at = r0 * d;
                perturbed_range_drawn(head, tz, s, v0 * d + at, &z[at..at + out.len()], out)
            };
            return product(WeightRows::Built(&build));
        }
        let block = hook.streams[0].head_block_from_drawn(head, tz, (v0, rows), z, s);
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
        let drawn = std::mem::take(&mut self.drawn);
        self.spare.extend(drawn.into_iter().map(|d| d.buf));
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
            drawn_at: None,
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
            drawn_at: None,
            tiles: b.packs_weight_tiles(),
        };
        head::logits_rows_streams(b, hidden, rows, head.shape[0], block, &mut blocks)
    }
}
