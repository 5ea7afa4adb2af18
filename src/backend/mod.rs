//! The backend seam: the narrow set of operations the model and the optimizers need. The model
//! code is written once against `Backend`; `cpu` is the reference implementation (the oracle of
//! every CUDA kernel) and `cuda` the product.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod mem;

use anyhow::Result;

/// Shape of a batch of right-padded sequences laid out row-major as [batch * seq, features].
#[derive(Clone, Debug)]
pub struct SeqLayout {
    pub batch: usize,
    /// Rows per sequence in the query tensor.
    pub q_len: usize,
    /// Rows per sequence in the key/value tensors (== q_len except when decoding from a cache).
    pub kv_len: usize,
    /// Valid key rows per sequence (the rest is padding or unused cache).
    pub kv_valid: Vec<usize>,
    /// Absolute position of query row 0 (the number of cached tokens when decoding).
    pub q_offset: usize,
}

impl SeqLayout {
    /// Full-sequence layout (training, evaluation, prefill).
    pub fn full(batch: usize, seq: usize, lens: &[usize]) -> Self {
        assert_eq!(lens.len(), batch);
        SeqLayout {
            batch,
            q_len: seq,
            kv_len: seq,
            kv_valid: lens.to_vec(),
            q_offset: 0,
        }
    }

    pub fn rows(&self) -> usize {
        self.batch * self.q_len
    }
}

/// Attention shape: heads of queries and of keys/values (GQA when they differ).
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Identifies a parameter tensor: its position in the model's canonical tensor list.
pub type ParamId = usize;

/// The operations of a LLaMA forward. Activations are row-major [rows, cols] with f32 math;
/// weights are [out, in] as in HF. Every method writes its whole output.
pub trait Backend: Sized {
    /// An activation buffer resident on this backend.
    type Act;
    /// A weight tensor resident on this backend.
    type Weight;

    fn name(&self) -> String;
    /// A buffer of `rows * cols` elements, accounted under `tag`. Contents are unspecified.
    fn alloc(&self, rows: usize, cols: usize, tag: mem::Tag) -> Result<Self::Act>;
    fn act_rows(&self, a: &Self::Act) -> usize;
    /// Copies an activation to host f32 (for tests and logits).
    fn to_host(&self, a: &Self::Act) -> Result<Vec<f32>>;
    #[allow(clippy::wrong_self_convention)] // a constructor on the backend, not a conversion
    fn from_host(&self, data: &[f32], rows: usize, cols: usize, tag: mem::Tag)
        -> Result<Self::Act>;

    /// out[r] = table[ids[r]].
    fn embed(&self, table: &Self::Weight, ids: &[u32], out: &mut Self::Act) -> Result<()>;
    /// out = rmsnorm(x) * w.
    fn rmsnorm(&self, x: &Self::Act, w: &Self::Weight, eps: f32, out: &mut Self::Act)
        -> Result<()>;
    /// residual += delta; out = rmsnorm(residual) * w (the fused residual add).
    fn add_rmsnorm(
        &self,
        residual: &mut Self::Act,
        delta: &Self::Act,
        w: &Self::Weight,
        eps: f32,
        out: &mut Self::Act,
    ) -> Result<()>;
    /// out = x w^T with w [out, in]. The plain product; hooks wrap it (see `LinearHook`).
    fn matmul(&self, x: &Self::Act, w: &Self::Weight, out: &mut Self::Act) -> Result<()>;
    /// Rotates pairs (i, i + head_dim/2) of every head (HF rotate_half) by position * inv_freq.
    fn rope(
        &self,
        x: &mut Self::Act,
        n_heads: usize,
        layout: &SeqLayout,
        inv_freq: &[f32],
    ) -> Result<()>;
    /// Causal attention of q [batch*q_len, n_heads*hd] over k, v [batch*kv_len, n_kv*hd];
    /// query row t of sequence b sees key rows j <= t + q_offset with j < kv_valid[b].
    fn attention(
        &self,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
        shape: AttnShape,
        layout: &SeqLayout,
        out: &mut Self::Act,
    ) -> Result<()>;
    /// gate <- silu(gate) * up, in place (saves one [rows, ffn] buffer).
    fn swiglu(&self, gate: &mut Self::Act, up: &Self::Act) -> Result<()>;
    /// For each row r with targets[r] >= 0: log softmax(hidden[r] head^T)[targets[r]]; 0 elsewhere.
    /// Logits are produced in chunks of rows and never held for all rows at once.
    fn target_logprobs(
        &self,
        hidden: &Self::Act,
        head: &Self::Weight,
        targets: &[i32],
    ) -> Result<Vec<f32>>;
    /// Full logits of the listed rows, [rows.len(), vocab] on the host (generation).
    fn logits_rows(
        &self,
        hidden: &Self::Act,
        head: &Self::Weight,
        rows: &[usize],
    ) -> Result<Vec<f32>>;
    /// Copies rows [0, src.rows) of src into dst starting at row `dst_row` (KV cache append).
    fn copy_rows(&self, src: &Self::Act, dst: &mut Self::Act, dst_row: usize) -> Result<()>;
}

/// The one place every linear layer goes through. A method that perturbs weights on the fly,
/// or adds an adapter, implements this; the model does not know which one runs.
pub trait LinearHook<B: Backend> {
    fn linear(
        &mut self,
        backend: &B,
        x: &B::Act,
        w: &B::Weight,
        id: ParamId,
        out: &mut B::Act,
    ) -> Result<()> {
        let _ = id;
        backend.matmul(x, w, out)
    }
}

/// The plain product: inference.
pub struct NoHook;
impl<B: Backend> LinearHook<B> for NoHook {}
