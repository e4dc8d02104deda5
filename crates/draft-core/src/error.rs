//! The one error type of the core library. Every variant names the file (as the caller
//! called it) and, where there is one, the tensor key or config field at fault.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("{file}: not a valid safetensors file: {reason}")]
    Safetensors { file: String, reason: String },

    #[error("{file}: tensor `{key}` is missing")]
    MissingTensor { file: String, key: String },

    #[error("{file}: tensor `{key}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        file: String,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("{file}: tensor `{key}` has dtype {dtype}, expected {expected}")]
    TensorDtype {
        file: String,
        key: String,
        dtype: String,
        expected: String,
    },

    #[error("{file}: {reason}")]
    Config { file: String, reason: String },

    #[error("{file}: tokenizer: {reason}")]
    Tokenizer { file: String, reason: String },

    #[error("{0}")]
    Input(String),

    #[error("device: {0}")]
    Device(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn config(file: &str, reason: impl Into<String>) -> Self {
        Error::Config {
            file: file.to_string(),
            reason: reason.into(),
        }
    }
}
