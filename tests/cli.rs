//! The command line's device, precision and method choices: errors that say what was wrong,
//! before any model is read.

mod common;
use std::process::Command;
use zoft::model::DType;

fn zoft(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_zoft"))
        .args(args)
        .env("ZOFT_HOME", std::env::temp_dir().join("zoft-cli-test-home"))
        .output()
        .expect("running zoft");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unknown_device_is_a_clear_error() {
    for cmd in ["train", "eval", "generate"] {
        let mut args = vec![cmd, "--device", "tpu"];
        if cmd == "generate" {
            args.push("hello");
        }
        let (ok, err) = zoft(&args);
        assert!(!ok, "{cmd} accepted --device tpu");
        assert!(
            err.contains("unknown device \"tpu\": expected cpu, cuda or auto"),
            "{cmd}: {err}"
        );
    }
}

#[test]
fn cuda_without_a_usable_device_says_why() {
    let Err(reason) = zoft::device::cuda_status() else {
        eprintln!("skipped: a CUDA device is present here");
        return;
    };
    let (ok, err) = zoft(&["eval", "--device", "cuda"]);
    assert!(!ok, "--device cuda succeeded without a device");
    assert!(err.contains(&format!("--device cuda: {reason}")), "{err}");
}

#[test]
fn emulated_cuda_without_a_compiler_says_why() {
    let out = Command::new(env!("CARGO_BIN_EXE_zoft"))
        .args(["eval", "--device", "cuda"])
        .env("ZOFT_HOME", std::env::temp_dir().join("zoft-cli-test-home"))
        .env("ZOFT_CUDA_EMULATOR", "1")
        .env("CXX", "/nonexistent/c++")
        // A missing compiler is a failure, not an explanation, where kernels are required.
        .env_remove("ZOFT_REQUIRE_KERNELS")
        .output()
        .expect("running zoft");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "--device cuda succeeded without a compiler"
    );
    assert!(
        err.contains("--device cuda: ZOFT_CUDA_EMULATOR=1, but there is no C++ compiler"),
        "{err}"
    );
}

#[test]
fn unknown_matmul_precision_is_a_clear_error() {
    let (ok, err) = zoft(&["eval", "--matmul", "fp8"]);
    assert!(!ok, "eval accepted --matmul fp8");
    assert!(
        err.contains("unknown matmul precision \"fp8\": expected f32, bf16 or auto"),
        "{err}"
    );
}

#[test]
fn bf16_matmul_without_avx512_bf16_says_why() {
    if zoft::backend::cpu::gemm_bf16::available() {
        eprintln!("skipped: this CPU has AVX512-BF16");
        return;
    }
    let (ok, err) = zoft(&["eval", "--matmul", "bf16"]);
    assert!(!ok, "--matmul bf16 ran on a CPU without AVX512-BF16");
    assert!(err.contains("needs a CPU with AVX512-BF16"), "{err}");
}

#[test]
fn unknown_perturb_mode_is_a_clear_error() {
    let (ok, err) = zoft(&["train", "--perturb", "sideways"]);
    assert!(!ok, "train accepted --perturb sideways");
    assert!(
        err.contains("unknown perturb mode \"sideways\": expected inplace, fused, paired or auto"),
        "{err}"
    );
}

#[test]
fn sparse_mezo_in_place_is_refused_and_auto_is_accepted() {
    let (ok, err) = zoft(&["train", "--method", "sparse-mezo", "--perturb", "inplace"]);
    assert!(!ok, "train accepted sparse-mezo in place");
    assert!(
        err.contains("sparse-mezo runs only with --perturb fused"),
        "{err}"
    );
    // The defaults (Sparse-MeZO, perturb auto) pass the checks and get as far as the model.
    let missing = std::env::temp_dir().join("zoft-cli-test-no-such-model");
    let (ok, err) = zoft(&[
        "train",
        "--device",
        "cpu",
        "--model",
        missing.to_str().unwrap(),
    ]);
    assert!(!ok, "train ran without a model");
    assert!(err.contains("zoft-cli-test-no-such-model"), "{err}");
    assert!(!err.contains("perturb"), "{err}");
}

/// `zoft init` writes config.json with the dtype of the weights it wrote, whatever the
/// config it started from says, so that HF transformers' dtype="auto" loads them as written.
#[test]
fn init_config_names_the_dtype_it_wrote() {
    let dir = common::scratch_dir("cli-init");
    let mut cfg = common::tiny_config();
    cfg.torch_dtype = Some("bfloat16".into());
    let src = dir.join("source.json");
    std::fs::write(&src, serde_json::to_string(&cfg).unwrap()).unwrap();
    for (dtype, hf, st) in [
        ("f32", "float32", DType::F32),
        ("f16", "float16", DType::F16),
    ] {
        let out = dir.join(dtype);
        let (ok, err) = zoft(&[
            "init",
            "--config",
            src.to_str().unwrap(),
            "--dtype",
            dtype,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "zoft init --dtype {dtype}: {err}");
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(written["torch_dtype"], hf, "--dtype {dtype}");
        let tensors =
            zoft::model::safetensors_io::load_file(&out.join("model.safetensors")).unwrap();
        assert!(
            tensors.values().all(|t| t.dtype == st),
            "--dtype {dtype}: some tensors are not {st:?}"
        );
    }
}
