//! SPIFFE identities (`spiffe://<trust domain>/ns/<ns>/sa/<sa>`) and the
//! Istio principal form policies use (`<trust domain>/ns/<ns>/sa/<sa>`).

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    path: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("{0:?} is not a SPIFFE ID: expected spiffe://<trust domain>/<path>")]
    NotSpiffe(String),
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<SpiffeId, IdentityError> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::NotSpiffe(s.into()))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| IdentityError::NotSpiffe(s.into()))?;
        let td_ok = !td.is_empty()
            && td
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        let path_ok = !path.is_empty()
            && !path.contains("//")
            && !path.ends_with('/')
            && !path.contains(char::is_whitespace);
        if !td_ok || !path_ok {
            return Err(IdentityError::NotSpiffe(s.into()));
        }
        Ok(SpiffeId {
            trust_domain: td.to_ascii_lowercase(),
            path: format!("/{path}"),
        })
    }

    /// The Kubernetes workload identity `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn workload(trust_domain: &str, namespace: &str, service_account: &str) -> SpiffeId {
        SpiffeId {
            trust_domain: trust_domain.to_ascii_lowercase(),
            path: format!("/ns/{namespace}/sa/{service_account}"),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Istio's principal: the SPIFFE ID without the scheme.
    pub fn principal(&self) -> String {
        format!("{}{}", self.trust_domain, self.path)
    }

    fn segment(&self, key: &str) -> Option<&str> {
        let mut parts = self.path.trim_start_matches('/').split('/');
        while let Some(k) = parts.next() {
            let v = parts.next()?;
            if k == key {
                return Some(v);
            }
        }
        None
    }

    pub fn namespace(&self) -> Option<&str> {
        self.segment("ns")
    }

    pub fn service_account(&self) -> Option<&str> {
        self.segment("sa")
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

/// The SPIFFE ID in a certificate's URI SANs, if it has exactly one.
pub fn spiffe_from_cert(der: &[u8]) -> Option<SpiffeId> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => SpiffeId::parse(u).ok(),
        _ => None,
    });
    let first = ids.next()?;
    // More than one SPIFFE ID is invalid per the SPIFFE X.509-SVID spec.
    ids.next().is_none().then_some(first)
}

/// The URI SAN prefix that names the node an agent certificate belongs to
/// (static mode: the gateway lets that node assert only its mapped workloads).
pub const NODE_URI_PREFIX: &str = "urn:llm-egress:node:";

/// The node named in a certificate's URI SANs, if exactly one is.
pub fn node_from_cert(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut nodes = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => u
            .strip_prefix(NODE_URI_PREFIX)
            .filter(|n| is_node_name(n))
            .map(str::to_string),
        _ => None,
    });
    let first = nodes.next()?;
    nodes.next().is_none().then_some(first)
}

/// A Kubernetes node name: a DNS subdomain.
pub fn is_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_workload_ids() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/sleep").unwrap();
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/sleep");
        assert_eq!(id.namespace(), Some("default"));
        assert_eq!(id.service_account(), Some("sleep"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        assert_eq!(id, SpiffeId::workload("cluster.local", "default", "sleep"));
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "",
            "http://x/y",
            "spiffe://",
            "spiffe://td",
            "spiffe://td/",
            "spiffe:///ns/a",
            "spiffe://td/a//b",
            "spiffe://t d/x",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn non_workload_paths_have_no_namespace() {
        let id = SpiffeId::parse("spiffe://example.org/gateway").unwrap();
        assert_eq!(id.namespace(), None);
        assert_eq!(id.principal(), "example.org/gateway");
    }
}
