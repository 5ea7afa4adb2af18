//! Tasks, prompt templates, batching and metrics.
