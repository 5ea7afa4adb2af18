//! Model I/O and the LLaMA forward.

pub mod config;
pub mod import;
pub mod safetensors_io;
pub mod tensor;
pub mod weights;

pub use config::LlamaConfig;
pub use tensor::{DType, HostTensor};
pub use weights::{LlamaWeights, ParamKind};
