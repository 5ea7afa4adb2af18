//! Imports the real default model when ZOFT_TEST_GGUF points at its GGUF
//! (SmolLM2-135M-Instruct.Q4_1.gguf) and checks the tokenizer against HF transformers' ids.

use zoft::model::{import_gguf, DType, LlamaConfig, LlamaWeights};
use zoft::tokenizer::{Message, Tokenizer};

#[test]
fn imports_default_model_from_env() {
    let Some(gguf) = std::env::var_os("ZOFT_TEST_GGUF") else {
        println!("skipped: set ZOFT_TEST_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf to run this test");
        return;
    };
    let dir = std::env::temp_dir().join(format!("zoft-test-import-model-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.join("smol");
    let report = import_gguf(std::path::Path::new(&gguf), &out, DType::BF16).unwrap();
    assert_eq!(report.n_tensors, 272);
    assert_eq!(report.n_params, report.config.parameter_count());
    assert!(report.config.tie_word_embeddings);
    assert_eq!(
        (report.config.hidden_size, report.config.num_hidden_layers),
        (576, 30)
    );

    let cfg = LlamaConfig::from_file(&out.join("config.json")).unwrap();
    LlamaWeights::load(&out, &cfg).unwrap();
    let tok = Tokenizer::load(&out, cfg.vocab_size).unwrap();
    let ids = tok
        .encode("Once upon a time, there was a little girl named")
        .unwrap();
    // HF transformers' ids for the same GGUF (AutoTokenizer.from_pretrained(gguf_file=...)).
    assert_eq!(
        ids,
        vec![6403, 1980, 253, 655, 28, 665, 436, 253, 1838, 8180, 3365]
    );
    // Special tokens whole, one digit a token.
    assert_eq!(
        tok.encode("<|im_start|>user\n12345<|im_end|>").unwrap(),
        vec![1, 4093, 198, 33, 34, 35, 36, 37, 2]
    );
    // Unicode, whitespace runs and digits, against HF's ids.
    let cases: [(&str, &[u32]); 3] = [
        (
            "Héllo wörld! 日本語 🤗 naïve",
            &[
                56, 2756, 31394, 267, 29989, 400, 17, 17097, 241, 115, 40993, 179, 120, 248, 15107,
                114, 241, 15486, 46494,
            ],
        ),
        (
            "whitespace   runs\t\ttabs\n\n\nx  \n  ",
            &[
                2499, 2171, 6525, 256, 7313, 197, 197, 100, 7366, 1116, 198, 104, 256, 11181,
            ],
        ),
        (
            "don't I'll 3.14159",
            &[12420, 982, 339, 3060, 216, 35, 30, 33, 36, 33, 37, 41],
        ),
    ];
    for (text, want) in cases {
        assert_eq!(tok.encode(text).unwrap(), want, "{text:?}");
    }
    // The chat template renders as HF renders it (default system prompt included).
    let chat = tok
        .apply_chat_template(&[Message {
            role: "user".into(),
            content: "Hello! Who are you?".into(),
        }])
        .unwrap();
    assert_eq!(
        chat,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHello! Who are you?<|im_end|>\n<|im_start|>assistant\n"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
