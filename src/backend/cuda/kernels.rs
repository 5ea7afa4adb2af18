//! Typed launchers of the kernels in csrc/: each mirrors its kernel's C signature (the
//! argument order here is the contract) and picks the launch shape.

use super::context::{Args, Launch};
use crate::model::DType;
use anyhow::{bail, Result};

const THREADS: u32 = 256;

fn grid_1d(work: u64) -> u32 {
    work.div_ceil(THREADS as u64).clamp(1, 1 << 20) as u32
}

/// Threads per row-block: enough for `cols` elements, a multiple of 32, at most 1024.
fn row_threads(cols: usize) -> u32 {
    (cols.div_ceil(32) * 32).clamp(32, 1024) as u32
}

fn rows_grid(rows: usize) -> Result<u32> {
    if rows > i32::MAX as usize {
        bail!("{rows} rows exceed the grid limit");
    }
    Ok(rows as u32)
}

/// The variant of kernel `op` for weights or outputs stored as `dtype` (the GPU keeps no f16).
fn for_storage(
    op: &str,
    dtype: DType,
    f32_kernel: &'static str,
    bf16_kernel: &'static str,
) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok(f32_kernel),
        DType::BF16 => Ok(bf16_kernel),
        DType::F16 => bail!("{op}: f16 storage is not supported on the GPU"),
    }
}

fn check_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow::anyhow!("{what} = {v} exceeds 32 bits"))
}

pub(crate) fn f32_to_bf16(dev: &dyn Launch, src: u64, dst: u64, n: usize) -> Result<()> {
    let args = Args::new().ptr(src).ptr(dst).u64(n as u64);
    dev.launch(
        "f32_to_bf16",
        (grid_1d(n as u64), 1, 1),
        (THREADS, 1, 1),
        0,
        args,
    )
}

pub(crate) fn bf16_to_f32(dev: &dyn Launch, src: u64, dst: u64, n: usize) -> Result<()> {
    let args = Args::new().ptr(src).ptr(dst).u64(n as u64);
    dev.launch(
        "bf16_to_f32",
        (grid_1d(n as u64), 1, 1),
        (THREADS, 1, 1),
        0,
        args,
    )
}

/// out[r] = src[rows[r]] for r < n_rows (rows of `cols` f32), stored as `out_dtype`.
pub(crate) fn gather_rows(
    dev: &dyn Launch,
    src: u64,
    rows: u64,
    out: u64,
    out_dtype: DType,
    n_rows: usize,
    cols: usize,
) -> Result<()> {
    let name = for_storage(
        "gather_rows",
        out_dtype,
        "gather_rows_f32",
        "gather_rows_bf16",
    )?;
    let args = Args::new()
        .ptr(src)
        .ptr(rows)
        .ptr(out)
        .i32(check_i32("cols", cols)?);
    dev.launch(
        name,
        (rows_grid(n_rows)?, 1, 1),
        (row_threads(cols).min(256), 1, 1),
        0,
        args,
    )
}

pub(crate) fn embed(
    dev: &dyn Launch,
    table: u64,
    table_dtype: DType,
    ids: u64,
    out: u64,
    rows: usize,
    d: usize,
) -> Result<()> {
    let name = for_storage("embed", table_dtype, "embed_f32", "embed_bf16")?;
    let args = Args::new()
        .ptr(table)
        .ptr(ids)
        .ptr(out)
        .i32(check_i32("hidden", d)?);
    dev.launch(
        name,
        (rows_grid(rows)?, 1, 1),
        (row_threads(d).min(256), 1, 1),
        0,
        args,
    )
}

fn norm_threads(d: usize) -> u32 {
    // Vectorized rows move 4 elements per thread.
    let per = if d.is_multiple_of(4) { d / 4 } else { d };
    row_threads(per).min(1024)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn rmsnorm(
    dev: &dyn Launch,
    x: u64,
    w: u64,
    w_dtype: DType,
    out: u64,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<()> {
    let name = for_storage("rmsnorm", w_dtype, "rmsnorm_f32w", "rmsnorm_bf16w")?;
    let args = Args::new()
        .ptr(x)
        .ptr(w)
        .ptr(out)
        .i32(check_i32("hidden", d)?)
        .f32(eps);
    dev.launch(
        name,
        (rows_grid(rows)?, 1, 1),
        (norm_threads(d), 1, 1),
        0,
        args,
    )
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn add_rmsnorm(
    dev: &dyn Launch,
    residual: u64,
    delta: u64,
    w: u64,
    w_dtype: DType,
    out: u64,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<()> {
    let name = for_storage(
        "add_rmsnorm",
        w_dtype,
        "add_rmsnorm_f32w",
        "add_rmsnorm_bf16w",
    )?;
    let args = Args::new()
        .ptr(residual)
        .ptr(delta)
        .ptr(w)
        .ptr(out)
        .i32(check_i32("hidden", d)?)
        .f32(eps);
    dev.launch(
        name,
        (rows_grid(rows)?, 1, 1),
        (norm_threads(d), 1, 1),
        0,
        args,
    )
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn rope(
    dev: &dyn Launch,
    x: u64,
    inv_freq: u64,
    rows: usize,
    n_heads: usize,
    head_dim: usize,
    q_len: usize,
    q_offset: usize,
) -> Result<()> {
    let args = Args::new()
        .ptr(x)
        .ptr(inv_freq)
        .i32(check_i32("n_heads", n_heads)?)
        .i32(check_i32("head_dim", head_dim)?)
        .i32(check_i32("q_len", q_len.max(1))?)
        .i32(check_i32("q_offset", q_offset)?);
    let pairs = n_heads * head_dim / 2;
    dev.launch(
        "rope_f32",
        (rows_grid(rows)?, 1, 1),
        (row_threads(pairs).min(256), 1, 1),
        head_dim * 4,
        args,
    )
}

/// Query rows per block and key rows per tile (csrc/attention.cu).
const ATT_BR: usize = 16;
const ATT_BC: usize = 32;

#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    dev: &dyn Launch,
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    kv_valid: u64,
    batch: usize,
    q_len: usize,
    kv_len: usize,
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    q_offset: usize,
) -> Result<()> {
    let name = match hd.div_ceil(32) {
        1 => "attention_f32_nt1",
        2 => "attention_f32_nt2",
        3 | 4 => "attention_f32_nt4",
        5..=8 => "attention_f32_nt8",
        _ => bail!("attention: head_dim {hd} is larger than the supported 256"),
    };
    let smem = (ATT_BR * hd + ATT_BC * (hd + 1) + ATT_BC * hd) * 4;
    let args = Args::new()
        .ptr(q)
        .ptr(k)
        .ptr(v)
        .ptr(out)
        .ptr(kv_valid)
        .i32(check_i32("q_len", q_len)?)
        .i32(check_i32("kv_len", kv_len)?)
        .i32(check_i32("n_heads", n_heads)?)
        .i32(check_i32("n_kv_heads", n_kv)?)
        .i32(check_i32("head_dim", hd)?)
        .i32(check_i32("q_offset", q_offset)?)
        .f32(1.0 / (hd as f32).sqrt());
    let grid = (q_len.div_ceil(ATT_BR) as u32, n_heads as u32, batch as u32);
    dev.launch(name, grid, (128, 1, 1), smem, args)
}

pub(crate) fn swiglu(dev: &dyn Launch, gate: u64, up: u64, n: usize) -> Result<()> {
    let args = Args::new().ptr(gate).ptr(up).u64(n as u64);
    dev.launch(
        "swiglu_f32",
        (grid_1d(n.div_ceil(4) as u64), 1, 1),
        (THREADS, 1, 1),
        0,
        args,
    )
}

/// out[dst[r]] = log softmax(logits[r])[target[r]] for the `rows` rows of a logits chunk.
pub(crate) fn target_logprob(
    dev: &dyn Launch,
    logits: u64,
    vocab: usize,
    target: u64,
    dst: u64,
    out: u64,
    rows: usize,
) -> Result<()> {
    let args = Args::new()
        .ptr(logits)
        .i32(check_i32("vocab", vocab)?)
        .ptr(target)
        .ptr(dst)
        .ptr(out);
    dev.launch(
        "target_logprob_f32",
        (rows_grid(rows)?, 1, 1),
        (1024, 1, 1),
        0,
        args,
    )
}

/// A Philox stream: (run seed, step, tensor id); see csrc/philox.cuh and src/rng.
#[derive(Clone, Copy, Debug)]
pub struct PhiloxKey {
    pub seed: u64,
    pub step: u32,
    pub tensor: u32,
}

/// Blocks of THREADS threads for one thread per Philox block over elements [start, start + n),
/// `per_block` elements a block (8 normals, or 4 uniforms or signs).
fn philox_grid(start: u64, n: u64, per_block: u64) -> u32 {
    let blocks = (start + n).div_ceil(per_block) - start / per_block;
    blocks.div_ceil(THREADS as u64).clamp(1, 65535) as u32
}

fn key_args(args: Args, key: PhiloxKey) -> Args {
    args.u32(key.seed as u32)
        .u32((key.seed >> 32) as u32)
        .u32(key.step)
        .u32(key.tensor)
}

/// out[i] = shift + scale * z(start + i) in `dtype` (shift 0: scale * z).
#[allow(clippy::too_many_arguments)]
pub(crate) fn fill_normal(
    dev: &dyn Launch,
    out: u64,
    dtype: DType,
    n: usize,
    key: PhiloxKey,
    start: u64,
    scale: f32,
    shift: f32,
) -> Result<()> {
    let name = for_storage("fill_normal", dtype, "fill_normal_f32", "fill_normal_bf16")?;
    let args = key_args(Args::new().ptr(out).u64(n as u64), key)
        .u64(start)
        .f32(scale)
        .f32(shift);
    dev.launch(
        name,
        (philox_grid(start, n as u64, 8), 1, 1),
        (THREADS, 1, 1),
        0,
        args,
    )
}

/// w[i] += scale * z(start + i), w in `dtype`.
pub(crate) fn axpy_normal(
    dev: &dyn Launch,
    w: u64,
    dtype: DType,
    n: usize,
    key: PhiloxKey,
    start: u64,
    scale: f32,
) -> Result<()> {
    let name = for_storage("axpy_normal", dtype, "axpy_normal_f32", "axpy_normal_bf16")?;
    let args = key_args(Args::new().ptr(w).u64(n as u64), key)
        .u64(start)
        .f32(scale);
    dev.launch(
        name,
        (philox_grid(start, n as u64, 8), 1, 1),
        (THREADS, 1, 1),
        0,
        args,
    )
}

pub(crate) fn fill_rademacher(
    dev: &dyn Launch,
    out: u64,
    n: usize,
    key: PhiloxKey,
    start: u64,
    scale: f32,
) -> Result<()> {
    let args = key_args(Args::new().ptr(out).u64(n as u64), key)
        .u64(start)
        .f32(scale);
    dev.launch(
        "fill_rademacher_f32",
        (philox_grid(start, n as u64, 4), 1, 1),
        (THREADS, 1, 1),
        0,
        args,
    )
}

/// Raw words of Philox blocks [first, first + n) into out[4 n] (u32).
pub(crate) fn philox_words(
    dev: &dyn Launch,
    out: u64,
    n: usize,
    key: PhiloxKey,
    first: u64,
) -> Result<()> {
    let args = key_args(Args::new().ptr(out).u64(n as u64), key).u64(first);
    dev.launch(
        "philox_words",
        (grid_1d(n as u64).min(65535), 1, 1),
        (THREADS, 1, 1),
        0,
        args,
    )
}

/// The z of an element pass: dense, or dense zeroed where |w0| > threshold.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ElemZ {
    Dense,
    Sparse { threshold: f32 },
}

impl ElemZ {
    /// The job tables' (sparse, threshold) fields.
    fn flag_and_threshold(self) -> (u32, f32) {
        match self {
            ElemZ::Dense => (0, 0.0),
            ElemZ::Sparse { threshold } => (1, threshold),
        }
    }

    /// The kernels' (sparse, threshold) arguments; a dense pass ignores the threshold.
    fn args(self, args: Args) -> Args {
        match self {
            ElemZ::Dense => args.i32(0).f32(0.0),
            ElemZ::Sparse { threshold } => args.i32(1).f32(threshold),
        }
    }
}

/// The rules of the element kernel (csrc/zo.cu ZF_RULE_*).
#[derive(Clone, Copy, Debug)]
pub(crate) enum ElemRule {
    /// w0 + to z.
    Move { to: f32 },
    /// w0 - lr (g z + wd w0), w0 where z == 0.
    Sgd { lr: f32, g: f32, wd: f32 },
}

/// w (n elements of `dtype`, holding w0 + offset z) <- rule(w0, z), z the normals of `key`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn zo_pass(
    dev: &dyn Launch,
    w: u64,
    dtype: DType,
    n: usize,
    key: PhiloxKey,
    z: ElemZ,
    offset: f32,
    rule: ElemRule,
) -> Result<()> {
    let name = for_storage("zo_pass", dtype, "zo_pass_f32", "zo_pass_bf16")?;
    let (code, p) = match rule {
        ElemRule::Move { to } => (0, [to, 0.0, 0.0]),
        ElemRule::Sgd { lr, g, wd } => (1, [lr, g, wd]),
    };
    let args = key_args(Args::new().ptr(w).u64(n as u64), key).f32(offset);
    let args = z.args(args).i32(code).f32(p[0]).f32(p[1]).f32(p[2]);
    dev.launch(
        name,
        (philox_grid(0, n as u64, 8), 1, 1),
        (THREADS, 1, 1),
        0,
        args,
    )
}

/// The Adam element pass: like `zo_pass`, with the f32 moments `m`, `v` (n each) updated in
/// place and `a` the step's hyperparameters.
#[allow(clippy::too_many_arguments)]
pub(crate) fn zo_adam_pass(
    dev: &dyn Launch,
    w: u64,
    dtype: DType,
    m: u64,
    v: u64,
    n: usize,
    key: PhiloxKey,
    z: ElemZ,
    offset: f32,
    a: &crate::zo::passes::AdamArgs,
) -> Result<()> {
    let name = for_storage(
        "zo_adam_pass",
        dtype,
        "zo_adam_pass_f32",
        "zo_adam_pass_bf16",
    )?;
    let args = key_args(Args::new().ptr(w).ptr(m).ptr(v).u64(n as u64), key).f32(offset);
    let args = z
        .args(args)
        .f32(a.g)
        .f32(a.lr)
        .f32(a.wd)
        .f32(a.beta1)
        .f32(a.beta2)
        .f32(a.c1)
        .f32(a.c2)
        .f32(a.eps);
    dev.launch(
        name,
        (philox_grid(0, n as u64, 8), 1, 1),
        (THREADS, 1, 1),
        0,
        args,
    )
}

/// What one tensor's pass in a `PassJobs` batch writes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum JobRule<'a> {
    Elem(ElemRule),
    /// Adam with the tensor's f32 moments at these device addresses.
    Adam {
        m: u64,
        v: u64,
        args: &'a crate::zo::passes::AdamArgs,
    },
}

/// One tensor of `zo_pass_jobs` (csrc/zo.cu ZoPassJob, field for field).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct PassJob {
    w: u64,
    m: u64,
    v: u64,
    n: u64,
    /// The Philox blocks (8 elements each) of the jobs before this one.
    first_block: u64,
    tensor: u32,
    bf16: u32,
    sparse: u32,
    rule: u32,
    threshold: f32,
    offset: f32,
    p: [f32; 3],
    /// g, lr, wd, beta1, beta2, c1, c2, eps (csrc/zo.cu ZoAdam).
    adam: [f32; 8],
    pad: [f32; 3],
}
const _: () = assert!(std::mem::size_of::<PassJob>() == 120);
const _: () = assert!(std::mem::size_of::<CopyJob>() == 48);

impl PassJob {
    /// Whether this job writes the tensor at device address `w`.
    pub(crate) fn writes(&self, w: u64) -> bool {
        self.w == w
    }
}

/// The jobs of a batch kernel and the blocks (Philox blocks, or thread blocks) of the batch
/// being filled: each job records the blocks of the jobs before it in its batch
/// (`first_block`), which the kernel's `job_of` searches. A table holds one batch or several,
/// each launched from its first job.
pub(crate) struct JobTable<J> {
    pub jobs: Vec<J>,
    pub blocks: u64,
}

impl<J> Default for JobTable<J> {
    fn default() -> Self {
        JobTable {
            jobs: vec![],
            blocks: 0,
        }
    }
}

impl<J> JobTable<J> {
    /// Starts another batch in the same table: the jobs added from now on count their blocks
    /// from 0.
    pub(crate) fn new_batch(&mut self) {
        self.blocks = 0;
    }

    /// Adds the job `make(first_block)`, which covers `blocks` blocks.
    fn add(&mut self, blocks: u64, make: impl FnOnce(u64) -> J) {
        self.jobs.push(make(self.blocks));
        self.blocks += blocks;
    }
}

/// Element passes of many tensors as `zo_pass_jobs` takes them, for one Philox seed and step.
pub(crate) type PassJobs = JobTable<PassJob>;

impl PassJobs {
    /// Adds the pass `zo_pass` or `zo_adam_pass` would run over the n elements of `dtype` at
    /// `w` (z of Philox tensor word `tensor`); empty tensors add nothing.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn push(
        &mut self,
        w: u64,
        dtype: DType,
        n: usize,
        tensor: u32,
        z: ElemZ,
        offset: f32,
        rule: JobRule,
    ) -> Result<()> {
        let bf16 = storage_flag("zo_pass_jobs", dtype)?;
        if n == 0 {
            return Ok(());
        }
        let (sparse, threshold) = z.flag_and_threshold();
        let (rule, p, (m, v), adam) = match rule {
            JobRule::Elem(ElemRule::Move { to }) => (0, [to, 0.0, 0.0], (0, 0), [0.0; 8]),
            JobRule::Elem(ElemRule::Sgd { lr, g, wd }) => (1, [lr, g, wd], (0, 0), [0.0; 8]),
            JobRule::Adam { m, v, args: a } => (
                2,
                [0.0; 3],
                (m, v),
                [a.g, a.lr, a.wd, a.beta1, a.beta2, a.c1, a.c2, a.eps],
            ),
        };
        self.add((n as u64).div_ceil(8), |first_block| PassJob {
            w,
            m,
            v,
            n: n as u64,
            first_block,
            tensor,
            bf16,
            sparse,
            rule,
            threshold,
            offset,
            p,
            adam,
            pad: [0.0; 3],
        });
        Ok(())
    }
}

/// Runs the `count` jobs of a `PassJobs` batch at device address `jobs` (`blocks` Philox
/// blocks in all) for the seed and step of `key` (each job has its own tensor word).
pub(crate) fn zo_pass_jobs(
    dev: &dyn Launch,
    jobs: u64,
    count: usize,
    blocks: u64,
    key: PhiloxKey,
) -> Result<()> {
    launch_jobs(
        dev,
        "zo_pass_jobs",
        (jobs, count, blocks),
        key.seed,
        |args| args.u32(key.step),
    )
}

/// Launches batch kernel `name` over a job table (device address, jobs, Philox blocks in all)
/// with Philox seed `seed`, one thread per Philox block; `more` appends the kernel's arguments
/// after those (the step word first, where the jobs share one).
fn launch_jobs(
    dev: &dyn Launch,
    name: &'static str,
    (jobs, count, blocks): (u64, usize, u64),
    seed: u64,
    more: impl FnOnce(Args) -> Args,
) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    let args = Args::new()
        .ptr(jobs)
        .i32(
            i32::try_from(count)
                .map_err(|_| anyhow::anyhow!("{name}: {count} jobs exceed 32 bits"))?,
        )
        .u64(blocks)
        .u32(seed as u32)
        .u32((seed >> 32) as u32);
    dev.launch(
        name,
        (philox_grid(0, 8 * blocks, 8), 1, 1),
        (THREADS, 1, 1),
        0,
        more(args),
    )
}

/// The jobs' storage flag: 1 for bf16, 0 for f32.
fn storage_flag(op: &str, dtype: DType) -> Result<u32> {
    match dtype {
        DType::F32 => Ok(0),
        DType::BF16 => Ok(1),
        DType::F16 => bail!("{op}: f16 storage is not supported on the GPU"),
    }
}

/// Columns (= threads) per block and rows per tile of the low-rank kernel (csrc/zo.cu).
const LR_COLS: usize = 128;
const LR_ROWS: usize = 32;
/// The largest rank whose factor tiles fit in the default 48 KB of shared memory.
pub(crate) const LR_MAX_RANK: usize = 64;
/// Blocks to aim for: enough to fill a large GPU, few enough that each block reuses its V tile
/// over several row tiles.
const LR_TARGET_BLOCKS: usize = 1024;

/// Dynamic shared memory of the low-rank kernel: V [128 x (r | 1)], uc [32 x r], coef [r].
pub(crate) fn low_rank_smem(rank: usize) -> usize {
    4 * (LR_COLS * (rank | 1) + LR_ROWS * rank + rank)
}

/// w [rows x cols] <- w0 + to z where src (w itself in place, else the tensor w copies) holds
/// w0 + offset z, for the low-rank z of the fixed factors of tensor `key.tensor` (Philox steps
/// `factor_u`, `factor_v`) and the f32 coefficients at `coef` (`rank` of them), with
/// norm = 1 / sqrt(rank) as the host computes it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn zo_low_rank_move(
    dev: &dyn Launch,
    (w, src): (u64, u64),
    dtype: DType,
    rows: usize,
    cols: usize,
    coef: u64,
    rank: usize,
    seed: u64,
    tensor: u32,
    (factor_u, factor_v): (u32, u32),
    offset: f32,
    to: f32,
) -> Result<()> {
    let name = for_storage(
        "zo_low_rank_move",
        dtype,
        "zo_low_rank_move_f32",
        "zo_low_rank_move_bf16",
    )?;
    if rank > LR_MAX_RANK {
        bail!(
            "low-rank directions of rank {rank} are not supported on the CUDA backend \
             (at most {LR_MAX_RANK}); use --rank {LR_MAX_RANK} or less"
        );
    }
    let norm = 1.0 / (rank as f32).sqrt();
    let args = Args::new()
        .ptr(w)
        .ptr(src)
        .ptr(coef)
        .i32(check_i32("rows", rows)?)
        .i32(check_i32("cols", cols)?)
        .i32(rank as i32)
        .u32(seed as u32)
        .u32((seed >> 32) as u32)
        .u32(factor_u)
        .u32(factor_v)
        .u32(tensor)
        .f32(norm)
        .f32(offset)
        .f32(to);
    let (gx, gy) = low_rank_grid(rows, cols);
    dev.launch(
        name,
        (gx, gy, 1),
        (LR_COLS as u32, 1, 1),
        low_rank_smem(rank),
        args,
    )
}

/// The blocks of the low-rank kernel over a [rows x cols] matrix: one per 128 columns, times
/// walkers over its row tiles.
fn low_rank_grid(rows: usize, cols: usize) -> (u32, u32) {
    let gx = cols.div_ceil(LR_COLS);
    let gy = rows
        .div_ceil(LR_ROWS)
        .min(LR_TARGET_BLOCKS.div_ceil(gx.max(1)))
        .clamp(1, 65535);
    (gx as u32, gy as u32)
}

/// One matrix of `zo_low_rank_move_jobs` (csrc/zo.cu ZoLowRankJob, field for field).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct LowRankJob {
    w: u64,
    src: u64,
    coef: u64,
    /// The thread blocks of the jobs before this one.
    first_block: u64,
    rows: i32,
    cols: i32,
    rank: i32,
    tensor: u32,
    bf16: u32,
    grid_x: u32,
    grid_y: u32,
    norm: f32,
    offset: f32,
    to: f32,
}
const _: () = assert!(std::mem::size_of::<LowRankJob>() == 72);

impl LowRankJob {
    /// Whether this job writes the tensor at device address `w`.
    pub(crate) fn writes(&self, w: u64) -> bool {
        self.w == w
    }

    /// The blocks that walk the matrix's row tiles.
    #[cfg(test)]
    pub(crate) fn grid_y(&self) -> u32 {
        self.grid_y
    }
}

/// Low-rank moves of many matrices as `zo_low_rank_move_jobs` takes them, for one Philox seed
/// (each matrix has its own tensor word), with their coefficients gathered on the host: a job's
/// `coef` holds the index of its first coefficient until `resolve` points it at the device copy.
#[derive(Default)]
pub(crate) struct LowRankJobs {
    /// Their blocks are thread blocks; the coefficients stay one array across batches.
    pub jobs: JobTable<LowRankJob>,
    pub coefficients: Vec<f32>,
}

impl LowRankJobs {
    /// Adds the move `zo_low_rank_move` makes of the [rows x cols] matrix of `dtype` at `src`
    /// into the one at `w` (the same address in place; its factors of Philox tensor word
    /// `tensor`): w0 + offset z becomes w0 + to z. Empty matrices add nothing.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn push(
        &mut self,
        (w, src): (u64, u64),
        dtype: DType,
        (rows, cols): (usize, usize),
        tensor: u32,
        coef: &[f32],
        offset: f32,
        to: f32,
    ) -> Result<()> {
        let op = "zo_low_rank_move_jobs";
        let bf16 = storage_flag(op, dtype)?;
        let rank = coef.len();
        if rank == 0 || rank > LR_MAX_RANK {
            bail!("{op}: rank {rank} is outside 1..={LR_MAX_RANK}");
        }
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let (grid_x, grid_y) = low_rank_grid(rows, cols);
        let (rows, cols) = (check_i32("rows", rows)?, check_i32("cols", cols)?);
        let coef_at = self.coefficients.len() as u64;
        self.jobs
            .add(grid_x as u64 * grid_y as u64, |first_block| LowRankJob {
                w,
                src,
                coef: coef_at,
                first_block,
                rows,
                cols,
                rank: rank as i32,
                tensor,
                bf16,
                grid_x,
                grid_y,
                norm: 1.0 / (rank as f32).sqrt(),
                offset,
                to,
            });
        self.coefficients.extend_from_slice(coef);
        Ok(())
    }

    /// The largest rank of the jobs (0 for none), which sizes a launch's shared memory.
    pub(crate) fn max_rank(&self) -> usize {
        (self.jobs.jobs.iter())
            .map(|j| j.rank as usize)
            .max()
            .unwrap_or(0)
    }

    /// Points every job at its coefficients in the device copy of `coefficients` at `at`.
    pub(crate) fn resolve(&mut self, at: u64) {
        for j in &mut self.jobs.jobs {
            j.coef = at + 4 * j.coef;
        }
    }
}

/// Runs the `count` jobs of a resolved `LowRankJobs` batch at device address `jobs` (`blocks`
/// thread blocks in all, ranks up to `max_rank`) with Philox seed `seed` and the factors' step
/// words.
pub(crate) fn zo_low_rank_move_jobs(
    dev: &dyn Launch,
    (jobs, count, blocks): (u64, usize, u64),
    max_rank: usize,
    seed: u64,
    (factor_u, factor_v): (u32, u32),
) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    let name = "zo_low_rank_move_jobs";
    let grid = u32::try_from(blocks)
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| anyhow::anyhow!("{name}: {blocks} thread blocks exceed the grid"))?;
    let args = Args::new()
        .ptr(jobs)
        .i32(check_i32("jobs", count)?)
        .u32(seed as u32)
        .u32((seed >> 32) as u32)
        .u32(factor_u)
        .u32(factor_v);
    dev.launch(
        name,
        (grid, 1, 1),
        (LR_COLS as u32, 1, 1),
        low_rank_smem(max_rank),
        args,
    )
}

/// w <- w - factor w over n elements of `dtype`.
pub(crate) fn zo_decay(
    dev: &dyn Launch,
    w: u64,
    dtype: DType,
    n: usize,
    factor: f32,
) -> Result<()> {
    let name = for_storage("zo_decay", dtype, "zo_decay_f32", "zo_decay_bf16")?;
    let args = Args::new().ptr(w).u64(n as u64).f32(factor);
    dev.launch(name, (grid_1d(n as u64), 1, 1), (THREADS, 1, 1), 0, args)
}

/// dst[i] = w0 + to z(start + i) with w0 = src[i], n elements of `dtype`: the bits an in-place
/// Move pass from offset 0 leaves at element start + i, written to a copy; `other`, a second
/// copy and its `to` (a paired forward's other stream), from the same draw of z.
#[allow(clippy::too_many_arguments)]
pub(crate) fn zo_perturbed_copy(
    dev: &dyn Launch,
    src: u64,
    dtype: DType,
    n: usize,
    start: u64,
    key: PhiloxKey,
    z: ElemZ,
    (dst, to): (u64, f32),
    other: Option<(u64, f32)>,
) -> Result<()> {
    let name = for_storage(
        "zo_perturbed_copy",
        dtype,
        "zo_perturbed_copy_f32",
        "zo_perturbed_copy_bf16",
    )?;
    // A null `other` pointer writes no second copy.
    let (other, to_other) = other.unwrap_or((0, 0.0));
    let args = Args::new().ptr(src).ptr(dst).ptr(other);
    let args = key_args(args.u64(n as u64).u64(start), key);
    let args = z.args(args).f32(to).f32(to_other);
    dev.launch(
        name,
        (philox_grid(start, n as u64, 8), 1, 1),
        (THREADS, 1, 1),
        0,
        args,
    )
}

/// One tensor of `zo_perturbed_copy_jobs` (csrc/zo.cu ZoCopyJob, field for field): the
/// perturbed copy of a whole tensor, f32 or bf16, under its own Philox tensor word and z.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct CopyJob {
    src: u64,
    dst: u64,
    n: u64,
    /// The Philox blocks (8 elements each) of the jobs before this one.
    first_block: u64,
    tensor: u32,
    bf16: u32,
    sparse: u32,
    threshold: f32,
}

/// Batches of perturbed copies as `zo_perturbed_copy_jobs` takes them (Philox blocks).
pub(crate) type CopyJobs = JobTable<CopyJob>;

impl CopyJobs {
    /// Adds dst = w0 + to z for the n elements of `dtype` at `src` (z of Philox tensor word
    /// `tensor`); empty tensors add nothing.
    pub(crate) fn push(
        &mut self,
        (src, dst): (u64, u64),
        dtype: DType,
        n: usize,
        tensor: u32,
        z: ElemZ,
    ) -> Result<()> {
        let bf16 = storage_flag("zo_perturbed_copy_jobs", dtype)?;
        if n == 0 {
            return Ok(());
        }
        let (sparse, threshold) = z.flag_and_threshold();
        self.add((n as u64).div_ceil(8), |first_block| CopyJob {
            src,
            dst,
            n: n as u64,
            first_block,
            tensor,
            bf16,
            sparse,
            threshold,
        });
        Ok(())
    }
}

/// Runs `count` jobs of a `CopyJobs` table at device address `jobs` (`blocks` Philox blocks in
/// all) for Philox seed and step `key` (its tensor word comes from each job), each copy moved
/// by `to` z.
pub(crate) fn zo_perturbed_copy_jobs(
    dev: &dyn Launch,
    jobs: u64,
    count: usize,
    blocks: u64,
    key: PhiloxKey,
    to: f32,
) -> Result<()> {
    let table = (jobs, count, blocks);
    launch_jobs(dev, "zo_perturbed_copy_jobs", table, key.seed, |args| {
        args.u32(key.step).f32(to)
    })
}

/// One factor of `zo_factor_jobs` (csrc/zo.cu ZoFactorJob, field for field): the normals of a
/// Philox stream as a row-major f32 matrix, its columns scaled by coefficients or as drawn.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct FactorJob {
    dst: u64,
    coef: u64,
    n: u64,
    /// The Philox blocks (8 elements each) of the jobs before this one.
    first_block: u64,
    step: u32,
    tensor: u32,
    cols: u32,
    norm: f32,
}
const _: () = assert!(std::mem::size_of::<FactorJob>() == 48);

/// Batches of low-rank factors as `zo_factor_jobs` takes them (Philox blocks).
pub(crate) type FactorJobs = JobTable<FactorJob>;

impl FactorJobs {
    /// Adds the n normals of stream `key` (its seed is the launch's) as an f32 matrix at `dst`,
    /// `cols` wide, with `scale` = (coefficients' device address, norm) making element i
    /// (z coef[i % cols]) norm, as `fill_normal` then `scale_cols` leave it; without `scale`
    /// the normals as drawn. Empty factors add nothing.
    pub(crate) fn push(
        &mut self,
        dst: u64,
        n: usize,
        cols: usize,
        key: PhiloxKey,
        scale: Option<(u64, f32)>,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let cols = u32::try_from(cols)
            .ok()
            .filter(|&c| c > 0)
            .ok_or_else(|| anyhow::anyhow!("zo_factor_jobs: a factor {cols} columns wide"))?;
        let (coef, norm) = scale.unwrap_or((0, 1.0));
        self.add((n as u64).div_ceil(8), |first_block| FactorJob {
            dst,
            coef,
            n: n as u64,
            first_block,
            step: key.step,
            tensor: key.tensor,
            cols,
            norm,
        });
        Ok(())
    }
}

/// Runs `count` jobs of a `FactorJobs` table at device address `jobs` (`blocks` Philox blocks
/// in all) with Philox seed `seed` (step and tensor words come from each job).
pub(crate) fn zo_factor_jobs(
    dev: &dyn Launch,
    jobs: u64,
    count: usize,
    blocks: u64,
    seed: u64,
) -> Result<()> {
    launch_jobs(dev, "zo_factor_jobs", (jobs, count, blocks), seed, |args| {
        args
    })
}

/// Row r of `rows_f32` ([n_rows x d], holding table row ids[r] widened from `table_dtype`)
/// becomes that row of the perturbed table (w0 + to z, rounded to `table_dtype`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn zo_perturb_gathered(
    dev: &dyn Launch,
    rows_f32: u64,
    ids: u64,
    table_dtype: DType,
    n_rows: usize,
    d: usize,
    key: PhiloxKey,
    z: ElemZ,
    to: f32,
) -> Result<()> {
    let name = for_storage(
        "zo_perturb_gathered",
        table_dtype,
        "zo_perturb_gathered_f32",
        "zo_perturb_gathered_bf16",
    )?;
    let args = key_args(
        Args::new()
            .ptr(rows_f32)
            .ptr(ids)
            .i32(check_i32("hidden", d)?),
        key,
    );
    let args = z.args(args).f32(to);
    // Threads cover a row's Philox blocks (d / 8 plus a partial block at each end).
    let threads = row_threads(d / 8 + 2).min(256);
    dev.launch(name, (rows_grid(n_rows)?, 1, 1), (threads, 1, 1), 0, args)
}

/// x[i] = (x[i] coef[i % cols]) norm over n f32 elements (`coef` holds `cols` f32 values).
pub(crate) fn scale_cols(
    dev: &dyn Launch,
    x: u64,
    n: usize,
    cols: usize,
    coef: u64,
    norm: f32,
) -> Result<()> {
    let args = Args::new()
        .ptr(x)
        .u64(n as u64)
        .i32(check_i32("cols", cols)?)
        .ptr(coef)
        .f32(norm);
    dev.launch(
        "scale_cols_f32",
        (grid_1d(n as u64), 1, 1),
        (THREADS, 1, 1),
        0,
        args,
    )
}

/// Merges the logits of vocabulary ids v0 .. v0 + nv of `rows` rows ([rows x nv] f32) into each
/// row's running maximum (f32), sum of exponentials (f64) and target logit (f32).
#[allow(clippy::too_many_arguments)]
pub(crate) fn lse_block(
    dev: &dyn Launch,
    logits: u64,
    nv: usize,
    v0: usize,
    target: u64,
    run_max: u64,
    run_sum: u64,
    run_target: u64,
    rows: usize,
) -> Result<()> {
    let args = Args::new()
        .ptr(logits)
        .i32(check_i32("vocabulary block", nv)?)
        .i32(check_i32("vocabulary offset", v0)?)
        .ptr(target)
        .ptr(run_max)
        .ptr(run_sum)
        .ptr(run_target);
    dev.launch(
        "lse_block_f32",
        (rows_grid(rows)?, 1, 1),
        (row_threads(nv).min(1024), 1, 1),
        0,
        args,
    )
}
