//! The LLaMA forward, written once against the `Backend` seam, top to bottom:
//! embed -> N x [RMSNorm, attention (RoPE, GQA, causal), residual, RMSNorm, SwiGLU, residual]
//! -> final RMSNorm -> LM head (tied or not). Training and evaluation keep one layer's working
//! set and no KV cache; generation keeps a KV cache.

use super::{LlamaConfig, LlamaWeights};
use crate::backend::mem::Tag;
use crate::backend::{AttnShape, Backend, LinearHook, PairedHook, ParamId, SeqLayout};
use anyhow::{ensure, Result};
use std::collections::HashMap;

pub const EMBED_ID: ParamId = 0;

/// What the scoring of requests asks of the LM head.
enum HeadQuery<'q> {
    /// log p(targets[r] | row r) for the rows with a target.
    Targets(&'q [i32]),
    /// The full logits of these rows.
    Logits(&'q [usize]),
}

/// Tensor ids of one layer's parameters (positions in the canonical list).
pub fn layer_param_ids(layer: usize) -> [ParamId; 9] {
    let base = 1 + 9 * layer;
    std::array::from_fn(|i| base + i)
}

pub struct Llama<B: Backend> {
    pub cfg: LlamaConfig,
    pub weights: LlamaWeights<B::Weight>,
    pub backend: B,
    inv_freq: Vec<f32>,
}

impl<B: Backend> Drop for Llama<B> {
    fn drop(&mut self) {
        self.backend.release_weights(&self.weights);
    }
}

/// One layer's activations, allocated once per forward and reused by every layer (and by both
/// streams of a paired forward). The normed input of each block lives beside it, one per stream.
struct Workspace<A> {
    q: A,
    k: A,
    v: A,
    attn: A,
    proj: A,
    gate: A,
    up: A,
}

/// Keys and values of every layer for one sequence being generated.
pub struct KvCache<B: Backend> {
    k: Vec<B::Act>,
    v: Vec<B::Act>,
    pub len: usize,
    pub capacity: usize,
}

impl<B: Backend> Llama<B> {
    pub fn new(cfg: LlamaConfig, weights: LlamaWeights<B::Weight>, backend: B) -> Self {
        let inv_freq = cfg.rope_inv_freq().into_iter().map(|f| f as f32).collect();
        backend.adopt_weights(&weights);
        Llama {
            cfg,
            weights,
            backend,
            inv_freq,
        }
    }

    pub fn final_norm_id(&self) -> ParamId {
        1 + 9 * self.cfg.num_hidden_layers
    }

    /// The LM head's id: its own tensor, or the embedding's when tied.
    pub fn lm_head_id(&self) -> ParamId {
        if self.weights.lm_head.is_some() {
            self.final_norm_id() + 1
        } else {
            EMBED_ID
        }
    }

    fn attn_shape(&self) -> AttnShape {
        AttnShape {
            n_heads: self.cfg.num_attention_heads,
            n_kv_heads: self.cfg.n_kv_heads(),
            head_dim: self.cfg.head_dim(),
        }
    }

    fn workspace(&self, rows: usize) -> Result<Workspace<B::Act>> {
        let b = &self.backend;
        let (d, f) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let a = |cols| b.alloc(rows, cols, Tag::Activations);
        Ok(Workspace {
            q: a(self.cfg.q_dim())?,
            k: a(self.cfg.kv_dim())?,
            v: a(self.cfg.kv_dim())?,
            attn: a(self.cfg.q_dim())?,
            proj: a(d)?,
            gate: a(f)?,
            up: a(f)?,
        })
    }

    fn check_tokens(&self, ids: &[u32], layout: &SeqLayout) -> Result<()> {
        ensure!(
            ids.len() == layout.rows(),
            "{} token ids for a {}x{} batch",
            ids.len(),
            layout.batch,
            layout.q_len
        );
        if let Some(starts) = &layout.starts {
            ensure!(
                layout.q_offset == 0 && starts.len() == layout.batch,
                "a packed layout holds whole sequences"
            );
        }
        let needed = layout.q_offset + layout.q_len;
        ensure!(
            needed <= self.cfg.max_position_embeddings,
            "sequence of {needed} tokens is longer than the model's context of {} (max_position_embeddings)",
            self.cfg.max_position_embeddings
        );
        Ok(())
    }

    /// Final-normed hidden states [batch * seq, hidden] of right-padded sequences.
    pub fn hidden(
        &self,
        ids: &[u32],
        layout: &SeqLayout,
        hook: &mut dyn LinearHook<B>,
    ) -> Result<B::Act> {
        self.run(ids, layout, hook, None)
    }

    /// The shared body of full-sequence and cached forwards.
    fn run(
        &self,
        ids: &[u32],
        layout: &SeqLayout,
        hook: &mut dyn LinearHook<B>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Result<B::Act> {
        self.check_tokens(ids, layout)?;
        let b = &self.backend;
        let (rows, d) = (layout.rows(), self.cfg.hidden_size);
        let mut x = b.alloc(rows, d, Tag::Activations)?;
        let mut normed = b.alloc(rows, d, Tag::Activations)?;
        self.embed_and_norm(hook, ids, &mut x, &mut normed)?;
        let mut ws = self.workspace(rows)?;
        for l in 0..self.cfg.num_hidden_layers {
            let kv = cache.as_deref_mut().map(|c| (&mut c.k[l], &mut c.v[l]));
            self.attention_block(hook, l, layout, kv, &mut x, &mut normed, &mut ws)?;
            self.mlp_block(hook, l, &mut x, &mut normed, &mut ws)?;
        }
        Ok(normed)
    }

    /// `hidden` of one batch seen through both streams of `hook`, in lockstep: each block
    /// runs stream 0 then stream 1 before the next block starts, so the hook prepares what the
    /// two views of a block's weights share once. Holds a second residual stream and normed
    /// input beside the one workspace.
    pub fn hidden_paired(
        &self,
        ids: &[u32],
        layout: &SeqLayout,
        hook: &mut dyn PairedHook<B>,
    ) -> Result<[B::Act; 2]> {
        self.check_tokens(ids, layout)?;
        let b = &self.backend;
        let (rows, d) = (layout.rows(), self.cfg.hidden_size);
        let alloc = || b.alloc(rows, d, Tag::Activations);
        let (mut x, mut normed) = ([alloc()?, alloc()?], [alloc()?, alloc()?]);
        hook.next_group();
        for s in 0..2 {
            self.embed_and_norm(hook.stream(s), ids, &mut x[s], &mut normed[s])?;
        }
        let mut ws = self.workspace(rows)?;
        for l in 0..self.cfg.num_hidden_layers {
            hook.next_group();
            for s in 0..2 {
                let (x, normed) = (&mut x[s], &mut normed[s]);
                self.attention_block(hook.stream(s), l, layout, None, x, normed, &mut ws)?;
            }
            hook.next_group();
            for s in 0..2 {
                self.mlp_block(hook.stream(s), l, &mut x[s], &mut normed[s], &mut ws)?;
            }
        }
        Ok(normed)
    }

    /// x = the embedding of `ids`; normed = the first layer's attention norm of x (the first
    /// norm has no residual to add; later ones fuse the add of the previous block's output).
    fn embed_and_norm(
        &self,
        hook: &mut dyn LinearHook<B>,
        ids: &[u32],
        x: &mut B::Act,
        normed: &mut B::Act,
    ) -> Result<()> {
        let b = &self.backend;
        hook.embed(b, &self.weights.embed, ids, EMBED_ID, x)?;
        let norm0 = hook.param(b, &self.weights.layers[0].attn_norm, layer_param_ids(0)[0])?;
        b.rmsnorm(x, norm0, self.cfg.rms_norm_eps as f32, normed)
    }

    /// Layer l's attention on `normed` (appending to the layer's KV cache if given), then
    /// x += its output and normed = the layer's MLP norm of x.
    #[allow(clippy::too_many_arguments)]
    fn attention_block(
        &self,
        hook: &mut dyn LinearHook<B>,
        l: usize,
        layout: &SeqLayout,
        kv: Option<(&mut B::Act, &mut B::Act)>,
        x: &mut B::Act,
        normed: &mut B::Act,
        ws: &mut Workspace<B::Act>,
    ) -> Result<()> {
        let (b, lw, id) = (&self.backend, &self.weights.layers[l], layer_param_ids(l));
        let shape = self.attn_shape();
        hook.linear(b, normed, &lw.wq, id[1], &mut ws.q)?;
        hook.linear(b, normed, &lw.wk, id[2], &mut ws.k)?;
        hook.linear(b, normed, &lw.wv, id[3], &mut ws.v)?;
        b.rope(&mut ws.q, shape.n_heads, layout, &self.inv_freq)?;
        b.rope(&mut ws.k, shape.n_kv_heads, layout, &self.inv_freq)?;
        match kv {
            None => b.attention(&ws.q, &ws.k, &ws.v, shape, layout, &mut ws.attn)?,
            Some((k, v)) => {
                b.copy_rows(&ws.k, k, layout.q_offset)?;
                b.copy_rows(&ws.v, v, layout.q_offset)?;
                b.attention(&ws.q, k, v, shape, layout, &mut ws.attn)?;
            }
        }
        hook.linear(b, &ws.attn, &lw.wo, id[4], &mut ws.proj)?;
        let eps = self.cfg.rms_norm_eps as f32;
        b.add_rmsnorm(
            x,
            &ws.proj,
            hook.param(b, &lw.mlp_norm, id[5])?,
            eps,
            normed,
        )
    }

    /// Layer l's SwiGLU MLP on `normed`, then x += its output and normed = the next layer's
    /// attention norm (or the final norm) of x.
    fn mlp_block(
        &self,
        hook: &mut dyn LinearHook<B>,
        l: usize,
        x: &mut B::Act,
        normed: &mut B::Act,
        ws: &mut Workspace<B::Act>,
    ) -> Result<()> {
        let (b, lw, id) = (&self.backend, &self.weights.layers[l], layer_param_ids(l));
        hook.linear(b, normed, &lw.w_gate, id[6], &mut ws.gate)?;
        hook.linear(b, normed, &lw.w_up, id[7], &mut ws.up)?;
        b.swiglu(&mut ws.gate, &ws.up)?;
        hook.linear(b, &ws.gate, &lw.w_down, id[8], &mut ws.proj)?;
        let (next_norm, next_id) = match self.weights.layers.get(l + 1) {
            Some(next) => (&next.attn_norm, layer_param_ids(l + 1)[0]),
            None => (&self.weights.final_norm, self.final_norm_id()),
        };
        let eps = self.cfg.rms_norm_eps as f32;
        b.add_rmsnorm(x, &ws.proj, hook.param(b, next_norm, next_id)?, eps, normed)
    }

    /// log p(targets[r] | row r) for every row with a target (>= 0), 0 elsewhere.
    pub fn target_logprobs(
        &self,
        ids: &[u32],
        layout: &SeqLayout,
        targets: &[i32],
        hook: &mut dyn LinearHook<B>,
    ) -> Result<Vec<f32>> {
        let h = self.hidden(ids, layout, hook)?;
        let (head, id) = (self.weights.lm_head(), self.lm_head_id());
        hook.head_target_logprobs(&self.backend, &h, head, id, targets)
    }

    /// `target_logprobs` of both streams of a paired forward (see `hidden_paired`).
    pub fn target_logprobs_paired(
        &self,
        ids: &[u32],
        layout: &SeqLayout,
        targets: &[i32],
        hook: &mut dyn PairedHook<B>,
    ) -> Result<[Vec<f32>; 2]> {
        let [h0, h1] = self.hidden_paired(ids, layout, hook)?;
        let (head, id) = (self.weights.lm_head(), self.lm_head_id());
        hook.head_target_logprobs(&self.backend, [&h0, &h1], head, id, targets)
    }

    /// log p(token | row) for each (row, token) request, in order. Rows may repeat (several
    /// candidates scored at one position). One request per row runs the chunked fused path;
    /// otherwise the logits of the distinct rows come to the host in chunks.
    pub fn request_logprobs(
        &self,
        ids: &[u32],
        layout: &SeqLayout,
        requests: &[(u32, u32)],
        hook: &mut dyn LinearHook<B>,
    ) -> Result<Vec<f32>> {
        let h = self.hidden(ids, layout, hook)?;
        let (b, head, id) = (&self.backend, self.weights.lm_head(), self.lm_head_id());
        let [lp] = self.score_requests(layout.rows(), requests, |q| {
            Ok([match q {
                HeadQuery::Targets(t) => hook.head_target_logprobs(b, &h, head, id, t)?,
                HeadQuery::Logits(rows) => hook.head_logits_rows(b, &h, head, id, rows)?,
            }])
        })?;
        Ok(lp)
    }

    /// `request_logprobs` of both streams of a paired forward (see `hidden_paired`).
    pub fn request_logprobs_paired(
        &self,
        ids: &[u32],
        layout: &SeqLayout,
        requests: &[(u32, u32)],
        hook: &mut dyn PairedHook<B>,
    ) -> Result<[Vec<f32>; 2]> {
        let [h0, h1] = self.hidden_paired(ids, layout, hook)?;
        let (b, head, id) = (&self.backend, self.weights.lm_head(), self.lm_head_id());
        self.score_requests(layout.rows(), requests, |q| match q {
            HeadQuery::Targets(t) => hook.head_target_logprobs(b, [&h0, &h1], head, id, t),
            HeadQuery::Logits(rows) => hook.head_logits_rows(b, [&h0, &h1], head, id, rows),
        })
    }

    /// The requests' log-probabilities in each of N streams, from the head as `head` answers
    /// for the streams' final hidden states: through the target path when each row has one
    /// request, else from the full logits of the distinct rows, a chunk of rows at a time.
    fn score_requests<const N: usize>(
        &self,
        rows: usize,
        requests: &[(u32, u32)],
        mut head: impl FnMut(HeadQuery) -> Result<[Vec<f32>; N]>,
    ) -> Result<[Vec<f32>; N]> {
        let mut targets = vec![-1i32; rows];
        let mut one_per_row = true;
        for &(r, t) in requests {
            ensure!(
                (r as usize) < rows,
                "request row {r} outside a batch of {rows} rows"
            );
            one_per_row &= targets[r as usize] < 0;
            targets[r as usize] = t as i32;
        }
        if one_per_row {
            let lp = head(HeadQuery::Targets(&targets))?;
            return Ok(lp.map(|lp| requests.iter().map(|&(r, _)| lp[r as usize]).collect()));
        }
        let mut distinct: Vec<usize> = requests.iter().map(|&(r, _)| r as usize).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let vocab = self.cfg.vocab_size;
        let mut row_lse: [HashMap<usize, f32>; N] = std::array::from_fn(|_| HashMap::new());
        let mut row_logits: [HashMap<(usize, u32), f32>; N] =
            std::array::from_fn(|_| HashMap::new());
        for chunk in distinct.chunks(crate::backend::cpu::LOGIT_CHUNK_ROWS) {
            let logits = head(HeadQuery::Logits(chunk))?;
            for (s, logits) in logits.iter().enumerate() {
                for (i, &r) in chunk.iter().enumerate() {
                    let row = &logits[i * vocab..(i + 1) * vocab];
                    row_lse[s].insert(r, crate::backend::cpu::logsumexp(row));
                    // Keep only the requested tokens of this row.
                    for &(rr, t) in requests.iter().filter(|q| q.0 as usize == r) {
                        ensure!(
                            (t as usize) < vocab,
                            "token id {t} is outside the vocabulary of {vocab} tokens"
                        );
                        row_logits[s].insert((rr as usize, t), row[t as usize]);
                    }
                }
            }
        }
        Ok(std::array::from_fn(|s| {
            requests
                .iter()
                .map(|&(r, t)| row_logits[s][&(r as usize, t)] - row_lse[s][&(r as usize)])
                .collect()
        }))
    }

    /// Full logits at the listed rows (host, [rows.len() x vocab]).
    pub fn logits_at(
        &self,
        ids: &[u32],
        layout: &SeqLayout,
        rows: &[usize],
        hook: &mut dyn LinearHook<B>,
    ) -> Result<Vec<f32>> {
        let h = self.hidden(ids, layout, hook)?;
        let (head, id) = (self.weights.lm_head(), self.lm_head_id());
        hook.head_logits_rows(&self.backend, &h, head, id, rows)
    }

    pub fn new_cache(&self, capacity: usize) -> Result<KvCache<B>> {
        ensure!(
            capacity <= self.cfg.max_position_embeddings,
            "a cache of {capacity} tokens is longer than the model's context of {}",
            self.cfg.max_position_embeddings
        );
        let kv = self.cfg.kv_dim();
        let n = self.cfg.num_hidden_layers;
        let mk = || self.backend.alloc(capacity, kv, Tag::Activations);
        Ok(KvCache {
            k: (0..n).map(|_| mk()).collect::<Result<_>>()?,
            v: (0..n).map(|_| mk()).collect::<Result<_>>()?,
            len: 0,
            capacity,
        })
    }

    /// Runs `ids` after the cached tokens of one sequence and returns the logits of the last one.
    pub fn forward_cached(&self, ids: &[u32], cache: &mut KvCache<B>) -> Result<Vec<f32>> {
        let past = cache.len;
        ensure!(
            past + ids.len() <= cache.capacity,
            "sequence of {} tokens does not fit the cache of {}",
            past + ids.len(),
            cache.capacity
        );
        let layout = SeqLayout {
            batch: 1,
            q_len: ids.len(),
            kv_len: cache.capacity,
            kv_valid: vec![past + ids.len()],
            q_offset: past,
            starts: None,
        };
        let h = self.run(ids, &layout, &mut crate::backend::NoHook, Some(cache))?;
        cache.len = past + ids.len();
        self.backend
            .logits_rows(&h, self.weights.lm_head(), &[ids.len() - 1])
    }
}
