//! The one error type of the core library. Every variant names the file (as the caller
//! called it) and, where there is one, the tensor key or config field at fault.

use thiserror::Error;

/// Every message is one line: names, keys and reasons that come from a file are shown with
/// their control characters escaped ([`one_line`]).
#[derive(Debug, Error)]
pub enum Error {
    #[error(
        "{}: not a valid safetensors file: {}",
        one_line(file),
        one_line(reason)
    )]
    Safetensors { file: String, reason: String },

    #[error("{}: tensor `{}` is missing", one_line(file), one_line(key))]
    MissingTensor { file: String, key: String },

    #[error(
        "{}: tensor `{}` has shape {found:?}, expected {expected:?}",
        one_line(file),
        one_line(key)
    )]
    TensorShape {
        file: String,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error(
        "{}: tensor `{}` has dtype {dtype}, expected {expected}",
        one_line(file),
        one_line(key)
    )]
    TensorDtype {
        file: String,
        key: String,
        dtype: String,
        expected: String,
    },

    #[error("{}: {}", one_line(file), one_line(reason))]
    Config { file: String, reason: String },

    #[error("{}: tokenizer: {}", one_line(file), one_line(reason))]
    Tokenizer { file: String, reason: String },

    #[error("{}", one_line(.0))]
    Input(String),

    #[error("device: {}", one_line(.0))]
    Device(String),

    /// The progress callback asked to stop (the browser's Stop within an update).
    #[error("cancelled")]
    Cancelled,
}

/// `s` with its control characters (line breaks, tabs, …) escaped as `\n`, `\t`, `\u{..}`.
pub fn one_line(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
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

/// The largest size a config may give for a count of channels, features, heads, layers,
/// tokens, positions or pixels: far above any released model's, and small enough that the
/// products the loaders form (channels × 4, patches², …) cannot overflow. A config is never
/// trusted for an allocation: every tensor is checked against the weights file, and sizes
/// above this are refused before anything is built.
pub const MAX_SIZE: usize = 1 << 20;

impl Error {
    /// Checks that the size `field` of `file` is in `min..=MAX_SIZE`.
    pub fn check_size(file: &str, field: &str, value: usize, min: usize) -> Result<()> {
        if value < min || value > MAX_SIZE {
            return Err(Error::config(
                file,
                format!("`{field}` = {value} is out of range ({min} to {MAX_SIZE})"),
            ));
        }
        Ok(())
    }

    /// Checks that the number `field` of `file` is finite and in `range`.
    pub fn check_number(
        file: &str,
        field: &str,
        value: f64,
        range: std::ops::RangeInclusive<f64>,
    ) -> Result<()> {
        if !(value.is_finite() && range.contains(&value)) {
            return Err(Error::config(
                file,
                format!(
                    "`{field}` = {value} is out of range ({} to {})",
                    range.start(),
                    range.end()
                ),
            ));
        }
        Ok(())
    }
}

/// Parses a JSON config file into `T`. A value of the wrong type is reported with the path of
/// its field (`block_out_channels[1]: invalid value: integer `-1`, expected usize`), a syntax
/// error with its line and column; always on one line.
pub fn from_json<T: serde::de::DeserializeOwned>(file: &str, json: &str) -> Result<T> {
    let mut de = serde_json::Deserializer::from_str(json);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            Error::config(file, inner.to_string())
        } else {
            Error::config(file, format!("`{path}`: {inner}"))
        }
    })?;
    de.end().map_err(|e| Error::config(file, e.to_string()))?;
    Ok(value)
}
