//! Memory accounting by category. Every backend allocation is tagged; the counters keep the
//! current and peak bytes per tag (read by `zoft info`, the trainer's log and bench-mem).

use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tag {
    Weights,
    Activations,
    Scratch,
    Optimizer,
    Gradients,
    Adapters,
}

pub const TAGS: [Tag; 6] = [
    Tag::Weights,
    Tag::Activations,
    Tag::Scratch,
    Tag::Optimizer,
    Tag::Gradients,
    Tag::Adapters,
];

impl Tag {
    pub fn name(self) -> &'static str {
        match self {
            Tag::Weights => "weights",
            Tag::Activations => "activations",
            Tag::Scratch => "scratch",
            Tag::Optimizer => "optimizer",
            Tag::Gradients => "gradients",
            Tag::Adapters => "adapters",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// Current and peak bytes per tag, plus the peak of the total.
#[derive(Default)]
pub struct MemCounters {
    current: [AtomicUsize; 6],
    peak: [AtomicUsize; 6],
    total: AtomicUsize,
    total_peak: AtomicUsize,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct MemReport {
    pub current: Vec<(String, usize)>,
    pub peak: Vec<(String, usize)>,
    pub total: usize,
    pub total_peak: usize,
}

impl MemCounters {
    pub fn add(&self, tag: Tag, bytes: usize) {
        let i = tag.index();
        let now = self.current[i].fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak[i].fetch_max(now, Ordering::Relaxed);
        let total = self.total.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.total_peak.fetch_max(total, Ordering::Relaxed);
    }

    pub fn sub(&self, tag: Tag, bytes: usize) {
        self.current[tag.index()].fetch_sub(bytes, Ordering::Relaxed);
        self.total.fetch_sub(bytes, Ordering::Relaxed);
    }

    pub fn current(&self, tag: Tag) -> usize {
        self.current[tag.index()].load(Ordering::Relaxed)
    }

    pub fn peak(&self, tag: Tag) -> usize {
        self.peak[tag.index()].load(Ordering::Relaxed)
    }

    /// Starts a new peak window (e.g. per step) from the current values.
    pub fn reset_peaks(&self) {
        for i in 0..6 {
            self.peak[i].store(self.current[i].load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.total_peak
            .store(self.total.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    pub fn report(&self) -> MemReport {
        MemReport {
            current: TAGS
                .iter()
                .map(|t| (t.name().to_string(), self.current(*t)))
                .collect(),
            peak: TAGS
                .iter()
                .map(|t| (t.name().to_string(), self.peak(*t)))
                .collect(),
            total: self.total.load(Ordering::Relaxed),
            total_peak: self.total_peak.load(Ordering::Relaxed),
        }
    }
}
