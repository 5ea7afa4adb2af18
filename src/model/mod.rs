//! Model I/O and the LLaMA forward.

pub mod config;
pub mod generate;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod import;
pub mod llama;
pub mod load;
pub mod safetensors_io;
pub mod tensor;
pub mod weights;

pub use config::LlamaConfig;
pub use import::{import_gguf, ImportReport};
pub use llama::{KvCache, Llama};
pub use tensor::{DType, HostTensor};
pub use weights::{LlamaWeights, ParamKind};
