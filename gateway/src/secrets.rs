//! Provider API keys, by reference only. `apiKey: ${API_KEY}` expands from
//! the key `API_KEY` of the watched provider-keys Secret on Kubernetes
//! (never from the gateway's environment there), from the environment
//! elsewhere; `apiKey: ${file:name}` reads a file of the one `--key-dir`
//! (a mounted Secret; `..` and symlinks out of it are refused), re-read
//! when it changes. Literal keys are refused on Kubernetes. A key is held
//! in `Secret`, whose Debug and Display never show it.

use std::{
    fmt,
    path::{Component, Path, PathBuf},
    sync::Arc,
};

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
    #[error("the provider-keys Secret has no key {0}: add it (kubectl -n <gateway namespace> create secret generic llm-egress-provider-keys --from-literal={0}=...); on Kubernetes ${{NAME}} never reads the gateway's environment")]
    MissingSecretKey(String),
    #[error("key file {0} cannot be read: {1}")]
    File(PathBuf, String),
    #[error("key file {0} is empty")]
    EmptyFile(PathBuf),
    #[error("key file {path} is outside the key directory {dir}: ${{file:}} may only name a file in --key-dir (no `..`, no symlink out of it)")]
    OutsideKeyDir { path: PathBuf, dir: PathBuf },
    #[error("${{file:}} references are off: start the gateway with --key-dir DIR (the mounted key Secret) to use them")]
    NoKeyDir,
    #[error("a literal apiKey is refused on Kubernetes (anyone who can read the resource can read it): put the key into the provider-keys Secret and write ${{NAME}}")]
    Literal,
    #[error("{0:?} is not a valid reference: use ${{NAME}} or ${{file:/path}}")]
    BadReference(String),
    #[error("the key is empty")]
    Empty,
}

/// Where keys may come from.
#[derive(Debug, Clone, Default)]
pub struct KeyPolicy {
    /// Kubernetes mode: `${NAME}` only from the provider-keys Secret, and no
    /// literal keys.
    pub kubernetes: bool,
    /// The only directory `${file:}` may read from (canonical form).
    pub key_dir: Option<PathBuf>,
}

/// Files a set of keys was read from, so that the watcher can notice changes.
pub fn referenced_file(raw: &str) -> Option<PathBuf> {
    raw.trim()
        .strip_prefix("${file:")
        .and_then(|r| r.strip_suffix('}'))
        .map(PathBuf::from)
}

/// `path` resolved (symlinks included) inside `dir`, or why not. A relative
/// path is taken relative to `dir`.
fn confined(path: &Path, dir: &Path) -> Result<PathBuf, SecretError> {
    let outside = || SecretError::OutsideKeyDir {
        path: path.to_owned(),
        dir: dir.to_owned(),
    };
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(outside());
    }
    let joined = dir.join(path);
    let real = joined
        .canonicalize()
        .map_err(|e| SecretError::File(path.to_owned(), e.kind().to_string()))?;
    let root = dir
        .canonicalize()
        .map_err(|e| SecretError::File(dir.to_owned(), e.kind().to_string()))?;
    if !real.starts_with(&root) || !real.is_file() {
        return Err(outside());
    }
    Ok(real)
}

/// Resolves an `apiKey` value: `${NAME}`, `${file:/path}`, or a literal,
/// as `policy` allows. `lookup` gives `${NAME}`: the Secret's key on
/// Kubernetes, the environment elsewhere.
pub fn resolve(
    raw: &str,
    policy: &KeyPolicy,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Secret, SecretError> {
    let raw = raw.trim();
    let value = if let Some(path) = referenced_file(raw) {
        let dir = policy.key_dir.as_ref().ok_or(SecretError::NoKeyDir)?;
        let real = confined(&path, dir)?;
        let text = std::fs::read_to_string(&real)
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
        lookup(inner).ok_or_else(|| {
            if policy.kubernetes {
                SecretError::MissingSecretKey(inner.into())
            } else {
                SecretError::MissingEnv(inner.into())
            }
        })?
    } else if raw.contains("${") {
        return Err(SecretError::BadReference("<value with ${ … }>".into()));
    } else if policy.kubernetes && !raw.is_empty() {
        return Err(SecretError::Literal);
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

    fn plain() -> KeyPolicy {
        KeyPolicy::default()
    }

    fn with_dir(dir: &Path) -> KeyPolicy {
        KeyPolicy {
            kubernetes: false,
            key_dir: Some(dir.to_owned()),
        }
    }

    #[test]
    fn expands_environment_variables() {
        assert_eq!(
            resolve("${API_KEY}", &plain(), env).unwrap().expose(),
            "sk-test-123"
        );
        assert_eq!(
            resolve("${OTHER}", &plain(), env).unwrap_err(),
            SecretError::MissingEnv("OTHER".into())
        );
    }

    #[test]
    fn reads_key_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key");
        std::fs::write(&f, "sk-from-file\n").unwrap();
        let raw = format!("${{file:{}}}", f.display());
        let policy = with_dir(dir.path());
        assert_eq!(resolve(&raw, &policy, env).unwrap().expose(), "sk-from-file");
        assert_eq!(
            resolve("${file:key}", &policy, env).unwrap().expose(),
            "sk-from-file"
        );
        assert_eq!(referenced_file(&raw), Some(f.clone()));
        std::fs::write(&f, "\n").unwrap();
        assert!(matches!(
            resolve(&raw, &policy, env),
            Err(SecretError::EmptyFile(_))
        ));
        // No key directory configured: no files at all.
        assert_eq!(resolve(&raw, &plain(), env).unwrap_err(), SecretError::NoKeyDir);
    }

    #[test]
    fn bad_references_are_errors_without_the_value() {
        let err = resolve("sk-${broken", &plain(), env).unwrap_err().to_string();
        assert!(!err.contains("sk-"), "{err}");
        assert!(resolve("${a-b}", &plain(), env).is_err());
    }

    #[test]
    fn key_files_are_confined_to_the_key_directory() {
        let root = tempfile::tempdir().unwrap();
        let keys = root.path().join("keys");
        std::fs::create_dir(&keys).unwrap();
        let outside = root.path().join("token");
        std::fs::write(&outside, "service-account-token").unwrap();
        std::fs::write(keys.join("API_KEY"), "sk-in-dir").unwrap();
        // Kubernetes mounts a Secret as symlinks inside the directory: fine.
        std::fs::create_dir(keys.join("..data")).unwrap();
        std::fs::write(keys.join("..data/OTHER"), "sk-other").unwrap();
        std::os::unix::fs::symlink("..data/OTHER", keys.join("OTHER")).unwrap();
        std::os::unix::fs::symlink(&outside, keys.join("escape")).unwrap();
        let policy = with_dir(&keys);
        assert_eq!(
            resolve("${file:OTHER}", &policy, env).unwrap().expose(),
            "sk-other"
        );
        for raw in [
            format!("${{file:{}}}", outside.display()),
            "${file:../token}".to_string(),
            format!("${{file:{}/../token}}", keys.display()),
            "${file:escape}".to_string(),
            "${file:/etc/hostname}".to_string(),
            "${file:..data}".to_string(),
        ] {
            let err = resolve(&raw, &policy, env).unwrap_err();
            assert!(matches!(err, SecretError::OutsideKeyDir { .. }), "{raw}: {err}");
            assert!(!err.to_string().contains("service-account-token"));
        }
    }

    #[test]
    fn kubernetes_takes_names_from_the_secret_only_and_refuses_literals() {
        let policy = KeyPolicy {
            kubernetes: true,
            key_dir: None,
        };
        let secret = |k: &str| (k == "API_KEY").then(|| "sk-from-secret".to_string());
        assert_eq!(
            resolve("${API_KEY}", &policy, secret).unwrap().expose(),
            "sk-from-secret"
        );
        assert_eq!(
            resolve("${HOME}", &policy, secret).unwrap_err(),
            SecretError::MissingSecretKey("HOME".into())
        );
        let err = resolve("sk-literal-key", &policy, secret).unwrap_err();
        assert_eq!(err, SecretError::Literal);
        assert!(!err.to_string().contains("sk-literal"));
        // Outside Kubernetes a literal stays allowed (the operator's files).
        assert_eq!(
            resolve("sk-literal", &plain(), env).unwrap().expose(),
            "sk-literal"
        );
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("sk-very-secret");
        assert!(!format!("{s:?} {s}").contains("sk-very"));
    }
}
