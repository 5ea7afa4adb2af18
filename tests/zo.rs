//! Zeroth-order methods on tiny random models: estimator quality against finite-difference
//! gradients, exactness of the fused mode, in-place drift, determinism, masks, low-rank
//! virtual updates, and argument errors.

mod common;
use common::*;
use zoft::backend::cpu::CpuBackend;
use zoft::backend::NoHook;
use zoft::model::{DType, HostTensor, Llama, LlamaWeights};
use zoft::zo::direction::{is_matrix, Factors, StepKey};
use zoft::zo::hook::FusedHook;
use zoft::zo::passes::ZoBackend;
use zoft::zo::{Method, Perturb, ZoConfig, ZoOptimizer};

/// Central finite differences of the loss for every parameter, accumulated in f64.
fn fd_gradient(m: &mut Llama<CpuBackend>, bt: &Batch) -> Vec<Vec<f64>> {
    let h = 1e-2f32;
    let n_t = m.weights.tensors().len();
    let mut grads = Vec::new();
    for ti in 0..n_t {
        let n = m.weights.tensors()[ti].numel();
        let mut g = vec![0.0f64; n];
        for (j, gj) in g.iter_mut().enumerate() {
            let orig = m.weights.tensors()[ti].f32s().unwrap()[j];
            m.weights.tensors_mut()[ti].f32s_mut().unwrap()[j] = orig + h;
            let lp = loss_of(m, bt, &mut NoHook) as f64;
            m.weights.tensors_mut()[ti].f32s_mut().unwrap()[j] = orig - h;
            let lm = loss_of(m, bt, &mut NoHook) as f64;
            m.weights.tensors_mut()[ti].f32s_mut().unwrap()[j] = orig;
            *gj = (lp - lm) / (2.0 * h as f64);
        }
        grads.push(g);
    }
    grads
}

/// Regenerates the z of tensor `id` at `key` under the optimizer's direction.
fn z_of(opt: &ZoOptimizer, m: &Llama<CpuBackend>, id: usize, key: StepKey) -> Vec<f32> {
    let t = &m.weights.tensors()[id];
    let mut zt = zoft::model::HostTensor::from_f32("z", t.shape.clone(), &vec![0.0; t.numel()]);
    let dir = opt.method.direction().clone();
    // z = (w0 + 1*z) - w0 with w0 = 0 except for sparse, whose mask needs the real w0.
    if let zoft::zo::direction::Direction::Sparse { .. } = &dir {
        let w = t.to_f32_vec();
        let mut tmp = zoft::model::HostTensor::from_f32("w", t.shape.clone(), &w);
        zoft::zo::direction::perturb_tensor(&m.backend, &mut tmp, id, key, &dir, 0.0, 1.0).unwrap();
        let after = tmp.to_f32_vec();
        return after.iter().zip(&w).map(|(a, b)| a - b).collect();
    }
    zoft::zo::direction::perturb_tensor(&m.backend, &mut zt, id, key, &dir, 0.0, 1.0).unwrap();
    zt.to_f32_vec()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Mean of g z over `samples` steps (lr = 0, fused, so the weights never move) and the
/// expected value of the estimator given the true gradient, both flattened.
fn estimator_vs_expected(method: Method, samples: u32) -> (f64, usize) {
    let cfg = micro_config();
    let mut m = tiny_model(&cfg, 21);
    let bt = batch(&cfg, 5);
    let grad = fd_gradient(&mut m, &bt);
    let zc = ZoConfig {
        method,
        perturb: Perturb::Fused,
        lr: 0.0,
        eps: 1e-3,
        rank: 2,
        sparsity: 0.5,
        seed: 9,
        ..Default::default()
    };
    let mut opt = ZoOptimizer::new(zc, &m).unwrap();
    let mut mean: Vec<Vec<f64>> = grad.iter().map(|g| vec![0.0; g.len()]).collect();
    for s in 0..samples {
        let r = opt
            .step(&mut m, s as u64, &mut |mm, h| Ok(loss_of(mm, &bt, h)))
            .unwrap();
        for (id, acc) in mean.iter_mut().enumerate() {
            let z = z_of(&opt, &m, id, opt.key(s as u64));
            for (a, z) in acc.iter_mut().zip(z) {
                *a += r.projected_grad as f64 * z as f64 / samples as f64;
            }
        }
    }
    // Expected estimator: dense -> grad; sparse -> masked grad; low rank -> projection of each
    // matrix's gradient on its factors, (1/r) sum_k (u_k^T G v_k) u_k v_k^T.
    let mut expected = Vec::new();
    let mut dims = 0usize;
    for (id, g) in grad.iter().enumerate() {
        let t = &m.weights.tensors()[id];
        match (method, is_matrix(t)) {
            (Method::SparseMezo, _) => {
                let h = zoft::zo::sparse_mezo::threshold(t, 0.5);
                let w = t.to_f32_vec();
                for (j, &gj) in g.iter().enumerate() {
                    let on = w[j].abs() <= h;
                    dims += on as usize;
                    expected.push(if on { gj } else { 0.0 });
                }
            }
            (Method::Tezo, true) => {
                let (rows, cols, r) = (t.shape[0], t.shape[1], 2);
                let f = Factors::generate(9, id, rows, cols, r);
                let mut p = vec![0.0f64; rows * cols];
                for k in 0..r {
                    let mut c = 0.0;
                    for a in 0..rows {
                        for b in 0..cols {
                            c +=
                                f.u[a * r + k] as f64 * g[a * cols + b] * f.vt[k * cols + b] as f64;
                        }
                    }
                    for a in 0..rows {
                        for b in 0..cols {
                            p[a * cols + b] +=
                                c * f.u[a * r + k] as f64 * f.vt[k * cols + b] as f64 / r as f64;
                        }
                    }
                }
                dims += r;
                expected.extend(p);
            }
            _ => {
                dims += g.len();
                expected.extend(g.iter().copied());
            }
        }
    }
    let est: Vec<f64> = mean.concat();
    (cosine(&est, &expected), dims)
}

/// For Gaussian z in d dimensions, mean(g z) over N samples has mean grad and covariance
/// (|grad|^2 I + grad grad^T) / N, so cos(estimate, grad) ~ 1 / sqrt(1 + (d + 1) / N).
/// We require 80% of that.
fn bound(dims: usize, n: u32) -> f64 {
    0.8 / (1.0 + (dims as f64 + 1.0) / n as f64).sqrt()
}

#[test]
fn mezo_estimator_approaches_true_gradient() {
    let n = 6000;
    let (cos, dims) = estimator_vs_expected(Method::Mezo, n);
    eprintln!(
        "mezo: cos {cos:.3} over {dims} dims, bound {:.3}",
        bound(dims, n)
    );
    assert!(cos > bound(dims, n), "cos {cos}");
}

#[test]
fn sparse_mezo_estimator_approaches_masked_gradient() {
    let n = 4000;
    let (cos, dims) = estimator_vs_expected(Method::SparseMezo, n);
    eprintln!(
        "sparse-mezo: cos {cos:.3} over {dims} dims, bound {:.3}",
        bound(dims, n)
    );
    assert!(cos > bound(dims, n), "cos {cos}");
}

#[test]
fn tezo_estimator_approaches_projected_gradient() {
    let n = 3000;
    let (cos, dims) = estimator_vs_expected(Method::Tezo, n);
    eprintln!(
        "tezo: cos {cos:.3} over {dims} effective dims, bound {:.3}",
        bound(dims, n)
    );
    assert!(cos > bound(dims, n), "cos {cos}");
}

#[test]
fn fused_mode_leaves_weights_bit_identical_when_lr_is_zero() {
    let cfg = tiny_config();
    for method in [
        Method::Mezo,
        Method::MezoAdam,
        Method::SparseMezo,
        Method::Tezo,
        Method::TezoAdam,
    ] {
        for dtype in [DType::F32, DType::BF16] {
            // A -0 weight in every tensor: adding a +0 anywhere would turn it into +0.
            let w = LlamaWeights::random(&cfg, 3, dtype)
                .try_map(|_, t| {
                    let mut v = t.to_f32_vec();
                    v[0] = -0.0;
                    Ok(HostTensor::from_f32_as(&t.name, t.shape.clone(), &v, dtype))
                })
                .unwrap();
            let mut m = Llama::new(cfg.clone(), w, CpuBackend::new());
            let bt = batch(&cfg, 1);
            let before = snapshot(&m);
            let zc = ZoConfig {
                method,
                perturb: Perturb::Fused,
                lr: 0.0,
                seed: 4,
                ..Default::default()
            };
            let mut opt = ZoOptimizer::new(zc, &m).unwrap();
            let mut losses = vec![];
            for s in 0..3 {
                let r = opt
                    .step(&mut m, s, &mut |mm, h| Ok(loss_of(mm, &bt, h)))
                    .unwrap();
                losses.push((r.loss_plus, r.loss_minus));
            }
            // TeZO's virtual update too, written in.
            opt.materialize(&mut m).unwrap();
            assert!(
                snapshot(&m) == before,
                "{method:?} {dtype:?}: weights changed"
            );
            // The perturbation was real: the two losses differ.
            assert!(
                losses.iter().any(|(a, b)| a != b),
                "{method:?}: no perturbation seen"
            );
        }
    }
}

#[test]
fn fused_forward_sees_the_inplace_perturbed_weights() {
    // The fused hook perturbs the embedding's gathered rows and the LM head a block of rows at
    // a time: it must see exactly the weights an in-place pass writes, tied head or not.
    for tied in [false, true] {
        let mut cfg = tiny_config();
        cfg.tie_word_embeddings = tied;
        for method in [Method::Mezo, Method::SparseMezo, Method::Tezo] {
            for dtype in [DType::F32, DType::BF16] {
                // The hook perturbs in f32 whatever the storage, so the in-place reference
                // runs on the same values widened to f32.
                let w = LlamaWeights::random(&cfg, 8, dtype);
                let widened = w
                    .try_map(|_, t| {
                        Ok(HostTensor::from_f32(
                            t.name.clone(),
                            t.shape.clone(),
                            &t.to_f32_vec(),
                        ))
                    })
                    .unwrap();
                let fused_model = Llama::new(cfg.clone(), w, CpuBackend::new());
                let mut inplace_model = Llama::new(cfg.clone(), widened, CpuBackend::new());
                let bt = batch(&cfg, 2);
                let zc = |perturb| ZoConfig {
                    method,
                    perturb,
                    sparsity: 0.5,
                    seed: 6,
                    ..Default::default()
                };
                let fused = ZoOptimizer::new(zc(Perturb::Fused), &fused_model).unwrap();
                // Sparse-MeZO runs only fused, but its move from offset 0 is the in-place one.
                let mover = Perturb::in_place_if_allowed(method);
                let inplace = ZoOptimizer::new(zc(mover), &inplace_model).unwrap();
                let (key, eps) = (fused.key(3), 5e-2);
                let mut hook = CpuBackend::fused_hook(&fused, &fused_model, key, eps).unwrap();
                let via_hook = loss_of(&fused_model, &bt, &mut *hook);
                // The head a few vocabulary rows at a time, the last block short: the
                // log-sum-exp runs across blocks.
                let mut blocks =
                    FusedHook::new(&fused, key, eps, &fused_model.backend).with_head_block_rows(16);
                let via_blocks = loss_of(&fused_model, &bt, &mut blocks);
                let rows = [0, 4, 5, 11];
                let logits_blocks = fused_model
                    .logits_at(&bt.ids, &bt.layout, &rows, &mut blocks)
                    .unwrap();
                drop(blocks);
                inplace
                    .perturb_all(&mut inplace_model, key, 0.0, eps)
                    .unwrap();
                let via_weights = loss_of(&inplace_model, &bt, &mut NoHook);
                let logits_weights = inplace_model
                    .logits_at(&bt.ids, &bt.layout, &rows, &mut NoHook)
                    .unwrap();
                let unperturbed = loss_of(&fused_model, &bt, &mut NoHook);
                let tol = 1e-5 * via_weights.abs();
                for (what, loss) in [("whole head", via_hook), ("head blocks", via_blocks)] {
                    assert!(
                        (loss - via_weights).abs() < tol,
                        "{method:?} {dtype:?} tied={tied} {what}: fused {loss} vs in-place {via_weights}"
                    );
                }
                let e = rel_err(&logits_blocks, &logits_weights);
                assert!(
                    e < 1e-5,
                    "{method:?} {dtype:?} tied={tied}: logits off by {e}"
                );
                assert!(
                    (via_hook - unperturbed).abs() > 10.0 * tol,
                    "{method:?}: the perturbation did not change the loss"
                );
            }
        }
    }
}

/// ||w_after - w_before|| / ||w_before|| after `steps` in-place steps with lr = 0.
fn inplace_drift(dtype: DType, steps: u64) -> f64 {
    let cfg = tiny_config();
    let w = LlamaWeights::random(&cfg, 3, dtype);
    let mut m = Llama::new(cfg.clone(), w, CpuBackend::new());
    let bt = batch(&cfg, 1);
    let before: Vec<Vec<f32>> = m.weights.tensors().iter().map(|t| t.to_f32_vec()).collect();
    let zc = ZoConfig {
        method: Method::Mezo,
        perturb: Perturb::Inplace,
        lr: 0.0,
        seed: 4,
        ..Default::default()
    };
    let mut opt = ZoOptimizer::new(zc, &m).unwrap();
    for s in 0..steps {
        opt.step(&mut m, s, &mut |mm, h| Ok(loss_of(mm, &bt, h)))
            .unwrap();
    }
    let after: Vec<f32> = m
        .weights
        .tensors()
        .iter()
        .flat_map(|t| t.to_f32_vec())
        .collect();
    rel_err(&after, &before.concat())
}

#[test]
fn inplace_round_trip_drift_is_bounded() {
    let f32_drift = inplace_drift(DType::F32, 10);
    let bf16_drift = inplace_drift(DType::BF16, 10);
    eprintln!("in-place drift after 10 steps at eps 1e-3 (relative norm): f32 {f32_drift:.2e}, bf16 {bf16_drift:.2e}");
    assert!(f32_drift < 1e-6, "f32 drift {f32_drift}");
    assert!(bf16_drift > f32_drift, "bf16 should drift more than f32");
    assert!(bf16_drift < 2e-2, "bf16 drift {bf16_drift}");
}

#[test]
fn same_seed_gives_same_weights() {
    let cfg = tiny_config();
    let run = |perturb| {
        let mut m = tiny_model(&cfg, 8);
        let bt = batch(&cfg, 2);
        let zc = ZoConfig {
            method: Method::Mezo,
            perturb,
            lr: 1e-3,
            seed: 77,
            ..Default::default()
        };
        let mut opt = ZoOptimizer::new(zc, &m).unwrap();
        for s in 0..4 {
            opt.step(&mut m, s, &mut |mm, h| Ok(loss_of(mm, &bt, h)))
                .unwrap();
        }
        snapshot(&m)
    };
    for p in [Perturb::Inplace, Perturb::Fused] {
        let a = run(p);
        assert!(a == run(p), "{p:?}: two runs with the same seed differ");
        assert!(
            a != snapshot(&tiny_model(&cfg, 8)),
            "{p:?}: training did not move the weights"
        );
    }
}

#[test]
fn sparse_mask_fraction_matches_sparsity() {
    let cfg = tiny_config();
    let m = tiny_model(&cfg, 8);
    for sparsity in [0.5f32, 0.8, 0.95] {
        for t in m.weights.tensors() {
            let h = zoft::zo::sparse_mezo::threshold(t, sparsity);
            let w = t.to_f32_vec();
            let moving = w.iter().filter(|x| x.abs() <= h).count() as f64 / w.len() as f64;
            let want = 1.0 - sparsity as f64;
            assert!(
                (moving - want).abs() <= 1.0 / w.len() as f64 + 1e-9,
                "{}: {moving} moving, want {want}",
                t.name
            );
        }
    }
}

#[test]
fn tezo_virtual_weights_equal_materialized() {
    let cfg = tiny_config();
    for method in [Method::Tezo, Method::TezoAdam] {
        let mut m = tiny_model(&cfg, 12);
        let bt = batch(&cfg, 3);
        let zc = ZoConfig {
            method,
            perturb: Perturb::Fused,
            lr: 1e-2,
            rank: 4,
            seed: 5,
            ..Default::default()
        };
        let mut opt = ZoOptimizer::new(zc, &m).unwrap();
        let before = snapshot(&m);
        for s in 0..5 {
            opt.step(&mut m, s, &mut |mm, h| Ok(loss_of(mm, &bt, h)))
                .unwrap();
        }
        let virtual_loss = loss_of(&m, &bt, &mut *opt.eval_hook(&m).unwrap());
        let matrices_untouched = m
            .weights
            .tensors()
            .iter()
            .zip(&before)
            .all(|(t, b)| !is_matrix(t) || t.bytes() == &b[..]);
        assert!(
            matrices_untouched,
            "{method:?}: fused low-rank update wrote into the matrices"
        );
        opt.materialize(&mut m).unwrap();
        let real_loss = loss_of(&m, &bt, &mut NoHook);
        assert!(snapshot(&m) != before);
        assert!(
            (virtual_loss - real_loss).abs() < 1e-5 * real_loss.abs(),
            "{method:?}: virtual {virtual_loss} vs materialized {real_loss}"
        );
        // After materializing, the optimizer's eval hook adds nothing more.
        assert_eq!(
            loss_of(&m, &bt, &mut *opt.eval_hook(&m).unwrap()),
            real_loss
        );
    }
}

#[test]
fn failed_forward_restores_the_weights() {
    let cfg = tiny_config();
    let w = LlamaWeights::random(&cfg, 3, DType::F32);
    let mut m = Llama::new(cfg.clone(), w, CpuBackend::new());
    let bt = batch(&cfg, 1);
    let flat = |m: &Llama<CpuBackend>| -> Vec<f32> {
        m.weights
            .tensors()
            .iter()
            .flat_map(|t| t.to_f32_vec())
            .collect()
    };
    let before = flat(&m);
    let zc = ZoConfig {
        method: Method::Mezo,
        lr: 1e-3,
        seed: 2,
        ..Default::default()
    };
    let mut opt = ZoOptimizer::new(zc, &m).unwrap();
    // Fail the first (+eps) and then the second (-eps) forward of a step.
    for fail_on in [1, 2] {
        let mut calls = 0;
        let err = opt
            .step(&mut m, 0, &mut |mm, h| {
                calls += 1;
                if calls == fail_on {
                    return Err(zoft::Error::msg("forward failed"));
                }
                Ok(loss_of(mm, &bt, h))
            })
            .unwrap_err();
        assert!(err.to_string().contains("forward failed"), "{err}");
        let e = rel_err(&flat(&m), &before);
        assert!(
            e < 1e-6,
            "failure at forward {fail_on} left the weights perturbed: {e}"
        );
    }
}

#[test]
fn low_rank_pass_on_a_vector_is_an_error() {
    use zoft::zo::passes::{Rule, ZSpec};
    let cfg = tiny_config();
    let mut m = Llama::new(
        cfg.clone(),
        LlamaWeights::random(&cfg, 3, DType::F32),
        CpuBackend::new(),
    );
    let backend = CpuBackend::new();
    let id = m.final_norm_id();
    let norm = &mut m.weights.tensors_mut()[id];
    let before = norm.to_f32_vec();
    let key = StepKey { seed: 1, step: 0 };
    let z = ZSpec::LowRank { coef: &[1.0; 4] };
    let err = backend
        .zo_pass(norm, id, key, z, 0.0, Rule::Move { to: 1.0 }, None)
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "{}: a low-rank direction needs a matrix",
            norm.name
        )),
        "{err}"
    );
    assert_eq!(norm.to_f32_vec(), before, "a refused pass wrote the tensor");
}

#[test]
fn non_finite_loss_stops_and_restores_weights() {
    let cfg = tiny_config();
    let mut m = tiny_model(&cfg, 8);
    let before = snapshot(&m);
    let zc = ZoConfig {
        method: Method::Mezo,
        perturb: Perturb::Inplace,
        lr: 1e-3,
        ..Default::default()
    };
    let mut opt = ZoOptimizer::new(zc, &m).unwrap();
    let err = opt.step(&mut m, 0, &mut |_, _| Ok(f32::NAN)).unwrap_err();
    assert!(err.to_string().contains("non-finite loss"), "{err}");
    let after = snapshot(&m);
    // Restored up to the in-place round trip (f32): compare values.
    for (a, b) in after.iter().zip(&before) {
        let (a, b): (&[f32], &[f32]) = (bytemuck::cast_slice(a), bytemuck::cast_slice(b));
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-6, "weights not restored after NaN");
        }
    }
}

#[test]
fn bad_arguments_give_clear_errors() {
    let err = Method::parse("sgd").unwrap_err().to_string();
    assert!(
        err.contains("unknown method") && err.contains("tezo-adam"),
        "{err}"
    );
    let check = |f: fn(&mut ZoConfig), want: &str| {
        let mut c = ZoConfig::default();
        f(&mut c);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    };
    check(|c| c.sparsity = 1.0, "sparsity must be in [0, 1)");
    check(|c| c.sparsity = -0.1, "sparsity must be in [0, 1)");
    check(|c| c.rank = 0, "rank must be at least 1");
    check(|c| c.eps = 0.0, "eps must be a positive number");
    check(|c| c.eps = -1e-3, "eps must be a positive number");
    check(|c| c.eps = f32::INFINITY, "eps must be a positive number");
    check(|c| c.lr = f32::NAN, "learning rate must be >= 0");
    check(|c| c.lr = -1e-6, "learning rate must be >= 0");
    check(|c| c.lr = f32::INFINITY, "learning rate must be >= 0");
    check(|c| c.weight_decay = -0.1, "weight decay must be >= 0");
    check(|c| c.weight_decay = f32::NAN, "weight decay must be >= 0");
    check(|c| c.beta1 = 1.0, "beta1 and beta2 must be in [0, 1)");
    check(|c| c.beta2 = -0.5, "beta1 and beta2 must be in [0, 1)");
    check(|c| c.adam_eps = 0.0, "Adam's eps must be a positive number");
    check(
        |c| {
            c.method = Method::TezoAdam;
            c.perturb = Perturb::Fused;
            c.weight_decay = 0.1;
        },
        "weight decay is not supported with tezo-adam --perturb fused",
    );
    check(
        |c| {
            c.method = Method::SparseMezo;
            c.perturb = Perturb::Inplace;
        },
        "sparse-mezo runs only with --perturb fused",
    );
    check(
        |c| {
            c.method = Method::Tezo;
            c.perturb = Perturb::Paired;
            c.weight_decay = 0.1;
        },
        "weight decay is not supported with tezo --perturb paired",
    );
    let e = Perturb::parse("sideways").unwrap_err().to_string();
    assert!(e.contains("inplace, fused or paired"), "{e}");
    let e = Perturb::parse_or_auto("sideways").unwrap_err().to_string();
    assert!(e.contains("inplace, fused, paired or auto"), "{e}");
}

#[test]
fn auto_perturb_is_in_place_for_f32_weights_and_gemms_and_fused_otherwise() {
    assert_eq!(Perturb::parse_or_auto("auto").unwrap(), None);
    assert_eq!(
        Perturb::parse_or_auto("fused").unwrap(),
        Some(Perturb::Fused)
    );
    let cfg = tiny_config();
    let f32_w = LlamaWeights::random(&cfg, 1, DType::F32);
    let bf16_w = LlamaWeights::random(&cfg, 1, DType::BF16);
    let zc = |method, weight_decay| ZoConfig {
        method,
        weight_decay,
        ..Default::default()
    };
    let f32_gemms = CpuBackend::with_matmul(zoft::backend::cpu::Matmul::F32).unwrap();
    for method in [Method::Mezo, Method::Tezo] {
        let c = zc(method, 0.0);
        assert_eq!(Perturb::auto(&c, &f32_gemms, &f32_w), Perturb::Inplace);
        assert_eq!(Perturb::auto(&c, &f32_gemms, &bf16_w), Perturb::Fused);
    }
    // Sparse-MeZO cannot run in place (Method::runs_in_place).
    let c = zc(Method::SparseMezo, 0.0);
    assert_eq!(Perturb::auto(&c, &f32_gemms, &f32_w), Perturb::Fused);
    // One bf16 tensor among f32 ones is enough to drift.
    let mut mixed = LlamaWeights::random(&cfg, 1, DType::F32);
    let t = &mixed.layers[0].wq;
    mixed.layers[0].wq = HostTensor::from_f32_as(
        t.name.clone(),
        t.shape.clone(),
        &t.to_f32_vec(),
        DType::BF16,
    );
    assert_eq!(
        Perturb::auto(&zc(Method::Mezo, 0.0), &f32_gemms, &mixed),
        Perturb::Fused
    );
    // TeZO's weight decay needs the in-place mode.
    let c = zc(Method::Tezo, 0.1);
    assert_eq!(Perturb::auto(&c, &f32_gemms, &bf16_w), Perturb::Inplace);
    ZoConfig {
        perturb: Perturb::auto(&c, &f32_gemms, &bf16_w),
        ..c
    }
    .validate()
    .unwrap();
    // Where the GEMM builds each perturbed tile (bf16 GEMMs), every method goes fused even
    // through f32 weights (a dense z and TeZO's low-rank z alike), but TeZO with weight decay.
    let Ok(tile_gemms) = CpuBackend::with_matmul(zoft::backend::cpu::Matmul::Bf16) else {
        eprintln!("bf16 GEMM cases skipped: this CPU lacks AVX512-BF16");
        return;
    };
    for (method, want) in [
        (Method::Mezo, Perturb::Fused),
        (Method::MezoAdam, Perturb::Fused),
        (Method::SparseMezo, Perturb::Fused),
        (Method::Tezo, Perturb::Fused),
        (Method::TezoAdam, Perturb::Fused),
    ] {
        let c = zc(method, 0.0);
        assert_eq!(Perturb::auto(&c, &tile_gemms, &f32_w), want, "{method:?}");
        assert_eq!(Perturb::auto(&c, &tile_gemms, &bf16_w), Perturb::Fused);
    }
    let c = zc(Method::Tezo, 0.1);
    assert_eq!(Perturb::auto(&c, &tile_gemms, &f32_w), Perturb::Inplace);
}

/// The CPU's memory accounts hold what a run holds: the model's weights (mapped or loaded)
/// under weights, MeZO-Adam's two f32 moments under optimizer, each at its size in bytes, and
/// give both back when the optimizer and the model go.
#[test]
fn memory_accounts_hold_the_weights_and_the_adam_moments() {
    use zoft::backend::mem::Tag;
    let cfg = tiny_config();
    let weights = LlamaWeights::random(&cfg, 3, DType::F32);
    let weight_bytes = weights.byte_size();
    let params: usize = weights.tensors().iter().map(|t| t.numel()).sum();
    let backend = CpuBackend::new();
    let mem = backend.mem.clone();
    assert_eq!(mem.current(Tag::Weights), 0);
    let mut m = Llama::new(cfg.clone(), weights, backend);
    assert_eq!(mem.current(Tag::Weights), weight_bytes);
    assert_eq!(weight_bytes, 4 * params);
    let zc = paired_zo_config(Method::MezoAdam, Perturb::Inplace);
    let mut opt = ZoOptimizer::new(zc, &m).unwrap();
    let bt = batch(&cfg, 5);
    opt.step(&mut m, 0, &mut |mm, h| Ok(loss_of(mm, &bt, h)))
        .unwrap();
    assert_eq!(mem.current(Tag::Optimizer), 2 * 4 * params);
    assert_eq!(opt.method.state_bytes(), 2 * 4 * params);
    let report = m.backend.memory();
    assert!(
        report.current.contains(&("weights".into(), weight_bytes)),
        "{report:?}"
    );
    drop(opt);
    assert_eq!(mem.current(Tag::Optimizer), 0);
    drop(m);
    assert_eq!(mem.current(Tag::Weights), 0);
    assert_eq!(mem.report().total, 0, "{:?}", mem.report());
}
