//! Accuracy, macro-F1, evaluation results (JSON-serializable) and plain-text tables.

use super::batch::{argmax, Batch};
use super::TaskKind;
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// Fraction of `pred` equal to `gold` (0 for no examples).
pub fn accuracy(gold: &[usize], pred: &[usize]) -> f64 {
    assert_eq!(
        gold.len(),
        pred.len(),
        "gold and predictions differ in length"
    );
    if gold.is_empty() {
        return 0.0;
    }
    gold.iter().zip(pred).filter(|(g, p)| g == p).count() as f64 / gold.len() as f64
}

/// Macro-averaged F1 over the classes that occur in `gold` or `pred` (as scikit-learn's
/// `f1_score(average="macro")`; an undefined precision or recall counts as 0).
pub fn macro_f1(gold: &[usize], pred: &[usize], num_classes: usize) -> f64 {
    let mut c = Confusion::new(num_classes);
    for (&g, &p) in gold.iter().zip(pred) {
        c.add(g, p);
    }
    c.macro_f1()
}

/// A confusion matrix: `counts[gold * n + pred]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confusion {
    pub num_classes: usize,
    pub counts: Vec<u64>,
}

/// Precision, recall, F1 and support of one class.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub name: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Gold examples of this class.
    pub support: u64,
    /// Examples predicted as this class.
    pub predicted: u64,
}

impl Confusion {
    pub fn new(num_classes: usize) -> Self {
        Confusion {
            num_classes,
            counts: vec![0; num_classes * num_classes],
        }
    }

    /// Counts one example; classes beyond `num_classes` grow the matrix.
    pub fn add(&mut self, gold: usize, pred: usize) {
        let need = gold.max(pred) + 1;
        if need > self.num_classes {
            let mut grown = Confusion::new(need);
            for g in 0..self.num_classes {
                for p in 0..self.num_classes {
                    grown.counts[g * need + p] = self.get(g, p);
                }
            }
            *self = grown;
        }
        self.counts[gold * self.num_classes + pred] += 1;
    }

    pub fn get(&self, gold: usize, pred: usize) -> u64 {
        self.counts[gold * self.num_classes + pred]
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn accuracy(&self) -> f64 {
        let t = self.total();
        if t == 0 {
            return 0.0;
        }
        (0..self.num_classes).map(|k| self.get(k, k)).sum::<u64>() as f64 / t as f64
    }

    /// Per-class metrics; `names[k]` names class k (missing names are the index).
    pub fn per_class(&self, names: &[String]) -> Vec<ClassMetrics> {
        let n = self.num_classes;
        (0..n)
            .map(|k| {
                let tp = self.get(k, k) as f64;
                let support: u64 = (0..n).map(|p| self.get(k, p)).sum();
                let predicted: u64 = (0..n).map(|g| self.get(g, k)).sum();
                let precision = if predicted > 0 {
                    tp / predicted as f64
                } else {
                    0.0
                };
                let recall = if support > 0 {
                    tp / support as f64
                } else {
                    0.0
                };
                let f1 = if precision + recall > 0.0 {
                    2.0 * precision * recall / (precision + recall)
                } else {
                    0.0
                };
                let name = names.get(k).cloned().unwrap_or_else(|| k.to_string());
                ClassMetrics {
                    name,
                    precision,
                    recall,
                    f1,
                    support,
                    predicted,
                }
            })
            .collect()
    }

    /// Mean F1 over the classes that occur as gold or prediction.
    pub fn macro_f1(&self) -> f64 {
        let present: Vec<ClassMetrics> = self
            .per_class(&[])
            .into_iter()
            .filter(|c| c.support > 0 || c.predicted > 0)
            .collect();
        if present.is_empty() {
            return 0.0;
        }
        present.iter().map(|c| c.f1).sum::<f64>() / present.len() as f64
    }

    /// Rows are gold classes, columns predictions.
    pub fn rows(&self) -> Vec<Vec<u64>> {
        self.counts
            .chunks(self.num_classes.max(1))
            .map(<[u64]>::to_vec)
            .collect()
    }
}

/// The result of evaluating a model on one split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    pub task: String,
    pub split: String,
    pub examples: usize,
    /// Classification and multiple choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Classification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macro_f1: Option<f64>,
    /// Mean negative log-likelihood per gold-candidate token.
    pub nll: f64,
    /// Classification: one entry per class.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_class: Vec<ClassMetrics>,
    /// Classification: `confusion[gold][pred]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub confusion: Vec<Vec<u64>>,
}

impl EvalResult {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("an EvalResult always serializes")
    }

    /// A plain-text report: the summary line and, for classification, the per-class table.
    pub fn table(&self) -> String {
        let mut out = summary_table(std::slice::from_ref(self));
        if !self.per_class.is_empty() {
            out.push('\n');
            let rows: Vec<Vec<String>> = self
                .per_class
                .iter()
                .map(|c| {
                    vec![
                        c.name.clone(),
                        format!("{:.4}", c.precision),
                        format!("{:.4}", c.recall),
                        format!("{:.4}", c.f1),
                        c.support.to_string(),
                        c.predicted.to_string(),
                    ]
                })
                .collect();
            out.push_str(&format_table(
                &["class", "precision", "recall", "f1", "support", "predicted"],
                &rows,
            ));
        }
        out
    }
}

/// One line per result: task, split, examples, accuracy, macro-F1, NLL.
pub fn summary_table(results: &[EvalResult]) -> String {
    let opt = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.task.clone(),
                r.split.clone(),
                r.examples.to_string(),
                opt(r.accuracy),
                opt(r.macro_f1),
                format!("{:.4}", r.nll),
            ]
        })
        .collect();
    format_table(
        &["task", "split", "examples", "accuracy", "macro_f1", "nll"],
        &rows,
    )
}

/// A plain-text table: the first column left-aligned, the rest right-aligned, a rule under
/// the header.
pub fn format_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let ncol = headers
        .len()
        .max(rows.iter().map(Vec::len).max().unwrap_or(0));
    let mut width = vec![0usize; ncol];
    let cell = |r: &[String], i: usize| r.get(i).cloned().unwrap_or_default();
    for (i, h) in headers.iter().enumerate() {
        width[i] = h.chars().count();
    }
    for r in rows {
        for (i, w) in width.iter_mut().enumerate() {
            *w = (*w).max(cell(r, i).chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    format!("{c:<w$}", w = width[i])
                } else {
                    format!("{c:>w$}", w = width[i])
                }
            })
            .collect();
        parts.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    let rule: Vec<String> = width.iter().map(|&w| "-".repeat(w)).collect();
    out.push_str(&(rule.join("  ") + "\n"));
    for r in rows {
        out.push_str(&line((0..ncol).map(|i| cell(r, i)).collect()));
    }
    out
}

/// Accumulates predictions and gold log-likelihoods over the batches of one split. Batches must
/// lay out every candidate ([`super::Candidates::All`]) for predictions to mean anything.
#[derive(Clone, Debug)]
pub struct Evaluator {
    kind: TaskKind,
    label_names: Vec<String>,
    gold: Vec<usize>,
    pred: Vec<usize>,
    nll_sum: f64,
    nll_tokens: usize,
}

impl Evaluator {
    pub fn new(kind: TaskKind, label_names: &[String]) -> Self {
        Evaluator {
            kind,
            label_names: label_names.to_vec(),
            gold: Vec::new(),
            pred: Vec::new(),
            nll_sum: 0.0,
            nll_tokens: 0,
        }
    }

    /// Adds one batch given the model's log-probabilities for its requests.
    pub fn add(&mut self, batch: &Batch, logprobs: &[f32]) -> Result<()> {
        let scores = batch.candidate_scores(logprobs)?;
        for (e, s) in batch.examples.iter().zip(&scores) {
            self.gold.push(e.gold);
            self.pred.push(argmax(s));
        }
        for (nll, n) in batch.gold_nll(logprobs)? {
            self.nll_sum += nll;
            self.nll_tokens += n;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.gold.len()
    }

    pub fn is_empty(&self) -> bool {
        self.gold.is_empty()
    }

    pub fn predictions(&self) -> &[usize] {
        &self.pred
    }

    pub fn finish(&self, task: &str, split: &str) -> EvalResult {
        let nll = self.nll_sum / self.nll_tokens.max(1) as f64;
        let mut r = EvalResult {
            task: task.into(),
            split: split.into(),
            examples: self.gold.len(),
            accuracy: None,
            macro_f1: None,
            nll,
            per_class: Vec::new(),
            confusion: Vec::new(),
        };
        match self.kind {
            TaskKind::Completion => {}
            TaskKind::MultipleChoice => r.accuracy = Some(accuracy(&self.gold, &self.pred)),
            TaskKind::Classification => {
                let mut c = Confusion::new(self.label_names.len());
                for (&g, &p) in self.gold.iter().zip(&self.pred) {
                    c.add(g, p);
                }
                r.accuracy = Some(c.accuracy());
                r.macro_f1 = Some(c.macro_f1());
                r.per_class = c.per_class(&self.label_names);
                r.confusion = c.rows();
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_layout() {
        let t = format_table(&["a", "bb"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "a    bb\n---  --\nxyz   1\n");
    }

    #[test]
    fn confusion_grows() {
        let mut c = Confusion::new(1);
        c.add(0, 2);
        c.add(1, 1);
        assert_eq!(c.num_classes, 3);
        assert_eq!(c.rows(), vec![vec![0, 0, 1], vec![0, 1, 0], vec![0, 0, 0]]);
        assert_eq!(c.total(), 2);
    }
}
