//! Errors raised while opening a node's storage.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open the sled database at {0}: {1}")]
    Sled(String, #[source] sled::Error),
    #[error("state store ({0}): {1}")]
    State(String, #[source] fjall::Error),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the {0} thread: {1}")]
    Thread(&'static str, #[source] std::io::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl OpenError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        OpenError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
