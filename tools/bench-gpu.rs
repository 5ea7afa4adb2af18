//! GPU micro- and model benchmarks of the CUDA backend; prints one JSON object per line.
//!
//!   cargo run --release --example bench-gpu [-- --quick]
//!
//! Measures: device-to-device copy bandwidth (bytes read + written), the bf16 GEMM rate at
//! 8192^3, each elementwise / norm kernel's bandwidth as a fraction of copy, attention time,
//! then for random models of two shapes (LLaMA-7B at 16 x 512, SmolLM2-135M at 16 x 64): the
//! forward in model TFLOP/s as a fraction of the GEMM rate, the LM head + loss, and one ZO step
//! of each memory-lean method in each perturb mode as a multiple of the forward's time and
//! peak memory. `--quick` shrinks every shape (a smoke run); `--tiny` shrinks them to toy
//! sizes, for running every path of this benchmark on the kernel emulator
//! (`ZOFT_CUDA_EMULATOR=1`), where its timings mean nothing.

#[path = "bench/common.rs"]
mod common;

use anyhow::Result;
use common::NextTokenLoss;
use serde_json::json;
use zoft::backend::cuda::{
    cuda_available, driver_version, CudaBackend, CudaFusedHook, GemmArgs, PhiloxKey,
};
use zoft::backend::mem::Tag;
use zoft::backend::{AttnShape, Backend, NoHook, SeqLayout};
use zoft::model::{DType, Llama, LlamaConfig};
use zoft::zo::{Method, Perturb, ZoConfig, ZoOptimizer};

fn key(tensor: u32) -> PhiloxKey {
    PhiloxKey {
        seed: 1234,
        step: 0,
        tensor,
    }
}

/// Mean milliseconds per call of `f` over `iters` calls, after one warm-up call.
fn time(g: &CudaBackend, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    g.synchronize()?;
    let ms = g.time_ms(|| {
        for _ in 0..iters {
            f()?;
        }
        Ok(())
    })?;
    Ok(ms as f64 / iters as f64)
}

/// Kernels and cuBLAS GEMMs that one call of `f` issues.
fn launches(g: &CudaBackend, f: impl FnOnce() -> Result<()>) -> Result<(u64, u64)> {
    let (k0, m0) = g.launch_counts();
    f()?;
    let (k1, m1) = g.launch_counts();
    Ok((k1 - k0, m1 - m0))
}

fn emit(v: serde_json::Value) {
    println!("{v}");
}

fn llama7b() -> LlamaConfig {
    serde_json::from_value(json!({
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5
    }))
    .expect("a valid config")
}

/// A toy LLaMA (GQA, 2 layers) standing in for both model shapes under `--tiny`.
fn toy() -> LlamaConfig {
    serde_json::from_value(json!({
        "hidden_size": 128,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 384,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5
    }))
    .expect("a valid config")
}

/// How big the shapes are: the real ones, `--quick`'s smaller ones or `--tiny`'s toys.
#[derive(Clone, Copy, PartialEq)]
enum Size {
    Full,
    Quick,
    Tiny,
}

impl Size {
    fn pick<T>(self, full: T, quick: T, tiny: T) -> T {
        match self {
            Size::Full => full,
            Size::Quick => quick,
            Size::Tiny => tiny,
        }
    }
}

fn main() -> Result<()> {
    let has = |flag: &str| std::env::args().any(|a| a == flag);
    let size = match (has("--tiny"), has("--quick")) {
        (true, _) => Size::Tiny,
        (_, true) => Size::Quick,
        _ => Size::Full,
    };
    let (quick, tiny) = (size != Size::Full, size == Size::Tiny);
    if let Err(reason) = cuda_available() {
        emit(json!({"bench": "skipped", "reason": reason}));
        return Ok(());
    }
    let g = CudaBackend::new(0)?;
    let (free, total) = g.mem_info()?;
    let drv = driver_version()
        .map(|(a, b)| format!("{a}.{b}"))
        .unwrap_or_default();
    emit(json!({
        "bench": "device", "name": g.device_name(), "compute_capability": format!("{}.{}", g.compute_capability().0, g.compute_capability().1),
        "driver_cuda": drv, "free_bytes": free, "total_bytes": total, "quick": quick, "tiny": tiny
    }));
    let iters = size.pick(20, 3, 1);

    // Device-to-device copy: bytes read + written per second.
    let copy_bytes: usize = size.pick(1 << 30, 64 << 20, 1 << 20);
    let src = g.alloc_buf(copy_bytes, Tag::Scratch, "copy source")?;
    let mut dst = g.alloc_buf(copy_bytes, Tag::Scratch, "copy destination")?;
    let ms = time(&g, iters, || g.copy_buf(&src, &mut dst, copy_bytes))?;
    let copy_gbs = 2.0 * copy_bytes as f64 / (ms * 1e-3) / 1e9;
    emit(json!({"bench": "copy_d2d", "bytes": copy_bytes, "ms": ms, "GB_per_s": copy_gbs}));
    drop((src, dst));

    // bf16 GEMM, f32 accumulate and output (what every linear runs).
    let s = size.pick(8192, 2048, 256);
    let mut a = g.alloc_buf(s * s * 2, Tag::Scratch, "gemm A")?;
    let mut b = g.alloc_buf(s * s * 2, Tag::Scratch, "gemm B")?;
    let c = g.alloc_buf(s * s * 4, Tag::Scratch, "gemm C")?;
    g.fill_normal(&mut a, DType::BF16, s * s, key(1), 0, 1.0, 0.0)?;
    g.fill_normal(&mut b, DType::BF16, s * s, key(2), 0, 0.02, 0.0)?;
    let args = GemmArgs {
        m: s,
        n: s,
        k: s,
        x: a.ptr(),
        w: b.ptr(),
        in_dtype: DType::BF16,
        out: c.ptr(),
        out_dtype: DType::F32,
        alpha: 1.0,
        beta: 0.0,
    };
    // SAFETY: the three buffers are sized for s x s.
    let ms = time(&g, iters, || unsafe { g.gemm_raw(&args) })?;
    let gemm_tflops = 2.0 * (s as f64).powi(3) / (ms * 1e-3) / 1e12;
    emit(
        json!({"bench": "gemm_bf16_f32out", "m": s, "n": s, "k": s, "ms": ms, "TFLOP_per_s": gemm_tflops}),
    );
    drop((a, b, c));

    // Elementwise and norm kernels at the LLaMA-7B 16 x 512 shapes.
    let cfg = if tiny { toy() } else { llama7b() };
    let (batch, seq) = size.pick((16, 512), (4, 128), (2, 32));
    let rows = batch * seq;
    let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
    let bw = |name: &str, bytes: f64, ms: f64| {
        let gbs = bytes / (ms * 1e-3) / 1e9;
        emit(
            json!({"bench": name, "rows": rows, "ms": ms, "GB_per_s": gbs, "fraction_of_copy": gbs / copy_gbs}),
        );
    };
    let act = |r: usize, c: usize, t: u32| -> Result<_> {
        let mut x = g.alloc(r, c, Tag::Activations)?;
        g.fill_act_normal(&mut x, key(t), 1.0)?;
        Ok(x)
    };
    let norm_w = g.random_weights(
        &serde_json::from_value(json!({
            "hidden_size": d, "intermediate_size": f, "num_hidden_layers": 1,
            "num_attention_heads": cfg.num_attention_heads, "vocab_size": 256
        }))?,
        5,
        DType::BF16,
    )?;
    let x = act(rows, d, 10)?;
    let delta = act(rows, d, 11)?;
    let mut out = act(rows, d, 12)?;
    let w = &norm_w.layers[0].attn_norm;
    let ms = time(&g, iters, || g.rmsnorm(&x, w, 1e-5, &mut out))?;
    bw("rmsnorm", (rows * d * 8) as f64, ms);
    let mut resid = act(rows, d, 13)?;
    let ms = time(&g, iters, || {
        g.add_rmsnorm(&mut resid, &delta, w, 1e-5, &mut out)
    })?;
    bw("add_rmsnorm", (rows * d * 16) as f64, ms);
    let mut gate = act(rows, f, 14)?;
    let up = act(rows, f, 15)?;
    let ms = time(&g, iters, || g.swiglu(&mut gate, &up))?;
    bw("swiglu", (rows * f * 12) as f64, ms);
    let layout = SeqLayout::full(batch, seq, &vec![seq; batch]);
    let inv: Vec<f32> = cfg.rope_inv_freq().iter().map(|v| *v as f32).collect();
    let mut q = act(rows, d, 16)?;
    let ms = time(&g, iters, || {
        g.rope(&mut q, cfg.num_attention_heads, &layout, &inv)
    })?;
    bw("rope", (rows * d * 8) as f64, ms);
    let ids: Vec<u32> = (0..rows as u32).map(|i| (i * 7919) % 256).collect();
    let ms = time(&g, iters, || g.embed(&norm_w.embed, &ids, &mut out))?;
    bw("embed_bf16", (rows * d * 6) as f64, ms);
    let mut wmat = g.random_weights(
        &serde_json::from_value(json!({
            "hidden_size": d, "intermediate_size": f, "num_hidden_layers": 1,
            "num_attention_heads": cfg.num_attention_heads, "vocab_size": 256
        }))?,
        6,
        DType::BF16,
    )?;
    let wg = &mut wmat.layers[0].w_gate;
    let n = wg.numel();
    let ms = time(&g, iters, || g.axpy_normal(wg, key(20), 1e-3))?;
    emit(json!({"bench": "axpy_normal_bf16", "elements": n, "ms": ms,
        "GB_per_s": (n * 4) as f64 / (ms * 1e-3) / 1e9,
        "fraction_of_copy": (n * 4) as f64 / (ms * 1e-3) / 1e9 / copy_gbs}));
    // The passes move each Philox block's eight elements in one 16-byte access where the
    // address allows it. From stream element 1 no block starts on a 16-byte boundary, so the
    // same pass runs element by element: the ratio is what the vector accesses buy.
    let mut wbuf = g.alloc_buf(n * 2, Tag::Scratch, "pass access")?;
    g.fill_normal(&mut wbuf, DType::BF16, n, key(22), 0, 0.02, 0.0)?;
    let mut access_ms = [0.0; 2];
    for (ms, start) in access_ms.iter_mut().zip([0, 1]) {
        *ms = time(&g, iters, || {
            g.axpy_normal_buf(&mut wbuf, DType::BF16, n, key(23), start, 1e-3)
        })?;
    }
    emit(
        json!({"bench": "pass_access_bf16", "elements": n, "vector_ms": access_ms[0],
        "element_ms": access_ms[1], "element_over_vector": access_ms[1] / access_ms[0]}),
    );
    drop(wbuf);
    drop((x, delta, out, resid, gate, up, wmat, norm_w));

    // Attention at the same shape.
    let shape = AttnShape {
        n_heads: cfg.num_attention_heads,
        n_kv_heads: cfg.n_kv_heads(),
        head_dim: cfg.head_dim(),
    };
    let k = act(rows, cfg.kv_dim(), 17)?;
    let v = act(rows, cfg.kv_dim(), 18)?;
    let mut ao = act(rows, d, 19)?;
    let ms = time(&g, iters.min(10), || {
        g.attention(&q, &k, &v, shape, &layout, &mut ao)
    })?;
    let att_flops =
        4.0 * (batch * shape.n_heads * shape.head_dim) as f64 * (seq * (seq + 1) / 2) as f64;
    emit(
        json!({"bench": "attention", "batch": batch, "seq": seq, "heads": shape.n_heads,
        "head_dim": shape.head_dim, "ms": ms, "TFLOP_per_s": att_flops / (ms * 1e-3) / 1e12}),
    );
    drop((q, k, v, ao, layout));

    // The models: a LLaMA-7B shape at the attention benchmark's batch, then the default model's
    // shape (SmolLM2-135M) at the CPU benchmark's 16 x 64, where launches dominate.
    let mut cfg = if tiny { toy() } else { llama7b() };
    if quick {
        cfg.num_hidden_layers = 2;
    }
    model_rows(&g, "llama-7b", &cfg, batch, seq, quick, gemm_tflops)?;
    let mut small = if tiny { toy() } else { smollm2_135m() };
    if quick {
        small.num_hidden_layers = 2;
    }
    let (batch, seq) = size.pick((16, 64), (16, 64), (2, 16));
    model_rows(&g, "smollm2-135m", &small, batch, seq, quick, gemm_tflops)?;
    Ok(())
}

fn smollm2_135m() -> LlamaConfig {
    serde_json::from_value(json!({
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": true
    }))
    .expect("a valid config")
}

/// The forward of a random model of `cfg`'s shape (bf16 weights) at batch x seq, loss over
/// every position, as model TFLOP/s and a fraction of the GEMM rate; the LM head and loss
/// alone; then one ZO step of each memory-lean method in each perturb mode, as multiples of
/// the forward's time and peak memory.
fn model_rows(
    g: &CudaBackend,
    shape_name: &str,
    cfg: &LlamaConfig,
    batch: usize,
    seq: usize,
    quick: bool,
    gemm_tflops: f64,
) -> Result<()> {
    let rows = batch * seq;
    let weights = g.random_weights(cfg, 42, DType::BF16)?;
    let model = Llama::new(cfg.clone(), weights, g.clone());
    let ids: Vec<u32> = (0..rows as u64)
        .map(|i| ((i * 2_654_435_761) % cfg.vocab_size as u64) as u32)
        .collect();
    let mut objective = NextTokenLoss::new(ids, batch, seq);
    let (ids, layout, targets) = (&objective.ids, &objective.layout, &objective.targets);
    g.mem().reset_peaks();
    let fwd_iters = if quick { 2 } else { 5 };
    let ms = time(g, fwd_iters, || {
        model
            .target_logprobs(ids, layout, targets, &mut NoHook)
            .map(|_| ())
    })?;
    let (fwd_ms, fwd_peak) = (ms, g.mem().report().total_peak);
    let (fwd_kernels, fwd_gemms) = launches(g, || {
        model
            .target_logprobs(ids, layout, targets, &mut NoHook)
            .map(|_| ())
    })?;
    let (dd, l) = (cfg.hidden_size as f64, cfg.num_hidden_layers as f64);
    let per_layer =
        2.0 * dd * (cfg.q_dim() + cfg.kv_dim()) as f64 + 3.0 * dd * cfg.intermediate_size as f64;
    let tokens = rows as f64;
    let att_flops = 4.0
        * (batch * cfg.num_attention_heads * cfg.head_dim()) as f64
        * (seq * (seq + 1) / 2) as f64;
    let flops = 2.0 * tokens * (l * per_layer + cfg.vocab_size as f64 * dd) + l * att_flops;
    let tflops = flops / (ms * 1e-3) / 1e12;
    emit(
        json!({"bench": "forward", "shape": shape_name, "batch": batch, "seq": seq,
        "layers": cfg.num_hidden_layers, "ms": ms, "model_TFLOP_per_s": tflops,
        "fraction_of_gemm": tflops / gemm_tflops, "peak_bytes": fwd_peak,
        "kernels": fwd_kernels, "gemms": fwd_gemms}),
    );
    let mut h = g.alloc(rows, cfg.hidden_size, Tag::Activations)?;
    g.fill_act_normal(&mut h, key(21), 1.0)?;
    let ms = time(g, 3, || {
        g.target_logprobs(&h, model.weights.lm_head(), targets)
            .map(|_| ())
    })?;
    emit(
        json!({"bench": "lm_head_loss", "shape": shape_name, "rows": rows,
        "vocab": cfg.vocab_size, "ms": ms,
        "TFLOP_per_s": 2.0 * tokens * cfg.vocab_size as f64 * dd / (ms * 1e-3) / 1e12}),
    );
    drop(h);

    // ZO steps. In place: two forwards plus three passes over the weights (+eps z, -2 eps z,
    // restore and update). Fused: two forwards whose linears perturb a copy of their weight (or
    // add a low-rank side product), plus the update pass. Paired: the fused forwards in
    // lockstep, each matrix's z drawn once for both. The floor is 2.0x the forward; the memory
    // goal is the forward's peak.
    let mut model = model;
    for perturb in [Perturb::Inplace, Perturb::Fused, Perturb::Paired] {
        for method in [
            Method::Mezo,
            Method::SparseMezo,
            Method::Tezo,
            Method::TezoAdam,
        ] {
            let zc = ZoConfig {
                method,
                perturb,
                lr: 1e-6,
                ..Default::default()
            };
            if zc.validate().is_err() {
                continue; // a combination zoft refuses (Sparse-MeZO in place)
            }
            let mut opt = ZoOptimizer::new(zc, &model)?;
            g.mem().reset_peaks();
            let mut step = 0u64;
            let ms = time(g, fwd_iters, || {
                let r = opt.step_objective(&mut model, step, &mut objective);
                step += 1;
                r.map(|_| ())
            })?;
            // Device moments are in the tracked peak already (optimizer tag).
            let peak = g.mem().report().total_peak;
            let (kernels, gemms) = launches(g, || {
                opt.step_objective(&mut model, step, &mut objective)
                    .map(|_| ())
            })?;
            emit(
                json!({"bench": "zo_step", "shape": shape_name, "batch": batch, "seq": seq,
                "method": method.name(), "perturb": format!("{perturb:?}").to_lowercase(),
                "ms": ms, "step_over_forward": ms / fwd_ms,
                "peak_over_forward": peak as f64 / fwd_peak as f64,
                "kernels": kernels, "gemms": gemms,
                "launches_over_forward": (kernels + gemms) as f64 / (fwd_kernels + fwd_gemms) as f64,
                "optimizer_state_bytes": opt.method.state_bytes()}),
            );
        }
    }
    tezo_fused_forwards(
        g,
        shape_name,
        &mut model,
        &mut objective,
        (fwd_ms, fwd_peak),
    )
}

/// TeZO's fused forward two ways, after a step has left a virtual update: each layer's
/// matrices as perturbed copies (what `--perturb fused` does on the GPU) and as the stored
/// weights plus side products, as multiples of the plain forward's time and peak memory.
fn tezo_fused_forwards(
    g: &CudaBackend,
    shape_name: &str,
    model: &mut Llama<CudaBackend>,
    objective: &mut NextTokenLoss,
    (fwd_ms, fwd_peak): (f64, usize),
) -> Result<()> {
    let zc = ZoConfig {
        method: Method::Tezo,
        perturb: Perturb::Fused,
        lr: 1e-6,
        ..Default::default()
    };
    let mut opt = ZoOptimizer::new(zc, model)?;
    // The update stays virtual: the stored weights do not change.
    opt.step_objective(model, 0, objective)?;
    let (key, eps) = (opt.key(1), opt.cfg.eps);
    let model = &*model;
    let (ids, layout, targets) = (&objective.ids, &objective.layout, &objective.targets);
    for side_products in [false, true] {
        let hook = || {
            let h = CudaFusedHook::new(&opt, key, eps).with_layers(&model.weights);
            if side_products {
                h.with_low_rank_side_products()
            } else {
                h
            }
        };
        let forward = || {
            model
                .target_logprobs(ids, layout, targets, &mut hook())
                .map(|_| ())
        };
        g.mem().reset_peaks();
        let ms = time(g, 3, forward)?;
        let peak = g.mem().report().total_peak;
        let (kernels, gemms) = launches(g, forward)?;
        emit(json!({"bench": "tezo_fused_forward", "shape": shape_name,
            "low_rank_z": if side_products { "side products" } else { "copies" },
            "ms": ms, "over_forward": ms / fwd_ms,
            "peak_over_forward": peak as f64 / fwd_peak as f64,
            "kernels": kernels, "gemms": gemms}));
    }
    Ok(())
}
