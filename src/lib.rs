//! zoft: fine-tune LLaMA-family language models in the memory it takes to run them.
//!
//! The library is what the CLI wraps: load a model (`model`), run it on a backend (`backend`),
//! evaluate it on a task (`data`), and train it with zeroth-order methods (`zo`, `train`).
//! Errors are `anyhow::Error`s whose messages name the file, tensor or line at fault.

pub mod backend;
pub mod cache;
pub mod data;
pub mod device;
pub mod fetch;
pub mod model;
pub mod rng;
pub mod tokenizer;
pub mod train;
pub mod zo;

pub use anyhow::{Error, Result};
