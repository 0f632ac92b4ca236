//! Provider API keys. `apiKey: ${API_KEY}` expands from the key `API_KEY`
//! of the watched Secret (Kubernetes) or else from the gateway's environment; `apiKey: ${file:/path}` reads a mounted Secret (re-read when
//! the configuration is reloaded, which a change of the file triggers). A
//! key is held in `Secret`, whose Debug and Display never show it.

use std::{fmt, path::PathBuf, sync::Arc};

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<Arc<str>>) -> Secret {
        Secret(value.into())
    }

    /// The key itself; call only where it is sent upstream.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("{0} is not set: on Kubernetes add the key {0} to the gateway's --api-key-secret Secret (kubectl -n <gateway namespace> create secret generic llm-egress-provider-keys --from-literal={0}=...); elsewhere set the environment variable {0}")]
    MissingEnv(String),
    #[error("key file {0} cannot be read: {1}")]
    File(PathBuf, String),
    #[error("key file {0} is empty")]
    EmptyFile(PathBuf),
    #[error("{0:?} is not a valid reference: use ${{NAME}} or ${{file:/path}}")]
    BadReference(String),
    #[error("the key is empty")]
    Empty,
}

/// Files a set of keys was read from, so that the watcher can notice changes.
pub fn referenced_file(raw: &str) -> Option<PathBuf> {
    raw.trim()
        .strip_prefix("${file:")
        .and_then(|r| r.strip_suffix('}'))
        .map(PathBuf::from)
}

/// Resolves an `apiKey` value: `${NAME}`, `${file:/path}`, or a literal.
pub fn resolve(raw: &str, env: impl Fn(&str) -> Option<String>) -> Result<Secret, SecretError> {
    let raw = raw.trim();
    let value = if let Some(path) = referenced_file(raw) {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| SecretError::File(path.clone(), e.kind().to_string()))?;
        let key = text.trim().to_string();
        if key.is_empty() {
            return Err(SecretError::EmptyFile(path));
        }
        key
    } else if let Some(inner) = raw.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
        if inner.is_empty() || !inner.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(SecretError::BadReference(raw.into()));
        }
        env(inner).ok_or_else(|| SecretError::MissingEnv(inner.into()))?
    } else if raw.contains("${") {
        return Err(SecretError::BadReference("<value with ${ … }>".into()));
    } else {
        raw.to_string()
    };
    if value.is_empty() {
        return Err(SecretError::Empty);
    }
    Ok(Secret::new(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "API_KEY").then(|| "sk-test-123".to_string())
    }

    #[test]
    fn expands_environment_variables() {
        assert_eq!(resolve("${API_KEY}", env).unwrap().expose(), "sk-test-123");
        assert_eq!(
            resolve("${OTHER}", env).unwrap_err(),
            SecretError::MissingEnv("OTHER".into())
        );
    }

    #[test]
    fn reads_key_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key");
        std::fs::write(&f, "sk-from-file\n").unwrap();
        let raw = format!("${{file:{}}}", f.display());
        assert_eq!(resolve(&raw, env).unwrap().expose(), "sk-from-file");
        assert_eq!(referenced_file(&raw), Some(f.clone()));
        std::fs::write(&f, "\n").unwrap();
        assert!(matches!(resolve(&raw, env), Err(SecretError::EmptyFile(_))));
    }

    #[test]
    fn bad_references_are_errors_without_the_value() {
        let err = resolve("sk-${broken", env).unwrap_err().to_string();
        assert!(!err.contains("sk-"), "{err}");
        assert!(resolve("${a-b}", env).is_err());
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("sk-very-secret");
        assert!(!format!("{s:?} {s}").contains("sk-very"));
    }
}
