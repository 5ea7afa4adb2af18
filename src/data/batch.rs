//! Batches of examples for any backend, and the losses and predictions computed from the
//! log-probabilities a model returns for them.
//!
//! # The contract with the model
//!
//! A [`Batch`] holds `batch` token sequences right-padded to `seq` tokens (`ids`, row-major
//! `[batch * seq]`, true lengths in `lens`). Flattened position `row = b * seq + t` carries the
//! model's next-token distribution after `ids[b][..=t]`. The model is asked for a list of
//! [`Request`]s, each `(row, token)`, and returns one value per request, in order:
//! `logprobs[i] = log_softmax(logits[requests[i].row])[requests[i].token]`.
//! Only the rows listed in requests need logits at all ([`Batch::gather_plan`] lists them once).
//! Two ways to serve the requests: full logits of those rows through
//! [`Batch::logprobs_from_logits`], or, when no two requests share a row,
//! one `log p(target)` per row for [`Batch::request_targets`] through [`Batch::gather_rows`].
//!
//! [`ExampleSpans`] says which requests belong to which example and candidate: candidate `c` of
//! example `e` is `requests[span.start..span.end]`, its tokens in order, and its log-likelihood
//! given the prompt is their sum.
//!
//! # Sequences
//!
//! When every candidate of an example is one token (`" terrible"` / `" great"`), the example
//! takes one sequence, its prompt, and every candidate is a request at the last prompt position.
//! Otherwise each candidate takes its own sequence `prompt + candidate`, with requests at the
//! positions before each candidate token. With [`Candidates::GoldOnly`] only the gold candidate
//! is laid out (enough for the `lm` loss, half or less of the tokens).
//!
//! `targets[row]` is the gold candidate's token to predict at `row`, or -1: the requests of the
//! gold spans scattered into a per-position vector, for a model that computes the LM loss
//! itself. Where the gold candidate has its own sequence `targets[b*seq + t] = ids[b][t+1]`
//! exactly at its tokens; in the one-sequence case the target sits at the last prompt position
//! (the candidate token is not in `ids`).

use super::Example;
use anyhow::{bail, Result};
use std::ops::Range;

/// `log p(token)` from the next-token distribution at flattened position `row = b * seq + t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub row: u32,
    pub token: u32,
}

/// One candidate's requests: `requests[start..end]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CandidateSpan {
    pub start: u32,
    pub end: u32,
}

impl CandidateSpan {
    pub fn range(&self) -> Range<usize> {
        self.start as usize..self.end as usize
    }

    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// The candidates of one example in a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExampleSpans {
    /// Which of `candidates` is gold (with [`Candidates::GoldOnly`], always 0).
    pub gold: usize,
    /// In the example's candidate order.
    pub candidates: Vec<CandidateSpan>,
}

/// Which candidates to lay out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Candidates {
    /// Every candidate: for evaluation and the `classify` loss.
    All,
    /// Only the gold one: enough for the `lm` loss.
    GoldOnly,
}

/// The padded length of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PadTo {
    /// The longest sequence.
    Longest,
    /// The longest sequence rounded up to a multiple of this.
    Multiple(usize),
    /// Exactly this many positions (fixed shapes, e.g. for captured graphs); longer is an error.
    Fixed(usize),
}

#[derive(Clone, Copy, Debug)]
pub struct BatchOptions {
    /// Token id written into padding positions.
    pub pad_id: u32,
    pub candidates: Candidates,
    pub pad_to: PadTo,
}

impl BatchOptions {
    pub fn new(pad_id: u32, candidates: Candidates) -> Self {
        BatchOptions {
            pad_id,
            candidates,
            pad_to: PadTo::Longest,
        }
    }
}

/// Which loss to train on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// Mean negative log-likelihood over the gold candidate's tokens.
    Lm,
    /// Cross-entropy over candidates scored by summed log-likelihood (MeZO's
    /// `train_as_classification`).
    Classify,
}

impl std::str::FromStr for LossKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "lm" => Ok(LossKind::Lm),
            "classify" | "classification" => Ok(LossKind::Classify),
            _ => bail!("unknown loss {s:?}: expected \"lm\" or \"classify\""),
        }
    }
}

/// A batch of token sequences plus the log-probabilities wanted from them (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Number of sequences.
    pub batch: usize,
    /// Padded length of every sequence.
    pub seq: usize,
    /// `[batch * seq]` token ids, right-padded with the pad id.
    pub ids: Vec<u32>,
    /// True length of each sequence.
    pub lens: Vec<u32>,
    /// `[batch * seq]`: the gold candidate token to predict at each position, or -1.
    pub targets: Vec<i32>,
    /// The log-probabilities the model must return, in this order.
    pub requests: Vec<Request>,
    /// Per example, in the order given: its candidates' spans of `requests`.
    pub examples: Vec<ExampleSpans>,
}

impl Batch {
    /// Lays out `examples` (see the module docs).
    pub fn new(examples: &[&Example], opts: &BatchOptions) -> Result<Batch> {
        if examples.is_empty() {
            bail!("a batch needs at least one example");
        }
        let mut seqs: Vec<Vec<u32>> = Vec::new();
        // (sequence, position, token) before the padded length is known.
        let mut pending: Vec<(usize, usize, u32)> = Vec::new();
        let mut spans = Vec::with_capacity(examples.len());
        let mut gold_ranges = Vec::with_capacity(examples.len());
        let mut owner = Vec::new();
        for (k, ex) in examples.iter().enumerate() {
            if ex.prompt.is_empty() || ex.gold >= ex.candidates.len() {
                bail!(
                    "{}: malformed example (empty prompt or gold index out of range)",
                    ex.origin
                );
            }
            let chosen: Vec<usize> = match opts.candidates {
                Candidates::All => (0..ex.candidates.len()).collect(),
                Candidates::GoldOnly => vec![ex.gold],
            };
            let p = ex.prompt.len();
            let mut cand_spans = Vec::with_capacity(chosen.len());
            let shared_row = if ex.single_token() {
                seqs.push(ex.prompt.clone());
                owner.push(k);
                Some(seqs.len() - 1)
            } else {
                None
            };
            for &c in &chosen {
                let toks = &ex.candidates[c];
                if toks.is_empty() {
                    bail!("{}: candidate {c} has no tokens", ex.origin);
                }
                let s = match shared_row {
                    Some(s) => s,
                    None => {
                        let mut ids = ex.prompt.clone();
                        ids.extend_from_slice(toks);
                        seqs.push(ids);
                        owner.push(k);
                        seqs.len() - 1
                    }
                };
                let start = pending.len() as u32;
                for (i, &tok) in toks.iter().enumerate() {
                    pending.push((s, p - 1 + i, tok));
                }
                let span = CandidateSpan {
                    start,
                    end: pending.len() as u32,
                };
                if c == ex.gold {
                    gold_ranges.push(span.range());
                }
                cand_spans.push(span);
            }
            let gold = chosen
                .iter()
                .position(|&c| c == ex.gold)
                .expect("gold is laid out");
            spans.push(ExampleSpans {
                gold,
                candidates: cand_spans,
            });
        }
        let longest = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let seq = match opts.pad_to {
            PadTo::Longest => longest,
            PadTo::Multiple(m) => longest.div_ceil(m.max(1)) * m.max(1),
            PadTo::Fixed(n) => {
                if let Some(s) = seqs.iter().position(|s| s.len() > n) {
                    bail!(
                        "{}: a sequence of {} tokens does not fit the fixed batch length {n}",
                        examples[owner[s]].origin,
                        seqs[s].len()
                    );
                }
                n
            }
        };
        let batch = seqs.len();
        let mut ids = vec![opts.pad_id; batch * seq];
        let mut lens = Vec::with_capacity(batch);
        for (b, s) in seqs.iter().enumerate() {
            ids[b * seq..b * seq + s.len()].copy_from_slice(s);
            lens.push(s.len() as u32);
        }
        let requests: Vec<Request> = pending
            .iter()
            .map(|&(s, t, token)| Request {
                row: (s * seq + t) as u32,
                token,
            })
            .collect();
        let mut targets = vec![-1i32; batch * seq];
        for r in gold_ranges {
            for q in &requests[r] {
                targets[q.row as usize] = q.token as i32;
            }
        }
        Ok(Batch {
            batch,
            seq,
            ids,
            lens,
            targets,
            requests,
            examples: spans,
        })
    }

    /// [`Batch::new`] for `data[indices[..]]`.
    pub fn from_indices(data: &[Example], indices: &[usize], opts: &BatchOptions) -> Result<Batch> {
        let mut refs = Vec::with_capacity(indices.len());
        for &i in indices {
            let Some(ex) = data.get(i) else {
                bail!(
                    "example index {i} is out of range for a data set of {}",
                    data.len()
                );
            };
            refs.push(ex);
        }
        Batch::new(&refs, opts)
    }

    /// Tokens actually present (sum of `lens`).
    pub fn num_tokens(&self) -> usize {
        self.lens.iter().map(|&l| l as usize).sum()
    }

    /// The distinct rows that need logits, ascending, and for each request the index of its row
    /// in that list: compute hidden states and logits only for those rows, then gather.
    pub fn gather_plan(&self) -> (Vec<u32>, Vec<u32>) {
        let mut rows: Vec<u32> = self.requests.iter().map(|r| r.row).collect();
        rows.sort_unstable();
        rows.dedup();
        let which = self
            .requests
            .iter()
            .map(|r| rows.binary_search(&r.row).expect("row is listed") as u32)
            .collect();
        (rows, which)
    }

    /// The requests as a per-row target vector (`[batch * seq]`, -1 where nothing is asked),
    /// for a model that returns `log p(target)` per row: possible when no two requests share a
    /// row, which holds for every example laid out one sequence per candidate and for
    /// [`Candidates::GoldOnly`]; `None` when one-token candidates share their prompt's row
    /// (then use [`Batch::logprobs_from_logits`] on the rows of [`Batch::gather_plan`]).
    pub fn request_targets(&self) -> Option<Vec<i32>> {
        let mut t = vec![-1i32; self.batch * self.seq];
        for r in &self.requests {
            let slot = &mut t[r.row as usize];
            if *slot >= 0 {
                return None;
            }
            *slot = r.token as i32;
        }
        Some(t)
    }

    /// The requests' log-probabilities picked out of a per-row vector computed for
    /// [`Batch::request_targets`] (`per_row[row] = log p(target[row])`).
    pub fn gather_rows(&self, per_row: &[f32]) -> Result<Vec<f32>> {
        if per_row.len() != self.batch * self.seq {
            bail!(
                "got {} per-row log-probabilities for a batch of {} x {} positions",
                per_row.len(),
                self.batch,
                self.seq
            );
        }
        if self.request_targets().is_none() {
            bail!("requests share rows, so one value per row cannot serve them; use logprobs_from_logits");
        }
        Ok(self
            .requests
            .iter()
            .map(|r| per_row[r.row as usize])
            .collect())
    }

    /// The requests' log-probabilities from full logits of the rows of [`Batch::gather_plan`]
    /// (`logits` is `[rows.len() x vocab]`, row-major, in that order): log-softmax per row, then
    /// gather.
    pub fn logprobs_from_logits(&self, logits: &[f32], vocab: usize) -> Result<Vec<f32>> {
        let (rows, which) = self.gather_plan();
        if logits.len() != rows.len() * vocab {
            bail!(
                "got {} logits for {} rows of a {vocab}-token vocabulary",
                logits.len(),
                rows.len()
            );
        }
        let lse: Vec<f64> = logits
            .chunks(vocab.max(1))
            .map(|row| {
                let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
                m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
            })
            .collect();
        let mut out = Vec::with_capacity(self.requests.len());
        for (r, &k) in self.requests.iter().zip(&which) {
            if r.token as usize >= vocab {
                bail!("token id {} is outside the vocabulary of {vocab}", r.token);
            }
            let k = k as usize;
            out.push((logits[k * vocab + r.token as usize] as f64 - lse[k]) as f32);
        }
        Ok(out)
    }

    fn check(&self, logprobs: &[f32]) -> Result<()> {
        if logprobs.len() != self.requests.len() {
            bail!(
                "got {} log-probabilities for a batch with {} requests",
                logprobs.len(),
                self.requests.len()
            );
        }
        Ok(())
    }

    /// Summed log-likelihood of each candidate of each example.
    pub fn candidate_scores(&self, logprobs: &[f32]) -> Result<Vec<Vec<f64>>> {
        self.check(logprobs)?;
        Ok(self
            .examples
            .iter()
            .map(|e| {
                e.candidates
                    .iter()
                    .map(|s| logprobs[s.range()].iter().map(|&x| x as f64).sum())
                    .collect()
            })
            .collect())
    }

    /// Per example: (negative log-likelihood of the gold candidate, its token count).
    pub fn gold_nll(&self, logprobs: &[f32]) -> Result<Vec<(f64, usize)>> {
        self.check(logprobs)?;
        Ok(self
            .examples
            .iter()
            .map(|e| {
                let s = e.candidates[e.gold];
                (
                    -logprobs[s.range()].iter().map(|&x| x as f64).sum::<f64>(),
                    s.len(),
                )
            })
            .collect())
    }

    /// Mean negative log-likelihood over all gold-candidate tokens of the batch.
    pub fn lm_loss(&self, logprobs: &[f32]) -> Result<f64> {
        let per = self.gold_nll(logprobs)?;
        let (sum, n) = per
            .iter()
            .fold((0.0, 0usize), |(s, n), &(x, k)| (s + x, n + k));
        Ok(sum / n.max(1) as f64)
    }

    /// Mean over examples of the cross-entropy of the gold candidate under a softmax over the
    /// candidates' summed log-likelihoods. Needs [`Candidates::All`] and two or more candidates.
    pub fn classify_loss(&self, logprobs: &[f32]) -> Result<f64> {
        let scores = self.candidate_scores(logprobs)?;
        let mut total = 0.0;
        for (e, s) in self.examples.iter().zip(&scores) {
            if s.len() < 2 {
                bail!(
                    "the classify loss needs every candidate of each example laid out \
                     (Candidates::All) and at least two candidates; an example has {}",
                    s.len()
                );
            }
            total += log_sum_exp(s) - s[e.gold];
        }
        Ok(total / scores.len() as f64)
    }

    pub fn loss(&self, kind: LossKind, logprobs: &[f32]) -> Result<f64> {
        match kind {
            LossKind::Lm => self.lm_loss(logprobs),
            LossKind::Classify => self.classify_loss(logprobs),
        }
    }

    /// The highest-scoring candidate of each example (ties go to the lower index).
    pub fn predictions(&self, logprobs: &[f32]) -> Result<Vec<usize>> {
        Ok(self
            .candidate_scores(logprobs)?
            .iter()
            .map(|s| argmax(s))
            .collect())
    }
}

/// Index of the largest value (the first of equals; NaN never wins).
pub fn argmax(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] || xs[best].is_nan() {
            best = i;
        }
    }
    best
}

/// `log(sum(exp(xs)))` without overflow.
pub fn log_sum_exp(xs: &[f64]) -> f64 {
    let m = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return m;
    }
    m + xs.iter().map(|&x| (x - m).exp()).sum::<f64>().ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Origin;
    use std::path::PathBuf;

    fn ex(prompt: &[u32], cands: &[&[u32]], gold: usize) -> Example {
        Example {
            origin: Origin {
                file: PathBuf::from("t.jsonl"),
                line: 1,
            },
            prompt: prompt.to_vec(),
            candidates: cands.iter().map(|c| c.to_vec()).collect(),
            gold,
        }
    }

    #[test]
    fn log_sum_exp_and_argmax() {
        assert!((log_sum_exp(&[0.0, 0.0]) - 2f64.ln()).abs() < 1e-12);
        assert!((log_sum_exp(&[1000.0, 1000.0]) - (1000.0 + 2f64.ln())).abs() < 1e-9);
        assert_eq!(log_sum_exp(&[f64::NEG_INFINITY; 2]), f64::NEG_INFINITY);
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f64::NAN, -1.0]), 1);
    }

    #[test]
    fn logits_and_per_row_paths_agree() {
        let a = ex(&[1, 2], &[&[3], &[0]], 0);
        let b = ex(&[1], &[&[2, 3], &[1]], 1);
        let all = Batch::new(&[&a, &b], &BatchOptions::new(0, Candidates::All)).unwrap();
        // a's two candidates share a row.
        assert!(all.request_targets().is_none());
        assert!(all.gather_rows(&vec![0.0; all.batch * all.seq]).is_err());
        let vocab = 4;
        let (rows, _) = all.gather_plan();
        let logits: Vec<f32> = (0..rows.len() * vocab)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let lp = all.logprobs_from_logits(&logits, vocab).unwrap();
        let by_hand = |k: usize, tok: usize| {
            let row = &logits[k * vocab..(k + 1) * vocab];
            let z: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
            (row[tok] as f64 - z.ln()) as f32
        };
        for (i, r) in all.requests.iter().enumerate() {
            let k = rows.iter().position(|&x| x == r.row).unwrap();
            assert!((lp[i] - by_hand(k, r.token as usize)).abs() < 1e-6);
        }
        assert!(all.logprobs_from_logits(&logits[1..], vocab).is_err());

        let multi = Batch::new(&[&b], &BatchOptions::new(0, Candidates::All)).unwrap();
        let t = multi.request_targets().unwrap();
        let per_row: Vec<f32> = (0..t.len()).map(|i| -(i as f32)).collect();
        let got = multi.gather_rows(&per_row).unwrap();
        let want: Vec<f32> = multi.requests.iter().map(|r| -(r.row as f32)).collect();
        assert_eq!(got, want);
        for r in &multi.requests {
            assert_eq!(t[r.row as usize], r.token as i32);
        }
    }

    #[test]
    fn pad_to_and_plan() {
        let a = ex(&[5, 6, 7], &[&[1], &[2]], 1);
        let b = ex(&[8], &[&[3, 4], &[9]], 0);
        let mut o = BatchOptions::new(0, Candidates::All);
        o.pad_to = PadTo::Multiple(4);
        let bt = Batch::new(&[&a, &b], &o).unwrap();
        assert_eq!((bt.batch, bt.seq), (3, 4));
        let (rows, which) = bt.gather_plan();
        // a: row 2 twice; b cand 0: rows 4, 5; b cand 1: row 8.
        assert_eq!(rows, vec![2, 4, 5, 8]);
        assert_eq!(which, vec![0, 0, 1, 2, 3]);
        o.pad_to = PadTo::Fixed(2);
        let e = Batch::new(&[&a, &b], &o).unwrap_err().to_string();
        assert!(
            e.contains("t.jsonl:1") && e.contains("fixed batch length 2"),
            "{e}"
        );
    }
}
