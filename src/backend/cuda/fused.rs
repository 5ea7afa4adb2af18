//! `--perturb fused` on the GPU, the twin of the CPU hook in src/zo/hook.rs. The weights stay as
//! the update left them and every parameter use sees w + scale z (plus any virtual low-rank
//! update), built on the fly, so restore is exact by construction:
//! - a layer's parameters: a perturbed copy of each tensor, written by one kernel with the bits
//!   an in-place pass leaves (dense or sparse z, and TeZO's low-rank z of a matrix), into one
//!   scratch buffer that every tensor of the forward reuses; under `--perturb fused` the copies
//!   of a layer are written together, two launches a layer (element-wise and low-rank z), into
//!   a layer's worth of scratch (`LayerCopies`);
//! - the embedding perturbs only the rows it gathers (rounded to the table's dtype, as an
//!   in-place pass would leave them), and the LM head a copy of each block of its rows; with
//!   low-rank z both run on the stored weights and a side product adds
//!   ((x V) diag(c) / sqrt(r)) U^T beside them, never forming U diag(c) V^T
//!   (`with_low_rank_side_products` does the same for the layers' matrices).
//!
//! Why copies for the layers' low-rank matrices (the CPU's bf16 GEMMs build the perturbed tiles
//! as they pack them, its f32 GEMMs add side products): on the GPU a side product is two more
//! GEMMs per matrix, each a launch (the default model's forward is launch-bound: they about
//! double a TeZO forward's launches), each reading the f32 activations and rewriting the f32
//! output (on a LLaMA-7B shape about a quarter of a forward's time, estimated from the bytes);
//! the copies are one launch a layer that reads and writes the weights once, r multiply-adds
//! an element. Not yet timed on a GPU: `bench-gpu` times both.
//!
//! The LM head runs a block of vocabulary rows at a time with each row's log-sum-exp carried
//! across the blocks, so the scratch stays near one layer's largest matrix.
//!
//! The CPU hook keeps perturbed values in f32 whatever the storage; here the copies are in the
//! weights' dtype, which the bf16 GEMM needs. For bf16 weights the two fused forwards therefore
//! agree to bf16 rounding, and the GPU's fused and in-place forwards see the same bits for
//! element-wise z (TeZO's in-place forward rounds its virtual update and its perturbation
//! separately, its fused copies once).

use super::kernels::{self, ElemZ, PhiloxKey};
use super::{
    check_head, check_logit_rows, elt, gemm, CudaAct, CudaBackend, CudaWeight, DevBuf, GemmArgs,
};
use crate::backend::cpu::head::RunningLogSumExp;
use crate::backend::mem::Tag;
use crate::backend::{Backend, LinearHook, ParamId};
use crate::model::llama::layer_param_ids;
use crate::model::weights::LlamaWeights;
use crate::model::DType;
use crate::zo::direction::{StepKey, FACTOR_U, FACTOR_V};
use crate::zo::hook::FusedView;
use crate::zo::passes::ZSpec;
use crate::zo::ZoOptimizer;
use anyhow::Result;

/// Vocabulary rows of the LM head perturbed and multiplied at once.
pub const CUDA_HEAD_BLOCK_ROWS: usize = 8192;

pub struct CudaFusedHook<'a> {
    view: FusedView<'a, CudaBackend>,
    /// The perturbed copy of parameter `scratch_of` (or of an LM-head block). Its buffer serves
    /// every tensor of the forward and grows when one needs more.
    scratch: Option<CudaWeight>,
    scratch_of: Option<ParamId>,
    head_block_rows: usize,
    /// Given the model's parameters, the copies of each layer's parameters are written
    /// together (see `LayerCopies`); without them, one tensor at a time.
    layers: Option<LayerCopies<'a>>,
    /// Whether a matrix with low-rank z is multiplied as a perturbed copy, like one with
    /// element-wise z (the default), rather than as the stored weights plus a side product.
    low_rank_copies: bool,
    /// With side products and the model's parameters, the factors of each layer's side
    /// products are drawn together (see `LayerFactors`); without them, one matrix at a time.
    factors: Option<LayerFactors<'a>>,
}

/// The perturbed copies of one layer's parameters, written when the forward first asks for a
/// parameter of that layer by one launch of `zo_perturbed_copy_jobs` for those with
/// element-wise z (nine launches a layer become one) and one of `zo_low_rank_move_jobs` for
/// the matrices with TeZO's low-rank z (unless the hook leaves them to side products), into
/// buffers that serve every layer in turn: one layer's worth of scratch, where the copies one
/// tensor at a time need only the largest tensor's.
struct LayerCopies<'a> {
    /// Every parameter, by id.
    params: Vec<&'a CudaWeight>,
    layers: usize,
    /// Per position in a layer (`layer_param_ids` order), its copy, if it moves.
    copies: Vec<Option<CudaWeight>>,
    /// The jobs of every layer, made on first use.
    table: Option<LayerTable>,
    /// The layer whose copies the buffers hold.
    current: Option<usize>,
}

/// The factors of each layer's low-rank side products, drawn for all of a layer's matrices by
/// one launch of `zo_factor_jobs` when the forward first multiplies by one of them (three
/// launches and an upload a matrix become one launch a layer), into a buffer that serves every
/// layer in turn: one layer's factors, where one matrix at a time needs only the largest
/// matrix's.
struct LayerFactors<'a> {
    /// Every parameter, by id.
    params: Vec<&'a CudaWeight>,
    layers: usize,
    /// Made on first use.
    table: Option<FactorTable>,
    /// The layer whose factors the buffer holds.
    current: Option<usize>,
}

/// Every layer's factor jobs on the device, and the buffer they fill.
struct FactorTable {
    /// One layer's factors, f32.
    buf: DevBuf,
    /// Per position in a layer (`layer_param_ids` order), the byte offsets in `buf` of its
    /// U diag(c) / sqrt(r) and its V, where some layer's matrix there has a side product.
    slots: Vec<Option<(usize, usize)>>,
    /// Per layer and position (`l * positions + k`), whether that matrix has a side product
    /// in this forward: low-rank z with coefficients not all zero.
    sides: Vec<bool>,
    /// Every layer's coefficients, which the jobs read.
    _coefficients: DevBuf,
    jobs: DevBuf,
    batches: Vec<LayerBatch>,
}

/// The copy jobs of every layer on the device, and where each layer's batch lies in them.
struct LayerTable {
    jobs: DevBuf,
    batches: Vec<LayerBatch>,
    /// The low-rank copies (thread blocks, not Philox blocks, in `LayerBatch::blocks`).
    low_rank_jobs: DevBuf,
    low_rank_batches: Vec<LayerBatch>,
    max_rank: usize,
    /// Every layer's low-rank coefficients, which the low-rank jobs read.
    _coefficients: DevBuf,
    /// Per layer and position (`l * positions + k`), whether its copy is written in this
    /// forward; where it is not, the parameter does not move and is used as stored.
    copied: Vec<bool>,
}

/// How a layer parameter that moves in a forward gets its copy.
enum LayerCopy {
    /// Dense or sparse z (`zo_perturbed_copy_jobs`).
    Elementwise,
    /// Low-rank z with these coefficients (`zo_low_rank_move_jobs`).
    LowRank(Vec<f32>),
}

/// One layer's jobs: `count` of them from job `first`, `blocks` Philox blocks in all.
#[derive(Clone, Copy)]
struct LayerBatch {
    first: usize,
    count: usize,
    blocks: u64,
}

/// The factors of one matrix's low-rank z for a side product, f32 on the device:
/// U diag(c) / sqrt(r) [m x r] at `us` and V [n x r] at `v`, in buffers of their own or in a
/// layer's (`LayerFactors`).
struct LowRankSide {
    us: u64,
    v: u64,
    rank: usize,
    /// The buffers `us` and `v` point into, where they are this side's own.
    _own: Option<(DevBuf, DevBuf)>,
}

impl LowRankSide {
    fn new(
        g: &CudaBackend,
        key: StepKey,
        id: ParamId,
        shape: &[usize],
        coef: &[f32],
    ) -> Result<Self> {
        let (m, n, rank) = (shape[0], shape[1], coef.len());
        let factor = |step| PhiloxKey {
            seed: key.seed,
            step,
            tensor: id as u32,
        };
        let mut us = g.alloc_buf(m * rank * 4, Tag::Scratch, "a low-rank factor U")?;
        let mut v = g.alloc_buf(n * rank * 4, Tag::Scratch, "a low-rank factor V")?;
        g.fill_normal(&mut us, DType::F32, m * rank, factor(FACTOR_U), 0, 1.0, 0.0)?;
        g.fill_normal(&mut v, DType::F32, n * rank, factor(FACTOR_V), 0, 1.0, 0.0)?;
        // Freed stream-ordered after the launch that reads it.
        let c = g.buf_from_host(coef, Tag::Scratch, "low-rank coefficients")?;
        kernels::scale_cols(&g.dev, us.ptr(), m * rank, rank, c.ptr(), side_norm(rank))?;
        Ok(LowRankSide {
            us: us.ptr(),
            v: v.ptr(),
            rank,
            _own: Some((us, v)),
        })
    }

    /// out[rows x nv] += (x V) us[u0 .. u0 + nv]^T for f32 rows x [rows x n]; `xv` holds at
    /// least rows x r f32 values.
    #[allow(clippy::too_many_arguments)]
    fn add_product(
        &self,
        g: &CudaBackend,
        x: u64,
        rows: usize,
        n: usize,
        xv: &DevBuf,
        u0: usize,
        nv: usize,
        out: u64,
    ) -> Result<()> {
        let r = self.rank;
        gemm::gemm_xw(&g.dev, &f32_gemm(rows, r, n, x, self.v, xv.ptr(), 0.0))?;
        gemm::gemm_xwt(
            &g.dev,
            &f32_gemm(
                rows,
                nv,
                r,
                xv.ptr(),
                self.us + (u0 * r * 4) as u64,
                out,
                1.0,
            ),
        )
    }
}

/// A table the hook's launches read, as scratch on the device; one placeholder byte where it
/// is empty (no launch then reads it).
fn upload<T: bytemuck::Pod>(g: &CudaBackend, table: &[T], what: &str) -> Result<DevBuf> {
    if table.is_empty() {
        g.alloc_buf(1, Tag::Scratch, what)
    } else {
        g.buf_from_host(table, Tag::Scratch, what)
    }
}

/// The layer and position in it (`layer_param_ids` order) of parameter `id`, if it belongs to
/// one of the model's `layers` layers.
fn layer_position(id: ParamId, layers: usize) -> Option<(usize, usize)> {
    let (first, per_layer) = (layer_param_ids(0)[0], layer_param_ids(0).len());
    let (l, k) = (id.checked_sub(first)? / per_layer, (id - first) % per_layer);
    (l < layers).then_some((l, k))
}

/// The 1 / sqrt(r) of a rank-r side product (as `Factors::row` scales).
fn side_norm(rank: usize) -> f32 {
    1.0 / (rank as f32).sqrt()
}

/// An f32 GEMM out[m, n] = x w^T (or x w) + beta out.
fn f32_gemm(m: usize, n: usize, k: usize, x: u64, w: u64, out: u64, beta: f32) -> GemmArgs {
    GemmArgs {
        m,
        n,
        k,
        x,
        w,
        in_dtype: DType::F32,
        out,
        out_dtype: DType::F32,
        alpha: 1.0,
        beta,
    }
}

fn elem_z(z: ZSpec) -> ElemZ {
    match z {
        ZSpec::Sparse { threshold } => ElemZ::Sparse { threshold },
        // Element-wise z is never low-rank: vectors under a low-rank direction are dense.
        ZSpec::Dense | ZSpec::LowRank { .. } => ElemZ::Dense,
    }
}

/// Row indices on the device (i32), e.g. the hidden rows that reach the LM head.
struct DeviceRows {
    idx: DevBuf,
    n: usize,
}

impl DeviceRows {
    fn upload(g: &CudaBackend, rows: impl Iterator<Item = usize>, what: &str) -> Result<Self> {
        let idx: Vec<i32> = rows.map(|r| r as i32).collect();
        Ok(DeviceRows {
            idx: g.buf_from_host(&idx, Tag::Scratch, what)?,
            n: idx.len(),
        })
    }
}

impl<'a> CudaFusedHook<'a> {
    pub fn new(opt: &'a ZoOptimizer<CudaBackend>, key: StepKey, scale: f32) -> Self {
        CudaFusedHook {
            view: FusedView::new(opt, key, scale),
            scratch: None,
            scratch_of: None,
            head_block_rows: CUDA_HEAD_BLOCK_ROWS,
            layers: None,
            low_rank_copies: true,
            factors: None,
        }
    }

    /// Writes each layer's element-wise copies in one launch, for the model with these
    /// weights (what `--perturb fused` does; a paired forward's streams copy one tensor at a
    /// time).
    pub fn with_layers(mut self, weights: &'a LlamaWeights<CudaWeight>) -> Self {
        let layers = weights.layers.len();
        self.layers = Some(LayerCopies {
            params: weights.tensors(),
            layers,
            copies: vec![],
            table: None,
            current: None,
        });
        self.with_layer_factors(weights)
    }

    /// Multiplies each matrix with low-rank z as the stored weights plus a side product
    /// ((x V) diag(c) / sqrt(r)) U^T, in f32 beside the GEMM, instead of as a perturbed copy
    /// (under `with_layers`, their factors drawn a layer at a time): what the embedding and
    /// the LM head always do, and what the GPU benchmark compares the copies with.
    pub fn with_low_rank_side_products(mut self) -> Self {
        self.low_rank_copies = false;
        self
    }

    /// Draws the factors of each layer's low-rank side products in one launch, for the model
    /// with these weights (part of `with_layers`).
    fn with_layer_factors(mut self, weights: &'a LlamaWeights<CudaWeight>) -> Self {
        self.factors = Some(LayerFactors {
            params: weights.tensors(),
            layers: weights.layers.len(),
            table: None,
            current: None,
        });
        self
    }

    /// The layer and position in it of parameter `id`, if its copy is written with its
    /// layer's.
    fn layer_slot(&self, id: ParamId, w: &CudaWeight) -> Option<(usize, usize)> {
        let lc = self.layers.as_ref()?;
        let (l, k) = layer_position(id, lc.layers)?;
        (self.low_rank_copies || self.view.low_rank(&w.shape).is_none()).then_some((l, k))
    }

    /// The copies of layer `l`'s parameters that move element-wise in this forward, written
    /// unless they already hold that layer. False where the layers are not stored alike: the
    /// hook then turns to copying one tensor at a time.
    fn perturb_layer(&mut self, g: &CudaBackend, l: usize) -> Result<bool> {
        let lc = self.layers.as_ref().expect("batching is on");
        if lc.current == Some(l) {
            return Ok(true);
        }
        if lc.table.is_none() && !self.make_layer_table(g)? {
            self.layers = None;
            return Ok(false);
        }
        let key = PhiloxKey::of_tensor(self.view.key, 0);
        let lc = self.layers.as_mut().expect("batching is on");
        let table = lc.table.as_ref().expect("made above");
        let b = table.batches[l];
        let at = table
            .jobs
            .ptr_at(b.first * std::mem::size_of::<kernels::CopyJob>());
        kernels::zo_perturbed_copy_jobs(&g.dev, at, b.count, b.blocks, key, self.view.scale)?;
        let b = table.low_rank_batches[l];
        let at = (table.low_rank_jobs).ptr_at(b.first * std::mem::size_of::<kernels::LowRankJob>());
        let factors = (FACTOR_U, FACTOR_V);
        let batch = (at, b.count, b.blocks);
        kernels::zo_low_rank_move_jobs(&g.dev, batch, table.max_rank, key.seed, factors)?;
        lc.current = Some(l);
        Ok(true)
    }

    /// The copy of the parameter at position `k` of layer `l`, named and shaped as `w`, once
    /// `perturb_layer(l)` has written it; `w` itself where it does not move in this forward.
    fn layer_copy<'b>(&'b mut self, l: usize, k: usize, w: &'b CudaWeight) -> &'b CudaWeight {
        let lc = self.layers.as_mut().expect("batching is on");
        let positions = layer_param_ids(0).len();
        let table = lc.table.as_ref().expect("made with the layer");
        if !table.copied[l * positions + k] {
            return w;
        }
        let copy = lc.copies[k]
            .as_mut()
            .expect("a moving parameter has its copy");
        copy.shape.clone_from(&w.shape);
        copy.name.clone_from(&w.name);
        copy
    }

    /// Gives the layer copies and factors back (the LM head, past the last layer, needs
    /// scratch of its own); a later forward through this hook makes them again.
    fn release_layers(&mut self) {
        if let Some(lc) = self.layers.as_mut() {
            lc.copies.clear();
            lc.table = None;
            lc.current = None;
        }
        if let Some(lf) = self.factors.as_mut() {
            lf.table = None;
            lf.current = None;
        }
    }

    /// The layer and position in it of matrix `id`, if its factors are drawn with its
    /// layer's.
    fn factor_slot(&self, id: ParamId) -> Option<(usize, usize)> {
        layer_position(id, self.factors.as_ref()?.layers)
    }

    /// The side product of the matrix at position `k` of layer `l`, from its layer's
    /// factors, drawn unless the buffer already holds that layer; None where it has none.
    fn layer_side(&mut self, g: &CudaBackend, l: usize, k: usize) -> Result<Option<LowRankSide>> {
        if self
            .factors
            .as_ref()
            .expect("batching is on")
            .table
            .is_none()
        {
            self.make_factor_table(g)?;
        }
        let seed = self.view.key.seed;
        let lf = self.factors.as_mut().expect("batching is on");
        let table = lf.table.as_ref().expect("made above");
        if !table.sides[l * table.slots.len() + k] {
            return Ok(None);
        }
        if lf.current != Some(l) {
            let b = table.batches[l];
            let at = (table.jobs).ptr_at(b.first * std::mem::size_of::<kernels::FactorJob>());
            kernels::zo_factor_jobs(&g.dev, at, b.count, b.blocks, seed)?;
            lf.current = Some(l);
        }
        let (u, v) = table.slots[k].expect("a matrix with a side product has its slot");
        let rank = (self.view)
            .low_rank(&lf.params[layer_param_ids(l)[k]].shape)
            .expect("a side product is low-rank");
        Ok(Some(LowRankSide {
            us: table.buf.ptr_at(u),
            v: table.buf.ptr_at(v),
            rank,
            _own: None,
        }))
    }

    /// Uploads every layer's coefficients and factor jobs, and allocates one layer's factors:
    /// per position, room for the largest U and V of any layer's matrix there.
    fn make_factor_table(&mut self, g: &CudaBackend) -> Result<()> {
        let view = &self.view;
        let lf = self.factors.as_mut().expect("batching is on");
        let positions = layer_param_ids(0).len();
        // Per matrix with a side product: its rank and where its coefficients start.
        let mut sides = vec![None; lf.layers * positions];
        let mut coefficients: Vec<f32> = vec![];
        let mut lens = vec![(0usize, 0usize); positions];
        for l in 0..lf.layers {
            for (k, id) in layer_param_ids(l).into_iter().enumerate() {
                let shape = &lf.params[id].shape;
                let Some(rank) = view.low_rank(shape) else {
                    continue;
                };
                let c = view.coefficients(id, rank);
                if c.iter().all(|&v| v == 0.0) {
                    continue;
                }
                sides[l * positions + k] = Some((rank, coefficients.len()));
                coefficients.extend(c);
                let (u, v) = &mut lens[k];
                (*u, *v) = ((*u).max(shape[0] * rank), (*v).max(shape[1] * rank));
            }
        }
        // Each factor starts on 16 bytes, where the kernel's vector stores apply.
        let mut slots = vec![None; positions];
        let mut bytes = 0;
        for (slot, &(u, v)) in slots.iter_mut().zip(&lens) {
            if u > 0 {
                let u_bytes = (u * 4).next_multiple_of(16);
                *slot = Some((bytes, bytes + u_bytes));
                bytes += u_bytes + (v * 4).next_multiple_of(16);
            }
        }
        let buf = g.alloc_buf(bytes.max(1), Tag::Scratch, "a layer's low-rank factors")?;
        let coefficients_dev = upload(g, &coefficients, "the layers' low-rank coefficients")?;
        let mut jobs = kernels::FactorJobs::default();
        let mut batches = Vec::with_capacity(lf.layers);
        for l in 0..lf.layers {
            jobs.new_batch();
            let first = jobs.jobs.len();
            for (k, id) in layer_param_ids(l).into_iter().enumerate() {
                let Some((rank, at)) = sides[l * positions + k] else {
                    continue;
                };
                let (u, v) = slots[k].expect("sized above");
                let shape = &lf.params[id].shape;
                let factor = |step| PhiloxKey {
                    seed: view.key.seed,
                    step,
                    tensor: id as u32,
                };
                let scale = (coefficients_dev.ptr_at(at * 4), side_norm(rank));
                let (us, vs) = (buf.ptr_at(u), buf.ptr_at(v));
                jobs.push(us, shape[0] * rank, rank, factor(FACTOR_U), Some(scale))?;
                jobs.push(vs, shape[1] * rank, rank, factor(FACTOR_V), None)?;
            }
            batches.push(LayerBatch {
                first,
                count: jobs.jobs.len() - first,
                blocks: jobs.blocks,
            });
        }
        let jobs_dev = upload(g, &jobs.jobs, "the layers' factor jobs")?;
        lf.table = Some(FactorTable {
            buf,
            slots,
            sides: sides.iter().map(Option::is_some).collect(),
            _coefficients: coefficients_dev,
            jobs: jobs_dev,
            batches,
        });
        Ok(())
    }

    /// Allocates the copy buffers (each position's largest tensor over the layers) and uploads
    /// the jobs of every layer; false, with nothing made, where a position's tensors differ in
    /// dtype from layer to layer (one buffer cannot serve them all).
    fn make_layer_table(&mut self, g: &CudaBackend) -> Result<bool> {
        let view = &self.view;
        let lc = self.layers.as_mut().expect("batching is on");
        let positions = layer_param_ids(0).len();
        // What moves in this forward: element-wise z wherever the view moves, low-rank z
        // where its coefficients are not all zero (the coefficients, once per forward).
        let mut moves: Vec<Option<LayerCopy>> = Vec::with_capacity(lc.layers * positions);
        for l in 0..lc.layers {
            for id in layer_param_ids(l) {
                let t = lc.params[id];
                moves.push(match view.low_rank(&t.shape) {
                    None => view.moves(id).then_some(LayerCopy::Elementwise),
                    Some(_) if !self.low_rank_copies => None,
                    Some(rank) => {
                        let c = view.coefficients(id, rank);
                        c.iter().any(|&v| v != 0.0).then_some(LayerCopy::LowRank(c))
                    }
                });
            }
        }
        let mut copies: Vec<Option<CudaWeight>> = (0..positions).map(|_| None).collect();
        for l in 0..lc.layers {
            for (k, id) in layer_param_ids(l).into_iter().enumerate() {
                let t = lc.params[id];
                if moves[l * positions + k].is_none() {
                    continue;
                }
                if copies[k].as_ref().is_some_and(|c| c.dtype != t.dtype) {
                    return Ok(false);
                }
                let fits =
                    (copies[k].as_ref()).is_some_and(|c| c.buf.bytes() >= t.numel() * elt(t.dtype));
                if !fits {
                    let bytes = (t.numel() * elt(t.dtype)).max(1);
                    copies[k] = None; // the smaller buffer goes before the larger one comes
                    let buf = g.alloc_buf(bytes, Tag::Scratch, "a layer's perturbed copies")?;
                    copies[k] = Some(CudaWeight {
                        buf,
                        dtype: t.dtype,
                        shape: vec![],
                        name: t.name.clone(),
                    });
                }
            }
        }
        let mut jobs = kernels::CopyJobs::default();
        let mut low_rank = kernels::LowRankJobs::default();
        let (mut batches, mut low_rank_batches) = (vec![], vec![]);
        for l in 0..lc.layers {
            jobs.new_batch();
            low_rank.jobs.new_batch();
            let (first, first_low_rank) = (jobs.jobs.len(), low_rank.jobs.jobs.len());
            for (k, id) in layer_param_ids(l).into_iter().enumerate() {
                let t = lc.params[id];
                let (Some(copy), Some(how)) = (&copies[k], &moves[l * positions + k]) else {
                    continue;
                };
                let (src, dst) = (t.ptr(), copy.ptr());
                let tensor = PhiloxKey::of_tensor(view.key, id).tensor;
                match how {
                    LayerCopy::LowRank(coef) => {
                        let shape = (t.shape[0], t.shape[1]);
                        low_rank.push((dst, src), t.dtype, shape, tensor, coef, 0.0, 1.0)?;
                    }
                    LayerCopy::Elementwise => {
                        let z = elem_z(view.elem_z(id));
                        jobs.push((src, dst), t.dtype, t.numel(), tensor, z)?;
                    }
                }
            }
            batches.push(LayerBatch {
                first,
                count: jobs.jobs.len() - first,
                blocks: jobs.blocks,
            });
            low_rank_batches.push(LayerBatch {
                first: first_low_rank,
                count: low_rank.jobs.jobs.len() - first_low_rank,
                blocks: low_rank.jobs.blocks,
            });
        }
        let coefficients = upload(
            g,
            &low_rank.coefficients,
            "the layers' low-rank coefficients",
        )?;
        low_rank.resolve(coefficients.ptr());
        lc.copies = copies;
        lc.table = Some(LayerTable {
            jobs: upload(g, &jobs.jobs, "the layers' perturbation jobs")?,
            batches,
            low_rank_jobs: upload(
                g,
                &low_rank.jobs.jobs,
                "the layers' low-rank perturbation jobs",
            )?,
            low_rank_batches,
            max_rank: low_rank.max_rank(),
            _coefficients: coefficients,
            copied: moves.iter().map(Option::is_some).collect(),
        });
        Ok(true)
    }

    /// Perturbs and multiplies the LM head `rows` vocabulary rows at a time (default
    /// CUDA_HEAD_BLOCK_ROWS): fewer rows bound the scratch tighter.
    pub fn with_head_block_rows(mut self, rows: usize) -> Self {
        self.head_block_rows = rows.max(1);
        self
    }

    fn elem_key(&self, id: ParamId) -> PhiloxKey {
        PhiloxKey::of_tensor(self.view.key, id)
    }

    /// What this forward sees of the parameters (the paired hook asks the same questions).
    pub(super) fn view(&self) -> &FusedView<'a, CudaBackend> {
        &self.view
    }

    /// The key and kind of parameter `id`'s element-wise z in this forward.
    pub(super) fn elem_key_and_z(&self, id: ParamId) -> (PhiloxKey, ElemZ) {
        (self.elem_key(id), elem_z(self.view.elem_z(id)))
    }

    /// The low-rank side product of matrix `id` in this forward, if its z is low-rank and not
    /// zero: from its layer's factors where they are batched, else from factors of its own.
    fn side(
        &mut self,
        g: &CudaBackend,
        w: &CudaWeight,
        id: ParamId,
    ) -> Result<Option<LowRankSide>> {
        let Some(rank) = self.view.low_rank(&w.shape) else {
            return Ok(None);
        };
        if let Some((l, k)) = self.factor_slot(id) {
            return self.layer_side(g, l, k);
        }
        let c = self.view.coefficients(id, rank);
        if c.iter().all(|&v| v == 0.0) {
            return Ok(None);
        }
        LowRankSide::new(g, self.view.key, id, &w.shape, &c).map(Some)
    }

    /// The scratch buffer as a tensor of `shape` and `dtype`, grown if it is too small.
    pub(super) fn scratch_for(
        &mut self,
        g: &CudaBackend,
        name: &str,
        shape: &[usize],
        dtype: DType,
    ) -> Result<&mut CudaWeight> {
        self.scratch_of = None;
        let bytes = shape.iter().product::<usize>() * elt(dtype);
        if self.scratch.as_ref().is_none_or(|s| s.buf.bytes() < bytes) {
            self.scratch = None; // the smaller buffer goes before the larger one comes
            let buf = g.alloc_buf(bytes.max(1), Tag::Scratch, "the fused perturbation's copy")?;
            self.scratch = Some(CudaWeight {
                buf,
                dtype,
                shape: vec![],
                name: String::new(),
            });
        }
        let s = self.scratch.as_mut().expect("allocated above");
        s.dtype = dtype;
        s.shape = shape.to_vec();
        s.name = format!("{name} (perturbed)");
        Ok(s)
    }

    /// Runs the LM head over the listed hidden rows a block of vocabulary rows at a time, each
    /// block perturbed once, and hands every chunk of logits to
    /// `each(first row, rows, v0, nv, logits [rows x nv])`.
    fn head_blocks(
        &mut self,
        g: &CudaBackend,
        hidden: &CudaAct,
        head: &CudaWeight,
        id: ParamId,
        rows: &DeviceRows,
        mut each: impl FnMut(usize, usize, usize, usize, &DevBuf) -> Result<()>,
    ) -> Result<()> {
        self.release_layers();
        let (vocab, d) = (head.shape[0], head.shape[1]);
        let es = elt(head.dtype);
        let n_rows = rows.n;
        let block = self.head_block_rows.min(vocab);
        let chunk = CudaBackend::chunk_rows(block, n_rows);
        let low_rank = self.view.low_rank(&head.shape).is_some();
        let side = self.side(g, head, id)?;
        let x = g.alloc_buf(chunk * d * es, Tag::Scratch, "the LM head input")?;
        let logits = g.alloc_buf(chunk * block * 4, Tag::Scratch, "a block of logits")?;
        // The side product multiplies f32 rows (an f32 head's input already is) by V into xv.
        let alloc = |bytes, what| g.alloc_buf(bytes, Tag::Scratch, what);
        let xv = match &side {
            Some(s) => Some(alloc(chunk * s.rank * 4, "x V of the LM head")?),
            None => None,
        };
        let xf = match &side {
            Some(_) if head.dtype != DType::F32 => {
                Some(alloc(chunk * d * 4, "the LM head input (f32)")?)
            }
            _ => None,
        };
        let (key, z, scale) = (
            self.elem_key(id),
            elem_z(self.view.elem_z(id)),
            self.view.scale,
        );
        for v0 in (0..vocab).step_by(block) {
            let nv = block.min(vocab - v0);
            let stored = head.buf.ptr_at(v0 * d * es);
            // Low-rank z rides on the side product; element-wise z perturbs a copy of the block.
            let w = if low_rank {
                stored
            } else {
                let s = self.scratch_for(g, &head.name, &[nv, d], head.dtype)?;
                let start = (v0 * d) as u64;
                kernels::zo_perturbed_copy(
                    &g.dev,
                    stored,
                    head.dtype,
                    nv * d,
                    start,
                    key,
                    z,
                    (s.ptr(), scale),
                    None,
                )?;
                s.ptr()
            };
            for c0 in (0..n_rows).step_by(chunk) {
                let m = chunk.min(n_rows - c0);
                let at = rows.idx.ptr_at(c0 * 4);
                kernels::gather_rows(&g.dev, hidden.ptr(), at, x.ptr(), head.dtype, m, d)?;
                let args = GemmArgs {
                    m,
                    n: nv,
                    k: d,
                    x: x.ptr(),
                    w,
                    in_dtype: head.dtype,
                    out: logits.ptr(),
                    out_dtype: DType::F32,
                    alpha: 1.0,
                    beta: 0.0,
                };
                gemm::gemm_xwt(&g.dev, &args)?;
                if let (Some(s), Some(xv)) = (&side, &xv) {
                    let xf = match &xf {
                        Some(xf) => {
                            kernels::gather_rows(
                                &g.dev,
                                hidden.ptr(),
                                at,
                                xf.ptr(),
                                DType::F32,
                                m,
                                d,
                            )?;
                            xf.ptr()
                        }
                        None => x.ptr(),
                    };
                    s.add_product(g, xf, m, d, xv, v0, nv, logits.ptr())?;
                }
                each(c0, m, v0, nv, &logits)?;
            }
        }
        Ok(())
    }
}

impl LinearHook<CudaBackend> for CudaFusedHook<'_> {
    fn param<'b>(
        &'b mut self,
        g: &CudaBackend,
        w: &'b CudaWeight,
        id: ParamId,
    ) -> Result<&'b CudaWeight> {
        if !self.view.moves(id) {
            return Ok(w);
        }
        if let Some((l, k)) = self.layer_slot(id, w) {
            if self.perturb_layer(g, l)? {
                return Ok(self.layer_copy(l, k, w));
            }
        }
        if self.scratch_of != Some(id) {
            let low_rank = self.view.low_rank(&w.shape);
            let coef = low_rank.map(|rank| self.view.coefficients(id, rank));
            let (key, z, scale) = (
                self.elem_key(id),
                elem_z(self.view.elem_z(id)),
                self.view.scale,
            );
            let seed = self.view.key.seed;
            let s = self.scratch_for(g, &w.name, &w.shape, w.dtype)?;
            match coef {
                // A matrix with low-rank z: the in-place kernel's move, from w into the copy.
                Some(c) => {
                    g.zo_low_rank_move_into(s.ptr(), w, id, seed, &c, (0.0, 1.0))?;
                }
                None => {
                    kernels::zo_perturbed_copy(
                        &g.dev,
                        w.ptr(),
                        w.dtype,
                        w.numel(),
                        0,
                        key,
                        z,
                        (s.ptr(), scale),
                        None,
                    )?;
                }
            }
            self.scratch_of = Some(id);
        }
        Ok(self.scratch.as_ref().expect("filled above"))
    }

    fn embed(
        &mut self,
        g: &CudaBackend,
        table: &CudaWeight,
        ids: &[u32],
        id: ParamId,
        out: &mut CudaAct,
    ) -> Result<()> {
        g.embed(table, ids, out)?;
        if !self.view.moves(id) || ids.is_empty() {
            return Ok(());
        }
        let d = table.shape[1];
        if self.view.low_rank(&table.shape).is_some() {
            // Rows t of U diag(c) V^T / sqrt(r): the gathered rows of U's scaled copy times V^T.
            let Some(side) = self.side(g, table, id)? else {
                return Ok(());
            };
            let r = side.rank;
            let idx = DeviceRows::upload(g, ids.iter().map(|&t| t as usize), "token ids")?;
            let ug = g.alloc_buf(ids.len() * r * 4, Tag::Scratch, "gathered rows of U")?;
            kernels::gather_rows(
                &g.dev,
                side.us,
                idx.idx.ptr(),
                ug.ptr(),
                DType::F32,
                ids.len(),
                r,
            )?;
            let args = f32_gemm(ids.len(), d, r, ug.ptr(), side.v, out.ptr(), 1.0);
            return gemm::gemm_xwt(&g.dev, &args);
        }
        let ids_dev = g.buf_from_host(ids, Tag::Scratch, "token ids")?;
        kernels::zo_perturb_gathered(
            &g.dev,
            out.ptr(),
            ids_dev.ptr(),
            table.dtype,
            ids.len(),
            d,
            self.elem_key(id),
            elem_z(self.view.elem_z(id)),
            self.view.scale,
        )
    }

    fn head_target_logprobs(
        &mut self,
        g: &CudaBackend,
        hidden: &CudaAct,
        head: &CudaWeight,
        id: ParamId,
        targets: &[i32],
    ) -> Result<Vec<f32>> {
        if !self.view.moves(id) {
            return g.target_logprobs(hidden, head, targets);
        }
        let (vocab, _) = check_head(head, hidden, "target_logprobs")?;
        let rows = crate::backend::cpu::target_rows(targets, hidden.rows, vocab)?;
        let mut out = vec![0.0f32; targets.len()];
        let n = rows.len();
        if n == 0 {
            return Ok(out);
        }
        let rows_dev = DeviceRows::upload(g, rows.iter().copied(), "LM head row indices")?;
        let tgt: Vec<i32> = rows.iter().map(|&r| targets[r]).collect();
        let tgt_dev = g.buf_from_host(&tgt, Tag::Scratch, "target ids")?;
        let run_max = g.buf_from_host(&vec![f32::NEG_INFINITY; n], Tag::Scratch, "row maxima")?;
        let run_sum = g.buf_from_host(&vec![0.0f64; n], Tag::Scratch, "row sums")?;
        let run_tgt = g.buf_from_host(&vec![f32::NAN; n], Tag::Scratch, "target logits")?;
        self.head_blocks(g, hidden, head, id, &rows_dev, |c0, m, v0, nv, logits| {
            kernels::lse_block(
                &g.dev,
                logits.ptr(),
                nv,
                v0,
                tgt_dev.ptr_at(c0 * 4),
                run_max.ptr_at(c0 * 4),
                run_sum.ptr_at(c0 * 8),
                run_tgt.ptr_at(c0 * 4),
                m,
            )
        })?;
        let max: Vec<f32> = g.buf_to_host(&run_max, n)?;
        let sum: Vec<f64> = g.buf_to_host(&run_sum, n)?;
        let target: Vec<f32> = g.buf_to_host(&run_tgt, n)?;
        for (i, &r) in rows.iter().enumerate() {
            let run = RunningLogSumExp {
                max: max[i],
                sum: sum[i],
                target: target[i],
            };
            out[r] = run.logprob();
        }
        Ok(out)
    }

    fn head_logits_rows(
        &mut self,
        g: &CudaBackend,
        hidden: &CudaAct,
        head: &CudaWeight,
        id: ParamId,
        rows: &[usize],
    ) -> Result<Vec<f32>> {
        if !self.view.moves(id) {
            return g.logits_rows(hidden, head, rows);
        }
        let vocab = check_logit_rows(head, hidden, rows)?;
        let mut out = vec![0.0f32; rows.len() * vocab];
        if rows.is_empty() {
            return Ok(out);
        }
        let rows_dev = DeviceRows::upload(g, rows.iter().copied(), "LM head row indices")?;
        let mut part = Vec::new();
        self.head_blocks(g, hidden, head, id, &rows_dev, |c0, m, v0, nv, logits| {
            part.resize(m * nv, 0.0f32);
            g.dev.dtoh(logits, 0, &mut part)?;
            for (i, p) in part.chunks(nv).enumerate() {
                let o = (c0 + i) * vocab + v0;
                out[o..o + nv].copy_from_slice(p);
            }
            Ok(())
        })?;
        Ok(out)
    }

    fn linear(
        &mut self,
        g: &CudaBackend,
        x: &CudaAct,
        w: &CudaWeight,
        id: ParamId,
        out: &mut CudaAct,
    ) -> Result<()> {
        if self.low_rank_copies || self.view.low_rank(&w.shape).is_none() {
            let w = self.param(g, w, id)?;
            return g.matmul(x, w, out);
        }
        g.matmul(x, w, out)?;
        let Some(side) = self.side(g, w, id)? else {
            return Ok(());
        };
        let xv = g.alloc_buf(x.rows * side.rank * 4, Tag::Scratch, "x V of a linear")?;
        side.add_product(
            g,
            x.ptr(),
            x.rows,
            w.shape[1],
            &xv,
            0,
            w.shape[0],
            out.ptr(),
        )
    }
}
