//! Invariants of the CPU forward on tiny random-config models.

mod common;
use common::*;
use zoft::backend::{NoHook, SeqLayout};
use zoft::model::{HostTensor, Llama, LlamaWeights};

fn all_logits(
    m: &Llama<zoft::backend::cpu::CpuBackend>,
    ids: &[u32],
    layout: &SeqLayout,
    rows: &[usize],
) -> Vec<f32> {
    m.logits_at(ids, layout, rows, &mut NoHook).unwrap()
}

#[test]
fn batched_with_padding_equals_unbatched() {
    let cfg = tiny_config();
    let m = tiny_model(&cfg, 1);
    let lens = [5usize, 9, 3];
    let seq = 9;
    let seqs: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| tokens(n, cfg.vocab_size, i as u64))
        .collect();
    let mut ids = vec![7u32; 3 * seq]; // pad with an ordinary token: its value must not matter
    for (b, s) in seqs.iter().enumerate() {
        ids[b * seq..b * seq + s.len()].copy_from_slice(s);
    }
    let layout = SeqLayout::full(3, seq, &lens);
    for (b, s) in seqs.iter().enumerate() {
        let rows: Vec<usize> = (0..s.len()).map(|t| b * seq + t).collect();
        let batched = all_logits(&m, &ids, &layout, &rows);
        let alone = all_logits(
            &m,
            s,
            &SeqLayout::full(1, s.len(), &[s.len()]),
            &(0..s.len()).collect::<Vec<_>>(),
        );
        let e = rel_err(&batched, &alone);
        assert!(e < 1e-5, "sequence {b}: batched vs alone rel err {e}");
    }
}

#[test]
fn packed_sequences_equal_padded_ones() {
    let cfg = tiny_config();
    let m = tiny_model(&cfg, 5);
    let lens = [4usize, 11, 1, 7];
    let seq = 11;
    let seqs: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| tokens(n, cfg.vocab_size, 20 + i as u64))
        .collect();
    let mut padded = vec![3u32; lens.len() * seq];
    for (b, s) in seqs.iter().enumerate() {
        padded[b * seq..b * seq + s.len()].copy_from_slice(s);
    }
    let packed: Vec<u32> = seqs.concat();
    let layout = SeqLayout::packed(&lens);
    assert_eq!(layout.rows(), packed.len());
    let mut start = 0;
    for (b, s) in seqs.iter().enumerate() {
        let padded_rows: Vec<usize> = (0..s.len()).map(|t| b * seq + t).collect();
        let packed_rows: Vec<usize> = (0..s.len()).map(|t| start + t).collect();
        let want = all_logits(&m, &padded, &SeqLayout::full(4, seq, &lens), &padded_rows);
        let got = all_logits(&m, &packed, &layout, &packed_rows);
        let e = rel_err(&got, &want);
        assert!(e < 1e-5, "sequence {b}: packed vs padded rel err {e}");
        start += s.len();
    }
}

#[test]
fn padding_tokens_do_not_change_results() {
    let cfg = tiny_config();
    let m = tiny_model(&cfg, 2);
    let s = tokens(6, cfg.vocab_size, 9);
    let rows: Vec<usize> = (0..6).collect();
    let mut a = s.clone();
    a.extend([1, 2, 3, 4]);
    let mut b = s.clone();
    b.extend([40, 50, 60, 0, 11, 12]);
    let la = all_logits(&m, &a, &SeqLayout::full(1, 10, &[6]), &rows);
    let lb = all_logits(&m, &b, &SeqLayout::full(1, 12, &[6]), &rows);
    let e = rel_err(&la, &lb);
    assert!(e < 1e-6, "different padding changed logits: {e}");
}

#[test]
fn kv_cache_generation_equals_full_recompute() {
    let cfg = tiny_config();
    let m = tiny_model(&cfg, 3);
    let s = tokens(12, cfg.vocab_size, 4);
    let mut cache = m.new_cache(20).unwrap();
    // Prefill 5 tokens, then one at a time.
    let mut cached = vec![m.forward_cached(&s[..5], &mut cache).unwrap()];
    for t in 5..12 {
        cached.push(m.forward_cached(&s[t..t + 1], &mut cache).unwrap());
    }
    let full = all_logits(
        &m,
        &s,
        &SeqLayout::full(1, 12, &[12]),
        &(4..12).collect::<Vec<_>>(),
    );
    let cached: Vec<f32> = cached.concat();
    let e = rel_err(&cached, &full);
    assert!(e < 1e-5, "cached vs full rel err {e}");
}

#[test]
fn gqa_equals_mha_with_repeated_kv_heads() {
    let cfg = tiny_config();
    let gqa = tiny_model(&cfg, 5);
    let mut mha_cfg = cfg.clone();
    mha_cfg.num_key_value_heads = Some(cfg.num_attention_heads);
    let group = cfg.num_attention_heads / cfg.n_kv_heads();
    let hd = cfg.head_dim();
    let repeat = |t: &HostTensor| {
        let d = t.shape[1];
        let src = t.to_f32_vec();
        let mut out = Vec::new();
        for h in 0..cfg.n_kv_heads() {
            for _ in 0..group {
                out.extend_from_slice(&src[h * hd * d..(h + 1) * hd * d]);
            }
        }
        HostTensor::from_f32(t.name.clone(), vec![cfg.num_attention_heads * hd, d], &out)
    };
    let w = &gqa.weights;
    let mut tensors = std::collections::HashMap::new();
    for t in w.tensors() {
        let is_kv = t.name.contains("k_proj") || t.name.contains("v_proj");
        let t2 = if is_kv {
            repeat(t)
        } else {
            HostTensor::from_f32(t.name.clone(), t.shape.clone(), &t.to_f32_vec())
        };
        tensors.insert(t.name.clone(), t2);
    }
    let mha_w = LlamaWeights::from_tensors(tensors, &mha_cfg, "test").unwrap();
    let mha = Llama::new(mha_cfg, mha_w, zoft::backend::cpu::CpuBackend::new());
    let s = tokens(10, cfg.vocab_size, 6);
    let layout = SeqLayout::full(1, 10, &[10]);
    let rows: Vec<usize> = (0..10).collect();
    let e = rel_err(
        &all_logits(&gqa, &s, &layout, &rows),
        &all_logits(&mha, &s, &layout, &rows),
    );
    assert!(e < 1e-5, "GQA vs MHA rel err {e}");
}

#[test]
fn target_logprobs_equal_log_softmax_of_logits() {
    let cfg = tiny_config();
    let m = tiny_model(&cfg, 7);
    let s = tokens(8, cfg.vocab_size, 8);
    let layout = SeqLayout::full(1, 8, &[8]);
    let mut targets = vec![-1i32; 8];
    targets[2] = 5;
    targets[7] = 60;
    let lp = m
        .target_logprobs(&s, &layout, &targets, &mut NoHook)
        .unwrap();
    let logits = all_logits(&m, &s, &layout, &[2, 7]);
    let v = cfg.vocab_size;
    for (i, (&r, &tok)) in [(2usize, 5usize), (7, 60)]
        .iter()
        .enumerate()
        .map(|(i, p)| (i, (&p.0, &p.1)))
    {
        let row = &logits[i * v..(i + 1) * v];
        let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        let want = row[tok] as f64 - lse;
        assert!(
            (lp[r] as f64 - want).abs() < 1e-5,
            "row {r}: {} vs {want}",
            lp[r]
        );
    }
    assert_eq!(lp[0], 0.0);
}

#[test]
fn sequence_longer_than_context_is_an_error() {
    let cfg = tiny_config();
    let m = tiny_model(&cfg, 1);
    let n = cfg.max_position_embeddings + 1;
    let s = tokens(n, cfg.vocab_size, 1);
    let err = m
        .logits_at(&s, &SeqLayout::full(1, n, &[n]), &[0], &mut NoHook)
        .unwrap_err();
    assert!(
        err.to_string().contains("longer than the model's context"),
        "{err}"
    );
}

#[test]
fn bf16_weights_track_f32_weights() {
    let cfg = tiny_config();
    let m32 = tiny_model(&cfg, 11);
    let w16 = LlamaWeights::random(&cfg, 11, zoft::model::DType::BF16);
    let m16 = Llama::new(cfg.clone(), w16, zoft::backend::cpu::CpuBackend::new());
    let s = tokens(8, cfg.vocab_size, 3);
    let layout = SeqLayout::full(1, 8, &[8]);
    let rows: Vec<usize> = (0..8).collect();
    let e = rel_err(
        &all_logits(&m16, &s, &layout, &rows),
        &all_logits(&m32, &s, &layout, &rows),
    );
    assert!(e < 2e-2 && e > 0.0, "bf16 vs f32 rel err {e}");
}

/// bf16 GEMM inputs (f32 accumulation) stay close to the f32 reference over a whole forward,
/// and differ from it: the option really changes the GEMMs. Each bf16 kernel the CPU has does
/// so, and the AMX kernel (24 rows here, enough for it to run) agrees with the AVX512-BF16 one
/// up to the order of f32 accumulation.
#[test]
fn bf16_matmul_tracks_f32_matmul() {
    use zoft::backend::cpu::{gemm_amx, gemm_bf16, Bf16Kernel, CpuBackend, Matmul, AMX_MIN_ROWS};
    if !gemm_bf16::available() {
        eprintln!("skipped: this CPU lacks AVX512-BF16");
        return;
    }
    let cfg = tiny_config();
    let m32 = tiny_model(&cfg, 12);
    let s = tokens(24, cfg.vocab_size, 4);
    let layout = SeqLayout::full(2, 12, &[12, 9]);
    assert!(layout.rows() >= AMX_MIN_ROWS);
    let rows: Vec<usize> = (0..9).chain(12..21).collect();
    let reference = all_logits(&m32, &s, &layout, &rows);
    let mut kernels = vec![Bf16Kernel::Avx512];
    if gemm_amx::available() {
        kernels.push(Bf16Kernel::Amx);
    } else {
        eprintln!("AMX kernel skipped: this CPU (or OS) offers no AMX-BF16");
    }
    let logits: Vec<Vec<f32>> = kernels
        .iter()
        .map(|&kernel| {
            let backend = CpuBackend::with_matmul(Matmul::Bf16)
                .and_then(|b| b.with_bf16_kernel(kernel))
                .unwrap();
            let w = LlamaWeights::random(&cfg, 12, zoft::model::DType::F32);
            let mb = Llama::new(cfg.clone(), w, backend);
            let got = all_logits(&mb, &s, &layout, &rows);
            let e = rel_err(&got, &reference);
            assert!(
                e < 2e-2 && e > 1e-5,
                "bf16 ({}) vs f32 matmul rel err {e}",
                kernel.name()
            );
            got
        })
        .collect();
    if let [avx512, amx] = &logits[..] {
        let e = rel_err(amx, avx512);
        assert!(e < 1e-4, "AMX vs AVX512-BF16 kernel rel err {e}");
    }
}

/// A weight built a tile of rows at a time gives the stored weight's product bit for bit
/// (rows past one tile, a short last tile, an odd k), and the f32 GEMM, which takes w whole,
/// refuses one with the weight's name; so do rows handed over as a plain slice, and a slice of
/// the wrong length is refused with the weight's name.
#[test]
fn a_weight_built_by_tiles_equals_the_stored_weight() {
    use zoft::backend::cpu::gemm_bf16::WeightRows;
    use zoft::backend::cpu::{CpuBackend, Matmul};
    use zoft::backend::{mem::Tag, Backend};
    let (m, n, k) = (19, 101, 75);
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 31.0)
        .collect();
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 53 % 97) as f32 - 48.0) / 29.0)
        .collect();
    let wt = HostTensor::from_f32("w", vec![n, k], &w);
    let build = |n0: usize, rows: &mut [f32]| rows.copy_from_slice(&w[n0 * k..n0 * k + rows.len()]);
    let f32_backend = CpuBackend::new();
    let xa = f32_backend.from_host(&x, m, k, Tag::Activations).unwrap();
    let mut out = f32_backend.alloc(m, n, Tag::Activations).unwrap();
    let e = f32_backend
        .matmul_weight_rows(
            &xa,
            "layers.0.w",
            &[n, k],
            WeightRows::Built(&build),
            &mut out,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("layers.0.w") && e.contains("bf16"), "{e}");
    let short = WeightRows::Stored(&w[..n * k - 1]);
    let e = f32_backend
        .matmul_weight_rows(&xa, "layers.1.w", &[n, k], short, &mut out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("layers.1.w") && e.contains("[101, 75]"), "{e}");
    let mut want_f32 = f32_backend.alloc(m, n, Tag::Activations).unwrap();
    f32_backend.matmul(&xa, &wt, &mut want_f32).unwrap();
    out.data.fill(f32::NAN);
    f32_backend
        .matmul_weight_rows(&xa, "w", &[n, k], WeightRows::Stored(&w), &mut out)
        .unwrap();
    assert!(
        out.data == want_f32.data,
        "stored rows and the tensor give different products"
    );
    let Ok(be) = CpuBackend::with_matmul(Matmul::Bf16) else {
        eprintln!("built weights skipped: this CPU lacks AVX512-BF16");
        return;
    };
    let mut want = be.alloc(m, n, Tag::Activations).unwrap();
    be.matmul(&xa, &wt, &mut want).unwrap();
    let mut got = be.alloc(m, n, Tag::Activations).unwrap();
    got.data.fill(f32::NAN);
    be.matmul_weight_rows(&xa, "w", &[n, k], WeightRows::Built(&build), &mut got)
        .unwrap();
    let same = got
        .data
        .iter()
        .zip(&want.data)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "built and stored weights give different products");
    got.data.fill(f32::NAN);
    be.matmul_weight_rows(&xa, "w", &[n, k], WeightRows::Stored(&w), &mut got)
        .unwrap();
    assert!(
        got.data == want.data,
        "stored rows and the tensor give different products"
    );
}

#[test]
fn unknown_matmul_precision_is_an_error() {
    let e = zoft::backend::cpu::Matmul::parse("fp8")
        .unwrap_err()
        .to_string();
    assert!(e.contains("fp8") && e.contains("f32, bf16 or auto"), "{e}");
}

/// The forward's elementwise loops are compiled for several vector widths and picked at run
/// time; every width must give the same bits. Head size 24 (a 16-lane chunk and a tail) and 40
/// keys (two whole 16-key chunks and a tail) reach every path of the attention.
#[test]
fn every_simd_level_gives_the_same_bits() {
    use zoft::backend::cpu::simd::{force, Level};
    let mut cfg = tiny_config();
    cfg.hidden_size = 48;
    cfg.num_attention_heads = 2;
    cfg.num_key_value_heads = Some(1);
    let m = tiny_model(&cfg, 11);
    let lens = [40usize, 23];
    let ids: Vec<u32> = lens
        .iter()
        .enumerate()
        .flat_map(|(i, &n)| tokens(n, cfg.vocab_size, 20 + i as u64))
        .collect();
    let layout = SeqLayout::packed(&lens);
    let targets: Vec<i32> = ids.iter().map(|&t| (t as i32 * 7) % 61).collect();
    let run = |level| {
        force(level);
        let lp = m
            .target_logprobs(&ids, &layout, &targets, &mut NoHook)
            .unwrap();
        let logits = all_logits(&m, &ids, &layout, &[0, 39, 62]);
        (lp, logits)
    };
    let baseline = run(Level::Baseline);
    for level in [Level::Avx2, Level::Avx512] {
        let wide = run(level);
        assert_eq!(
            wide.0.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            baseline.0.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "{level:?} log-probs"
        );
        assert_eq!(
            wide.1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            baseline.1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "{level:?} logits"
        );
    }
    force(Level::Avx512);
}

/// Asking for the AMX kernel where the CPU or the OS lacks it is refused with the reason.
#[test]
fn amx_kernel_without_amx_says_why() {
    use zoft::backend::cpu::{gemm_amx, Bf16Kernel, CpuBackend};
    let got = CpuBackend::new().with_bf16_kernel(Bf16Kernel::Amx);
    if gemm_amx::available() {
        assert!(got.is_ok());
        return;
    }
    let e = got
        .err()
        .expect("AMX kernel accepted without AMX")
        .to_string();
    assert!(e.contains("AMX-BF16"), "{e}");
}
