//! `--perturb paired`: the step's two forwards in lockstep, z's normals drawn once for both.
//! It must give the fused mode's losses and weights bit for bit (through the target path, the
//! logits path and a head seen in blocks), fall back to two forwards for an objective without a
//! paired form, and hold at most one layer's normals at a time.

mod common;
use common::*;
use zoft::backend::cpu::{CpuBackend, Matmul};
use zoft::backend::mem::Tag;
use zoft::backend::LinearHook;
use zoft::model::{DType, HostTensor, Llama, LlamaConfig, LlamaWeights};
use zoft::zo::hook::FusedHook;
use zoft::zo::paired::PairedFusedHook;
use zoft::zo::{Method, Perturb, ZoOptimizer};

const METHODS: [Method; 5] = [
    Method::Mezo,
    Method::MezoAdam,
    Method::SparseMezo,
    Method::Tezo,
    Method::TezoAdam,
];

#[test]
fn paired_steps_equal_fused_steps_bit_for_bit() {
    for tied in [false, true] {
        let mut cfg = tiny_config();
        cfg.tie_word_embeddings = tied;
        let bt = batch(&cfg, 5);
        for method in METHODS {
            for dtype in [DType::F32, DType::BF16] {
                let model = || {
                    let w = LlamaWeights::random(&cfg, 11, dtype);
                    Llama::new(cfg.clone(), w, CpuBackend::new())
                };
                let what = format!("{method:?} {dtype:?} tied={tied}");
                let (mut fused_m, mut paired_m, mut closure_m) = (model(), model(), model());
                let mut fused =
                    ZoOptimizer::new(paired_zo_config(method, Perturb::Fused), &fused_m).unwrap();
                let mut paired =
                    ZoOptimizer::new(paired_zo_config(method, Perturb::Paired), &paired_m).unwrap();
                let mut closure =
                    ZoOptimizer::new(paired_zo_config(method, Perturb::Paired), &closure_m)
                        .unwrap();
                let start = snapshot(&fused_m);
                let mut objective = NextToken {
                    bt: &bt,
                    paired_calls: 0,
                };
                for s in 0..3 {
                    let f = fused
                        .step(&mut fused_m, s, &mut |m, h| Ok(loss_of(m, &bt, h)))
                        .unwrap();
                    let p = paired
                        .step_objective(&mut paired_m, s, &mut objective)
                        .unwrap();
                    // A closure has no paired form: the paired mode runs two fused forwards.
                    let c = closure
                        .step(&mut closure_m, s, &mut |m, h| Ok(loss_of(m, &bt, h)))
                        .unwrap();
                    assert_eq!(
                        step_bits(&p),
                        step_bits(&f),
                        "{what} step {s}: {p:?} vs fused {f:?}"
                    );
                    assert_eq!(
                        step_bits(&c),
                        step_bits(&f),
                        "{what} step {s}: closure {c:?}"
                    );
                    assert_ne!(f.loss_plus, f.loss_minus, "{what}: no perturbation seen");
                }
                assert_eq!(objective.paired_calls, 3, "{what}: paired forwards run");
                // TeZO keeps its update virtual in both modes: write it before comparing.
                for (opt, m) in [
                    (&mut fused, &mut fused_m),
                    (&mut paired, &mut paired_m),
                    (&mut closure, &mut closure_m),
                ] {
                    opt.materialize(m).unwrap();
                }
                let after = snapshot(&fused_m);
                assert!(after != start, "{what}: the updates moved nothing");
                assert!(
                    snapshot(&paired_m) == after,
                    "{what}: paired weights differ"
                );
                assert!(
                    snapshot(&closure_m) == after,
                    "{what}: fallback weights differ"
                );
            }
        }
    }
}

/// The paired hook against a fused hook per sign, with the LM head 16 vocabulary rows at a
/// time (the last block short), through the target path and the logits path (several
/// candidates scored at one row).
#[test]
fn paired_hook_sees_what_a_fused_hook_per_sign_sees_through_head_blocks() {
    for tied in [false, true] {
        let mut cfg = tiny_config();
        cfg.tie_word_embeddings = tied;
        let bt = batch(&cfg, 7);
        let requests: Vec<(u32, u32)> = [(0, 3), (0, 40), (4, 7), (11, 60), (11, 2), (17, 9)]
            .into_iter()
            .collect();
        for method in [Method::Mezo, Method::SparseMezo, Method::Tezo] {
            let m = Llama::new(
                cfg.clone(),
                LlamaWeights::random(&cfg, 2, DType::F32),
                CpuBackend::new(),
            );
            let opt = ZoOptimizer::new(paired_zo_config(method, Perturb::Paired), &m).unwrap();
            let (key, eps) = (opt.key(4), 5e-2);
            let what = format!("{method:?} tied={tied}");
            let mut paired =
                PairedFusedHook::new(&opt, key, eps, &m.backend).with_head_block_rows(16);
            let sign =
                |s: f32| FusedHook::new(&opt, key, s * eps, &m.backend).with_head_block_rows(16);
            let [tp, tm] = m
                .target_logprobs_paired(&bt.ids, &bt.layout, &bt.targets, &mut paired)
                .unwrap();
            let [rp, rm] = m
                .request_logprobs_paired(&bt.ids, &bt.layout, &requests, &mut paired)
                .unwrap();
            for (s, t, r) in [(1.0, tp, rp), (-1.0, tm, rm)] {
                let mut fused = sign(s);
                let want_t = m
                    .target_logprobs(&bt.ids, &bt.layout, &bt.targets, &mut fused)
                    .unwrap();
                let want_r = m
                    .request_logprobs(&bt.ids, &bt.layout, &requests, &mut fused)
                    .unwrap();
                let same =
                    |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(
                    same(&t, &want_t),
                    "{what} sign {s}: target log-probs differ"
                );
                assert!(
                    same(&r, &want_r),
                    "{what} sign {s}: request log-probs differ"
                );
            }
            // The two streams really were perturbed in opposite directions.
            let unperturbed = m
                .target_logprobs(&bt.ids, &bt.layout, &bt.targets, &mut zoft::backend::NoHook)
                .unwrap();
            let [tp, tm] = m
                .target_logprobs_paired(&bt.ids, &bt.layout, &bt.targets, &mut paired)
                .unwrap();
            assert!(tp != unperturbed && tm != unperturbed && tp != tm, "{what}");
        }
    }
}

/// Floats in one layer's matrices, the most second-stream weights a paired forward may hold
/// besides a block of head rows.
fn layer_matrix_floats(cfg: &LlamaConfig) -> usize {
    let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
    2 * cfg.q_dim() * d + 2 * cfg.kv_dim() * d + 3 * f * d
}

#[test]
fn a_paired_step_holds_one_layer_of_weights_for_its_second_stream_and_gives_them_back() {
    let mut cfg = tiny_config();
    cfg.num_hidden_layers = 4;
    let bt = batch(&cfg, 3);
    let mut peaks = vec![];
    for perturb in [Perturb::Fused, Perturb::Paired] {
        let mut m = tiny_model(&cfg, 6);
        let mem = m.backend.mem.clone();
        let mut opt = ZoOptimizer::new(paired_zo_config(Method::Mezo, perturb), &m).unwrap();
        let before = mem.current(Tag::Scratch);
        mem.reset_peaks();
        let mut objective = NextToken {
            bt: &bt,
            paired_calls: 0,
        };
        opt.step_objective(&mut m, 0, &mut objective).unwrap();
        assert_eq!(
            mem.current(Tag::Scratch),
            before,
            "{perturb:?}: scratch left held"
        );
        peaks.push(mem.peak(Tag::Scratch));
    }
    let extra = peaks[1] - peaks[0];
    // All the model's matrices would be 4 layers' worth plus embedding and head.
    let bound = 4 * (layer_matrix_floats(&cfg) + cfg.vocab_size * cfg.hidden_size);
    assert!(
        extra > 0 && extra <= bound,
        "the paired step's scratch peak is {extra} bytes above the fused one's (bound {bound})"
    );
}

/// The trainer through `BatchLoss` (classification: two candidates per row, the logits path)
/// with `--perturb paired` logs the fused run's losses and ends at its weights.
#[test]
fn paired_training_equals_fused_training() {
    let cfg = tiny_config();
    let task = synthetic_task(&cfg);
    for method in [Method::Mezo, Method::SparseMezo, Method::TezoAdam] {
        let mut runs = vec![];
        for perturb in [Perturb::Fused, Perturb::Paired] {
            let dir = scratch_dir(&format!("paired-{}-{perturb:?}", method.name()));
            let mut m = tiny_model(&cfg, 4);
            let opts = train_options(method, perturb, 4, 0, &dir);
            train_quietly(&mut m, &dir, &task, &opts, None).unwrap();
            runs.push((logged_losses(&dir.join("train_log.jsonl")), snapshot(&m)));
        }
        assert_eq!(runs[0].0, runs[1].0, "{method:?}: logged losses differ");
        assert!(runs[0].1 == runs[1].1, "{method:?}: final weights differ");
    }
}

/// A fused hook's perturbation with every parameter use going through the whole perturbed
/// copy of its tensor (`param`, then the plain operation): the path of the f32 GEMM.
struct WholeCopies<H>(H);

impl<H: LinearHook<CpuBackend>> LinearHook<CpuBackend> for WholeCopies<H> {
    fn param<'a>(
        &'a mut self,
        b: &CpuBackend,
        w: &'a HostTensor,
        id: usize,
    ) -> anyhow::Result<&'a HostTensor> {
        self.0.param(b, w, id)
    }
}

/// With bf16 GEMMs the fused and paired hooks build each tile of w + eps z (linear layers,
/// TeZO's low-rank z with its virtual update included, and the LM head) as the GEMM packs it.
/// The log-probs must be those of whole perturbed copies, bit for bit, through the target path
/// and the logits path, over matrices of several tiles with a short last one and a k tail
/// (intermediate size 100, vocabulary 1100).
#[test]
fn tiles_built_in_the_bf16_gemm_equal_whole_perturbed_copies() {
    if CpuBackend::with_matmul(Matmul::Bf16).is_err() {
        eprintln!("skipped: this CPU lacks AVX512-BF16");
        return;
    }
    let mut cfg = tiny_config();
    cfg.intermediate_size = 100;
    cfg.hidden_size = 64;
    // Two blocks of head rows (HEAD_BLOCK_ROWS = 1024), the second of two tiles.
    cfg.vocab_size = 1100;
    let bt = batch(&cfg, 8);
    for method in [Method::Mezo, Method::SparseMezo, Method::Tezo] {
        for dtype in [DType::F32, DType::BF16] {
            let w = LlamaWeights::random(&cfg, 5, dtype);
            let mut m = Llama::new(
                cfg.clone(),
                w,
                CpuBackend::with_matmul(Matmul::Bf16).unwrap(),
            );
            assert!(m.backend.packs_weight_tiles());
            let mut opt = ZoOptimizer::new(paired_zo_config(method, Perturb::Paired), &m).unwrap();
            // A step first, so that TeZO's tiles carry a virtual update beside eps tau.
            let mut loss = |m: &Llama<CpuBackend>, h: &mut dyn LinearHook<CpuBackend>| {
                let lp = m.target_logprobs(&bt.ids, &bt.layout, &bt.targets, h)?;
                Ok(-lp.iter().sum::<f32>())
            };
            opt.step(&mut m, 1, &mut loss).unwrap();
            let (key, eps) = (opt.key(2), 5e-2);
            let what = format!("{method:?} {dtype:?}");
            let requests = [(0, 3), (4, 1040), (4, 7), (11, 1099)];
            let lp = |h: &mut dyn LinearHook<CpuBackend>| {
                let t = m.target_logprobs(&bt.ids, &bt.layout, &bt.targets, h);
                let r = m.request_logprobs(&bt.ids, &bt.layout, &requests, h);
                [t.unwrap(), r.unwrap()].concat()
            };
            let mut paired = PairedFusedHook::new(&opt, key, eps, &m.backend);
            let t = m.target_logprobs_paired(&bt.ids, &bt.layout, &bt.targets, &mut paired);
            let r = m.request_logprobs_paired(&bt.ids, &bt.layout, &requests, &mut paired);
            let ([t0, t1], [r0, r1]) = (t.unwrap(), r.unwrap());
            let both = [[t0, r0].concat(), [t1, r1].concat()];
            for (s, from_paired) in [(1.0, &both[0]), (-1.0, &both[1])] {
                let fused = || FusedHook::new(&opt, key, s * eps, &m.backend);
                let built = lp(&mut fused());
                let whole = lp(&mut WholeCopies(fused()));
                let same =
                    |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same(&built, &whole), "{what} sign {s}: fused tiles differ");
                assert!(
                    same(from_paired, &whole),
                    "{what} sign {s}: paired tiles differ"
                );
                let plain = lp(&mut zoft::backend::NoHook);
                assert!(!same(&built, &plain), "{what} sign {s}: nothing perturbed");
            }
        }
    }
}
