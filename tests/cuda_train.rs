//! The trainer on the CUDA backend (the GPU, or the kernel emulator where there is none), on a
//! tiny random model and the synthetic task of tests/train.rs: a run interrupted at a checkpoint
//! and resumed on the device ends on the same bits as the uninterrupted run, the checkpoint
//! holds the device's weights, and training moves them; a bf16 model's checkpoint says bf16.
#![cfg(feature = "cuda")]

mod common;
use common::*;
use std::path::Path;
use zoft::backend::cuda::CudaBackend;
use zoft::model::{DType, Llama, LlamaConfig, LlamaWeights};
use zoft::train::load_train_state;

fn on_device(g: &CudaBackend, cfg: &LlamaConfig, w: &LlamaWeights) -> Llama<CudaBackend> {
    Llama::new(
        cfg.clone(),
        g.upload_weights(w, DType::F32).unwrap(),
        g.clone(),
    )
}

fn file_bytes(dir: &Path, cfg: &LlamaConfig) -> Vec<Vec<u8>> {
    let w = LlamaWeights::load(dir, cfg).unwrap();
    w.tensors().iter().map(|t| t.bytes().to_vec()).collect()
}

#[test]
fn device_runs_resume_bit_for_bit_and_checkpoint_the_device_weights() {
    let Some(g) = cuda_or_emulator() else { return };
    let cfg = tiny_config();
    let t = synthetic_task(&cfg);
    let start = LlamaWeights::random(&cfg, 4, DType::F32);
    for (method, perturb) in RESUME_CASES {
        let name = format!("cuda-{}-{perturb:?}", method.name());
        let run = |m: &mut Llama<CudaBackend>, src: &Path, steps, save, out: &Path, resume| {
            let opts = train_options(method, perturb, steps, save, out);
            train_quietly(m, src, &t, &opts, resume).unwrap();
        };
        // Uninterrupted: 6 steps, checkpoint at 3.
        let a_dir = scratch_dir(&format!("{name}-a"));
        let mut a = on_device(&g, &cfg, &start);
        run(&mut a, &a_dir, 6, 3, &a_dir, None);
        // Interrupted after 3, then resumed on the device from the checkpoint to 6.
        let b_dir = scratch_dir(&format!("{name}-b"));
        let mut b = on_device(&g, &cfg, &start);
        run(&mut b, &b_dir, 3, 0, &b_dir, None);
        let ckpt = b_dir.join("checkpoint");
        let state = load_train_state(&ckpt).unwrap();
        assert_eq!(state.0.step, 3);
        let mut b2 = on_device(&g, &cfg, &LlamaWeights::load(&ckpt, &cfg).unwrap());
        run(&mut b2, &ckpt, 6, 0, &b_dir, Some(state));

        let final_a = device_bytes(&g, &a);
        assert!(
            final_a == device_bytes(&g, &b2),
            "{name}: the resumed run differs from the uninterrupted one"
        );
        let moved = final_a
            .iter()
            .zip(start.tensors())
            .any(|(x, s)| x[..] != *s.bytes());
        assert!(moved, "{name}: the weights did not move");
        assert!(
            file_bytes(&a_dir.join("checkpoint"), &cfg) == final_a,
            "{name}: the final checkpoint differs from the device's weights"
        );
    }
}

/// A model whose matrices are bf16 on the device is checkpointed so, and config.json says so (its
/// source config said float32), so that HF transformers' dtype="auto" loads it as written.
#[test]
fn device_checkpoint_config_names_the_device_dtype() {
    let Some(g) = cuda_or_emulator() else { return };
    let mut cfg = tiny_config();
    cfg.torch_dtype = Some("float32".into());
    let t = synthetic_task(&cfg);
    let dir = scratch_dir("cuda-bf16-checkpoint");
    let w = LlamaWeights::random(&cfg, 4, DType::F32);
    let mut m = Llama::new(
        cfg.clone(),
        g.upload_weights(&w, DType::BF16).unwrap(),
        g.clone(),
    );
    let opts = train_options(zoft::zo::Method::Mezo, zoft::zo::Perturb::Fused, 2, 0, &dir);
    train_quietly(&mut m, &dir, &t, &opts, None).unwrap();
    let ckpt = dir.join("checkpoint");
    let written = LlamaConfig::from_file(&ckpt.join("config.json")).unwrap();
    assert_eq!(written.torch_dtype.as_deref(), Some("bfloat16"));
    let files = zoft::model::safetensors_io::load_file(&ckpt.join("model.safetensors")).unwrap();
    // The matrices are bf16; the norm gains stay f32 on the device (dtype="auto" casts them).
    for (name, tensor) in files.iter().filter(|(_, t)| t.shape.len() == 2) {
        assert_eq!(tensor.dtype, DType::BF16, "{name}");
    }
}
