//! Each method's update written out independently in f64 from its paper's definition and
//! compared with the weights zoft leaves after a few steps: SPSA's g, MeZO-SGD with decoupled
//! weight decay (none for norms), Sparse-MeZO's mask from the initial percentile, AdamW with
//! bias correction, TeZO's U diag(tau) V^T / sqrt(r) directions and TeZO-Adam's moments on tau.

mod common;
use common::*;
use zoft::backend::cpu::CpuBackend;
use zoft::backend::NoHook;
use zoft::model::Llama;
use zoft::rng::Philox;
use zoft::zo::direction::{Factors, StepKey};
use zoft::zo::{Method, Perturb, ZoConfig, ZoOptimizer};

const SEED: u64 = 31;
const RANK: usize = 2;
const SPARSITY: f32 = 0.6;
const BETA1: f64 = 0.9;
const BETA2: f64 = 0.99;
const ADAM_EPS: f64 = 1e-8;

/// One tensor of the reference: its values and the method's state for it.
struct RefTensor {
    shape: Vec<usize>,
    w: Vec<f64>,
    /// Adam moments: per element, or per factor (TeZO-Adam on matrices).
    m: Vec<f64>,
    v: Vec<f64>,
    /// Sparse-MeZO: elements with |w| <= h move.
    threshold: f64,
    /// TeZO: U [rows][r] and V [cols][r], fixed for the run.
    u: Vec<f64>,
    vf: Vec<f64>,
}

impl RefTensor {
    fn is_matrix(&self) -> bool {
        self.shape.len() == 2
    }
}

/// |w| at the given fraction of the sorted magnitudes: (1 - sparsity) of them lie at or below.
fn percentile_threshold(w: &[f64], sparsity: f32) -> f64 {
    let mut a: Vec<f64> = w.iter().map(|x| x.abs()).collect();
    a.sort_by(f64::total_cmp);
    let keep = ((1.0 - sparsity as f64) * a.len() as f64).round() as usize;
    a[keep.clamp(1, a.len()) - 1]
}

struct Reference {
    method: Method,
    lr: f64,
    /// Decoupled weight decay of the matrices.
    wd: f64,
    tensors: Vec<RefTensor>,
}

impl Reference {
    fn new(method: Method, lr: f64, wd: f64, m: &Llama<CpuBackend>) -> Self {
        let tensors = m
            .weights
            .tensors()
            .iter()
            .enumerate()
            .map(|(id, t)| {
                let w: Vec<f64> = t.to_f32_vec().iter().map(|&x| x as f64).collect();
                let (u, vf) = if t.shape.len() == 2 {
                    let f = Factors::generate(SEED, id, t.shape[0], t.shape[1], RANK);
                    // V is [cols][r]; the factors keep it transposed.
                    let cols = t.shape[1];
                    let mut vf = vec![0.0; cols * RANK];
                    for b in 0..cols {
                        for k in 0..RANK {
                            vf[b * RANK + k] = f.vt[k * cols + b] as f64;
                        }
                    }
                    (f.u.iter().map(|&x| x as f64).collect(), vf)
                } else {
                    (vec![], vec![])
                };
                let low_rank_state = matches!(method, Method::TezoAdam) && t.shape.len() == 2;
                let state = if low_rank_state { RANK } else { w.len() };
                RefTensor {
                    shape: t.shape.clone(),
                    threshold: percentile_threshold(&w, SPARSITY),
                    m: vec![0.0; state],
                    v: vec![0.0; state],
                    w,
                    u,
                    vf,
                }
            })
            .collect();
        Reference {
            method,
            lr,
            wd,
            tensors,
        }
    }

    fn low_rank(&self) -> bool {
        matches!(self.method, Method::Tezo | Method::TezoAdam)
    }

    /// tau of a matrix at `step`, or None where the direction is a dense Gaussian.
    fn tau(&self, id: usize, step: u32) -> Option<Vec<f64>> {
        let t = &self.tensors[id];
        (self.low_rank() && t.is_matrix()).then(|| {
            let key = StepKey { seed: SEED, step };
            Factors::tau(key, id, RANK)
                .iter()
                .map(|&x| x as f64)
                .collect()
        })
    }

    /// z of tensor `id` at `step`: N(0, 1) per element from Philox (seed, step, tensor id),
    /// zero outside Sparse-MeZO's mask, U diag(tau) V^T / sqrt(r) for TeZO's matrices.
    fn z(&self, id: usize, step: u32) -> Vec<f64> {
        let t = &self.tensors[id];
        if let Some(tau) = self.tau(id, step) {
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let mut z = vec![0.0; rows * cols];
            for a in 0..rows {
                for b in 0..cols {
                    let s: f64 = (0..RANK)
                        .map(|k| t.u[a * RANK + k] * tau[k] * t.vf[b * RANK + k])
                        .sum();
                    z[a * cols + b] = s / (RANK as f64).sqrt();
                }
            }
            return z;
        }
        let p = Philox::new(SEED, step, id as u32);
        (0..t.w.len())
            .map(|i| {
                let masked_out = self.method == Method::SparseMezo && t.w[i].abs() > t.threshold;
                if masked_out {
                    0.0
                } else {
                    p.normal(i as u64) as f64
                }
            })
            .collect()
    }

    /// The weights w + s z(step), as f32 tensors for a forward.
    fn perturbed(&self, step: u32, s: f64) -> Vec<Vec<f32>> {
        (0..self.tensors.len())
            .map(|id| {
                let z = self.z(id, step);
                let w = &self.tensors[id].w;
                w.iter().zip(&z).map(|(w, z)| (w + s * z) as f32).collect()
            })
            .collect()
    }

    /// The update of step `step` (0-based) with projected gradient g.
    fn update(&mut self, step: u32, g: f64) {
        let (lr, t_adam) = (self.lr, step as i32 + 1);
        let wd = self.wd;
        let (c1, c2) = (1.0 - BETA1.powi(t_adam), 1.0 - BETA2.powi(t_adam));
        for id in 0..self.tensors.len() {
            let z = self.z(id, step);
            let tau = self.tau(id, step);
            let method = self.method;
            let t = &mut self.tensors[id];
            // Decoupled weight decay, none for the norm gains (the 1-D tensors).
            let wd = if t.is_matrix() { wd } else { 0.0 };
            let uses_adam = matches!(method, Method::MezoAdam | Method::TezoAdam);
            match (uses_adam, tau) {
                (false, _) => {
                    for (w, z) in t.w.iter_mut().zip(&z) {
                        // Sparse-MeZO: an element outside the mask does not move at all.
                        if *z != 0.0 {
                            *w -= lr * (g * z + wd * *w);
                        }
                    }
                }
                (true, None) => {
                    let elems = t.w.iter_mut().zip(&z).zip(t.m.iter_mut().zip(&mut t.v));
                    for ((w, z), (m, v)) in elems {
                        let step = adam(m, v, g * z, c1, c2);
                        *w -= lr * (step + wd * *w);
                    }
                }
                (true, Some(tau)) => {
                    // Adam on the r coordinates of the estimate g tau, written back through the
                    // fixed factors: W <- W - lr wd W + U diag(delta) V^T / sqrt(r).
                    let mut delta = [0.0; RANK];
                    for k in 0..RANK {
                        delta[k] = -lr * adam(&mut t.m[k], &mut t.v[k], g * tau[k], c1, c2);
                    }
                    let cols = t.shape[1];
                    for (i, w) in t.w.iter_mut().enumerate() {
                        let (a, b) = (i / cols, i % cols);
                        let low: f64 = (0..RANK)
                            .map(|k| t.u[a * RANK + k] * delta[k] * t.vf[b * RANK + k])
                            .sum();
                        *w += low / (RANK as f64).sqrt() - lr * wd * *w;
                    }
                }
            }
        }
    }
}

/// AdamW's moments after gradient estimate `ge`, and its bias-corrected step direction.
fn adam(m: &mut f64, v: &mut f64, ge: f64, c1: f64, c2: f64) -> f64 {
    *m = BETA1 * *m + (1.0 - BETA1) * ge;
    *v = BETA2 * *v + (1.0 - BETA2) * ge * ge;
    (*m / c1) / ((*v / c2).sqrt() + ADAM_EPS)
}

/// Loss of the batch on a model holding `weights`.
fn loss_at(model: &mut Llama<CpuBackend>, weights: &[Vec<f32>], bt: &Batch) -> f64 {
    for (t, w) in model.weights.tensors_mut().into_iter().zip(weights) {
        t.f32s_mut().unwrap().copy_from_slice(w);
    }
    loss_of(model, bt, &mut NoHook) as f64
}

/// Runs `steps` steps of `method` and checks every step's losses and g and, at the end, every
/// tensor against the reference. Returns the largest error of a tensor relative to its update.
fn compare(method: Method, perturb: Perturb, wd: f64, steps: u32) -> f64 {
    let cfg = micro_config();
    let bt = batch(&cfg, 4);
    let mut m = tiny_model(&cfg, 12);
    let mut scratch = tiny_model(&cfg, 12);
    let uses_adam = matches!(method, Method::MezoAdam | Method::TezoAdam);
    let lr = if uses_adam { 1e-3 } else { 5e-3 };
    let eps = 1e-3f32;
    let zc = ZoConfig {
        method,
        perturb,
        lr: lr as f32,
        eps,
        weight_decay: wd as f32,
        sparsity: SPARSITY,
        rank: RANK,
        beta1: BETA1 as f32,
        beta2: BETA2 as f32,
        adam_eps: ADAM_EPS as f32,
        seed: SEED,
    };
    let mut reference = Reference::new(method, lr, wd, &m);
    let initial: Vec<Vec<f64>> = reference.tensors.iter().map(|t| t.w.clone()).collect();
    let mut opt = ZoOptimizer::new(zc, &m).unwrap();
    let label = format!("{} {perturb:?}", method.name());
    let mut largest_change = 0.0f64;
    for step in 0..steps {
        let r = opt
            .step(&mut m, step as u64, &mut |mm, h| Ok(loss_of(mm, &bt, h)))
            .unwrap();
        let lp = loss_at(&mut scratch, &reference.perturbed(step, eps as f64), &bt);
        let lm = loss_at(&mut scratch, &reference.perturbed(step, -eps as f64), &bt);
        // The losses differ from the unperturbed one by about eps |grad . z| ~ 1e-3; a loss
        // taken at the wrong point (or the wrong z) is off by that much, rounding by ~1e-6.
        for (name, ours, want) in [("+eps", r.loss_plus, lp), ("-eps", r.loss_minus, lm)] {
            assert!(
                (ours as f64 - want).abs() < 2e-5,
                "{label} step {step}: loss({name}) {ours}, expected {want}"
            );
        }
        largest_change = largest_change.max((lp - lm).abs());
        assert_eq!(
            r.projected_grad,
            (r.loss_plus - r.loss_minus) / (2.0 * eps),
            "{label} step {step}: g is not (L+ - L-) / (2 eps)"
        );
        reference.update(step, r.projected_grad as f64);
    }
    // The loss checks above mean something only if +eps and -eps losses differ well beyond
    // their tolerance (one step's directional derivative can be near zero by chance).
    assert!(
        largest_change > 1e-4,
        "{label}: the perturbations hardly change the loss ({largest_change:.1e})"
    );
    opt.materialize(&mut m).unwrap();
    let mut worst = 0.0f64;
    for (id, t) in m.weights.tensors().iter().enumerate() {
        let want = &reference.tensors[id].w;
        let ours = t.to_f32_vec();
        let err: f64 = ours
            .iter()
            .zip(want)
            .map(|(a, b)| (*a as f64 - b).powi(2))
            .sum();
        let moved: f64 = want
            .iter()
            .zip(&initial[id])
            .map(|(a, b)| (a - b).powi(2))
            .sum();
        assert!(
            moved > 0.0,
            "{label}: the reference did not move tensor {id}"
        );
        worst = worst.max((err / moved).sqrt());
    }
    eprintln!("{label}: largest tensor error / update {worst:.2e}");
    worst
}

#[test]
fn every_method_updates_as_its_definition_says() {
    let methods = [
        Method::Mezo,
        Method::MezoAdam,
        Method::SparseMezo,
        Method::Tezo,
        Method::TezoAdam,
    ];
    for method in methods {
        for perturb in [Perturb::Inplace, Perturb::Fused] {
            // Sparse-MeZO runs only fused; TeZO's fused update stays low-rank, without decay
            // (ZoConfig::validate).
            let wd = match (method, perturb) {
                (m, Perturb::Inplace) if !m.runs_in_place() => continue,
                (Method::Tezo | Method::TezoAdam, Perturb::Fused) => 0.0,
                _ => 0.5,
            };
            let worst = compare(method, perturb, wd, 4);
            assert!(
                worst < 1e-3,
                "{} {perturb:?}: weights differ from the definition by {worst:.2e} of the update",
                method.name()
            );
        }
    }
}
