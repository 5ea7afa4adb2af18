//! The backend seam: the narrow set of operations the model and the optimizers need. The model
//! code is written once against `Backend`; `cpu` is the reference implementation (the oracle of
//! every CUDA kernel) and `cuda` the product.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod mem;

use anyhow::Result;

/// Shape of a batch of sequences laid out row-major as [rows, features]: right-padded blocks
/// of q_len rows per sequence, or packed back to back with no padding at all.
#[derive(Clone, Debug)]
pub struct SeqLayout {
    pub batch: usize,
    /// Rows per sequence in the query tensor (padded layouts; the longest length when packed).
    pub q_len: usize,
    /// Rows per sequence in the key/value tensors (== q_len except when decoding from a cache).
    pub kv_len: usize,
    /// Valid key rows per sequence (the rest is padding or unused cache).
    pub kv_valid: Vec<usize>,
    /// Absolute position of query row 0 (the number of cached tokens when decoding).
    pub q_offset: usize,
    /// Packed sequences: sequence b holds rows [starts[b], starts[b] + kv_valid[b]) of q, k
    /// and v. Padding rows cost as much as real ones in every GEMM; packing skips them.
    pub starts: Option<Vec<usize>>,
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
            starts: None,
        }
    }

    /// Full sequences of lengths `lens`, packed back to back.
    pub fn packed(lens: &[usize]) -> Self {
        let mut starts = Vec::with_capacity(lens.len());
        let mut at = 0;
        for &l in lens {
            starts.push(at);
            at += l;
        }
        let longest = lens.iter().copied().max().unwrap_or(0);
        SeqLayout {
            batch: lens.len(),
            q_len: longest,
            kv_len: longest,
            kv_valid: lens.to_vec(),
            q_offset: 0,
            starts: Some(starts),
        }
    }

    pub fn rows(&self) -> usize {
        match &self.starts {
            Some(_) => self.kv_valid.iter().sum(),
            None => self.batch * self.q_len,
        }
    }

    /// (sequence, position within it) of query row `r`.
    pub fn query_row(&self, r: usize) -> (usize, usize) {
        match &self.starts {
            Some(starts) => {
                let b = starts.partition_point(|&s| s <= r) - 1;
                (b, r - starts[b])
            }
            None => (r / self.q_len, r % self.q_len),
        }
    }

    /// The query rows of sequence `b` (padding rows included in padded layouts).
    pub fn query_rows(&self, b: usize) -> std::ops::Range<usize> {
        match &self.starts {
            Some(starts) => starts[b]..starts[b] + self.kv_valid[b],
            None => b * self.q_len..(b + 1) * self.q_len,
        }
    }

    /// Row of key/value `j` of sequence `b`.
    pub fn key_row(&self, b: usize, j: usize) -> usize {
        match &self.starts {
            Some(starts) => starts[b] + j,
            None => b * self.kv_len + j,
        }
    }
}

/// Checks the operands of `out = x w^T` (w named `name`, shape `w_shape`) and returns w's
/// (out, in) dims; shared by every backend's `matmul` so they report the same errors.
pub fn check_matmul(
    name: &str,
    w_shape: &[usize],
    x: (usize, usize),
    out: (usize, usize),
) -> Result<(usize, usize)> {
    anyhow::ensure!(w_shape.len() == 2, "matmul: {name} is not a matrix");
    let (n, k) = (w_shape[0], w_shape[1]);
    anyhow::ensure!(
        x.1 == k,
        "matmul {name}: input has {} columns, weight expects {k}",
        x.1
    );
    anyhow::ensure!(out == (x.0, n), "matmul {name}: output shape");
    Ok((n, k))
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
    /// Whether `rope` and `attention` take packed layouts (`SeqLayout::packed`).
    fn supports_packed(&self) -> bool {
        false
    }
    /// A buffer of `rows * cols` elements, accounted under `tag`. Contents are unspecified.
    fn alloc(&self, rows: usize, cols: usize, tag: mem::Tag) -> Result<Self::Act>;
    fn act_rows(&self, a: &Self::Act) -> usize;
    /// Copies an activation to host f32 (for tests and logits).
    fn to_host(&self, a: &Self::Act) -> Result<Vec<f32>>;
    #[allow(clippy::wrong_self_convention)]
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

    /// A model now holds `weights` (`Llama::new`): counts them under `Tag::Weights` if this
    /// backend did not allocate them itself (the CPU's mapped or loaded tensors; the GPU's
    /// uploads were counted as they were allocated).
    fn adopt_weights(&self, weights: &crate::model::LlamaWeights<Self::Weight>) {
        let _ = weights;
    }
    /// The model that held `weights` is going away: undoes `adopt_weights`.
    fn release_weights(&self, weights: &crate::model::LlamaWeights<Self::Weight>) {
        let _ = weights;
    }
}

/// The one place every linear layer (and every other parameter use) goes through. A method
/// that perturbs weights on the fly, or adds an adapter, implements this; the model does not
/// know which one runs.
pub trait LinearHook<B: Backend> {
    /// The tensor to use in place of parameter `id` (e.g. a perturbed scratch copy). The model
    /// calls it for the norm gains, and the default `linear`, `embed` and head methods call it
    /// too; a hook that overrides those can avoid materializing whole tensors.
    fn param<'a>(
        &'a mut self,
        backend: &B,
        w: &'a B::Weight,
        id: ParamId,
    ) -> Result<&'a B::Weight> {
        let _ = (backend, id);
        Ok(w)
    }

    /// out[r] = row ids[r] of the embedding table, parameter `id`.
    fn embed(
        &mut self,
        backend: &B,
        table: &B::Weight,
        ids: &[u32],
        id: ParamId,
        out: &mut B::Act,
    ) -> Result<()> {
        let t = self.param(backend, table, id)?;
        backend.embed(t, ids, out)
    }

    /// `Backend::target_logprobs` through the LM head, parameter `id`.
    fn head_target_logprobs(
        &mut self,
        backend: &B,
        hidden: &B::Act,
        head: &B::Weight,
        id: ParamId,
        targets: &[i32],
    ) -> Result<Vec<f32>> {
        let h = self.param(backend, head, id)?;
        backend.target_logprobs(hidden, h, targets)
    }

    /// `Backend::logits_rows` through the LM head, parameter `id`.
    fn head_logits_rows(
        &mut self,
        backend: &B,
        hidden: &B::Act,
        head: &B::Weight,
        id: ParamId,
        rows: &[usize],
    ) -> Result<Vec<f32>> {
        let h = self.param(backend, head, id)?;
        backend.logits_rows(hidden, h, rows)
    }

    /// out = x w^T for the linear layer whose weight is parameter `id`.
    fn linear(
        &mut self,
        backend: &B,
        x: &B::Act,
        w: &B::Weight,
        id: ParamId,
        out: &mut B::Act,
    ) -> Result<()> {
        let w = self.param(backend, w, id)?;
        backend.matmul(x, w, out)
    }
}

/// The plain product: inference.
pub struct NoHook;
impl<B: Backend> LinearHook<B> for NoHook {}

/// Two forwards of one batch through two views of the weights (a ZO step's w + eps z and
/// w - eps z), run in lockstep one group of parameters at a time: whatever the two views share
/// for a group (the normals of z) is prepared once instead of once per forward.
pub trait PairedHook<B: Backend> {
    /// The hook through which stream `s` (0 or 1) sees the parameters.
    fn stream(&mut self, s: usize) -> &mut dyn LinearHook<B>;

    /// The parameters used from here to the next call form a new group; what was prepared
    /// for the previous group can go. The model calls it before each group's first stream.
    fn next_group(&mut self);

    /// `LinearHook::head_target_logprobs` of both streams, hidden[s] seen through stream s.
    fn head_target_logprobs(
        &mut self,
        backend: &B,
        hidden: [&B::Act; 2],
        head: &B::Weight,
        id: ParamId,
        targets: &[i32],
    ) -> Result<[Vec<f32>; 2]>;

    /// `LinearHook::head_logits_rows` of both streams.
    fn head_logits_rows(
        &mut self,
        backend: &B,
        hidden: [&B::Act; 2],
        head: &B::Weight,
        id: ParamId,
        rows: &[usize],
    ) -> Result<[Vec<f32>; 2]>;
}

#[cfg(test)]
mod tests {
    use super::check_matmul;

    #[test]
    fn matmul_operand_errors_name_the_weight() {
        assert_eq!(check_matmul("w", &[3, 4], (2, 4), (2, 3)).unwrap(), (3, 4));
        let err = |shape: &[usize], x, out| {
            check_matmul("layers.0.wq", shape, x, out)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(&[12], (2, 4), (2, 3)),
            "matmul: layers.0.wq is not a matrix"
        );
        assert_eq!(
            err(&[3, 4], (2, 5), (2, 3)),
            "matmul layers.0.wq: input has 5 columns, weight expects 4"
        );
        assert_eq!(
            err(&[3, 4], (2, 4), (2, 4)),
            "matmul layers.0.wq: output shape"
        );
        assert_eq!(
            err(&[3, 4], (2, 4), (1, 3)),
            "matmul layers.0.wq: output shape"
        );
    }
}
