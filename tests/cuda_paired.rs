//! `--perturb paired` on the CUDA backend (the GPU, or the kernel emulator where there is
//! none): its steps give the fused mode's losses and weights bit for bit, its hook gives what a
//! fused hook per sign gives through the target and the logits paths, and the second stream's
//! copies of a group live in device scratch that the hook gives back.
#![cfg(feature = "cuda")]

mod common;
use common::*;
use zoft::backend::cuda::{CudaFusedHook, CudaPairedHook};
use zoft::backend::mem::Tag;
use zoft::backend::NoHook;
use zoft::model::{DType, Llama};
use zoft::zo::{Method, Perturb, ZoOptimizer};

#[test]
fn cuda_paired_steps_equal_fused_steps_bit_for_bit() {
    let Some(g) = cuda_or_emulator() else { return };
    for tied in [false, true] {
        let cfg = small_config(tied);
        let bt = batch(&cfg, 5);
        for method in [
            Method::Mezo,
            Method::MezoAdam,
            Method::SparseMezo,
            Method::Tezo,
        ] {
            for dtype in [DType::F32, DType::BF16] {
                let what = format!("{method:?} {dtype:?} tied={tied}");
                let model = || {
                    let w = g.random_weights(&cfg, 11, dtype).unwrap();
                    Llama::new(cfg.clone(), w, g.clone())
                };
                let (mut fused_m, mut paired_m) = (model(), model());
                let start = device_bytes(&g, &fused_m);
                let mut fused =
                    ZoOptimizer::new(paired_zo_config(method, Perturb::Fused), &fused_m).unwrap();
                let mut paired =
                    ZoOptimizer::new(paired_zo_config(method, Perturb::Paired), &paired_m).unwrap();
                let mut objective = NextToken {
                    bt: &bt,
                    paired_calls: 0,
                };
                for s in 0..2 {
                    let f = fused
                        .step_objective(
                            &mut fused_m,
                            s,
                            &mut NextToken {
                                bt: &bt,
                                paired_calls: 0,
                            },
                        )
                        .unwrap();
                    let p = paired
                        .step_objective(&mut paired_m, s, &mut objective)
                        .unwrap();
                    assert_eq!(
                        step_bits(&p),
                        step_bits(&f),
                        "{what} step {s}: {p:?} vs fused {f:?}"
                    );
                    assert_ne!(f.loss_plus, f.loss_minus, "{what}: no perturbation seen");
                }
                // The CUDA backend has a paired hook: no step fell back to two forwards.
                assert_eq!(objective.paired_calls, 2, "{what}: paired forwards run");
                fused.materialize(&mut fused_m).unwrap();
                paired.materialize(&mut paired_m).unwrap();
                let after = device_bytes(&g, &fused_m);
                assert!(after != start, "{what}: the updates moved nothing");
                assert!(
                    device_bytes(&g, &paired_m) == after,
                    "{what}: paired weights differ"
                );
            }
        }
    }
}

/// The paired hook against a fused hook per sign, with the LM head 64 vocabulary rows at a
/// time (the last block short), through the target path and the logits path; the held copies
/// are device scratch, given back with the hook.
#[test]
fn cuda_paired_hook_sees_what_a_fused_hook_per_sign_sees() {
    let Some(g) = cuda_or_emulator() else { return };
    for tied in [false, true] {
        let cfg = small_config(tied);
        let bt = batch(&cfg, 7);
        let requests: Vec<(u32, u32)> = vec![(0, 3), (0, 40), (4, 7), (11, 260), (11, 2)];
        for method in [Method::Mezo, Method::SparseMezo, Method::Tezo] {
            for dtype in [DType::F32, DType::BF16] {
                let what = format!("{method:?} {dtype:?} tied={tied}");
                let w = g.random_weights(&cfg, 2, dtype).unwrap();
                let m = Llama::new(cfg.clone(), w, g.clone());
                let opt = ZoOptimizer::new(paired_zo_config(method, Perturb::Paired), &m).unwrap();
                let (key, eps) = (opt.key(4), 5e-2);
                // A fused hook per sign first (which also makes whatever the backend keeps).
                g.mem().reset_peaks();
                let mut want = vec![];
                for s in [1.0, -1.0] {
                    let mut fused = CudaFusedHook::new(&opt, key, s * eps).with_head_block_rows(64);
                    let t = m
                        .target_logprobs(&bt.ids, &bt.layout, &bt.targets, &mut fused)
                        .unwrap();
                    let r = m
                        .request_logprobs(&bt.ids, &bt.layout, &requests, &mut fused)
                        .unwrap();
                    want.push((s, t, r));
                }
                let fused_peak = g.mem().peak(Tag::Scratch);
                let scratch_before = g.mem().current(Tag::Scratch);
                g.mem().reset_peaks();
                let mut paired = CudaPairedHook::new(&opt, key, eps).with_head_block_rows(64);
                let [tp, tm] = m
                    .target_logprobs_paired(&bt.ids, &bt.layout, &bt.targets, &mut paired)
                    .unwrap();
                let [rp, rm] = m
                    .request_logprobs_paired(&bt.ids, &bt.layout, &requests, &mut paired)
                    .unwrap();
                drop(paired);
                let paired_peak = g.mem().peak(Tag::Scratch);
                assert_eq!(
                    g.mem().current(Tag::Scratch),
                    scratch_before,
                    "{what}: the held copies were not given back"
                );
                let same = |a: &[f32], b: &[f32]| {
                    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
                };
                for ((s, want_t, want_r), (t, r)) in want.iter().zip([(&tp, &rp), (&tm, &rm)]) {
                    assert!(same(t, want_t), "{what} sign {s}: target log-probs differ");
                    assert!(same(r, want_r), "{what} sign {s}: request log-probs differ");
                }
                // On top of what a fused forward holds: the held copies of the MLP (three
                // matrices of 160 x 64), one attention matrix (64 x 64) left spare beside
                // them, and the second stream's own block of head rows (64 x 64). TeZO's
                // streams each copy their matrices (low-rank z) into scratch of their own:
                // the second stream's copy of the largest one.
                let extra = if method == Method::Tezo {
                    160 * 64 * dtype.size()
                } else {
                    (3 * 160 * 64 + 64 * 64 + 64 * 64) * dtype.size()
                };
                assert!(
                    paired_peak <= fused_peak + extra,
                    "{what}: paired scratch peak {paired_peak} against fused {fused_peak}"
                );
                // The two streams really were perturbed, in opposite directions.
                let plain = m
                    .target_logprobs(&bt.ids, &bt.layout, &bt.targets, &mut NoHook)
                    .unwrap();
                assert!(tp != plain && tm != plain && tp != tm, "{what}");
            }
        }
    }
}
