//! Local certificate authority for development and tests: a CA, and leaf
//! certificates carrying one SPIFFE URI SAN (plus DNS names for servers).
//! In a cluster, cert-manager plays this role.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::identity::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// PEM-encoded certificate and private key.
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// Creates a self-signed CA for `trust_domain`.
pub fn create_ca(trust_domain: &str) -> Result<Pem, CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, format!("llm-egress CA ({trust_domain})"));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Issues a leaf certificate for `id`, valid as TLS client and server, with
/// `dns_names` as additional SANs.
pub fn issue(ca: &Pem, id: &SpiffeId, dns_names: &[String]) -> Result<Pem, CertError> {
    issue_for_node(ca, id, dns_names, None)
}

/// `issue`, for an agent bound to `node` (a URI SAN `urn:llm-egress:node:<node>`).
pub fn issue_for_node(
    ca: &Pem,
    id: &SpiffeId,
    dns_names: &[String],
    node: Option<&str>,
) -> Result<Pem, CertError> {
    let ca_key = KeyPair::from_pem(&ca.key)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key)?;
    let mut params = CertificateParams::new(dns_names.to_vec())?;
    params
        .subject_alt_names
        .push(SanType::URI(id.to_string().try_into()?));
    if let Some(node) = node {
        params.subject_alt_names.push(SanType::URI(
            format!("{}{node}", crate::identity::NODE_URI_PREFIX).try_into()?,
        ));
    }
    params.distinguished_name.push(DnType::CommonName, id.principal());
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Writes `<name>.pem` and `<name>-key.pem` under `dir` (key mode 0600).
pub fn write(dir: &Path, name: &str, pem: &Pem) -> Result<(), CertError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |path: &Path| {
        let p = path.display().to_string();
        move |source| CertError::Io { path: p, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let cert_path = dir.join(format!("{name}.pem"));
    std::fs::write(&cert_path, &pem.cert).map_err(io(&cert_path))?;
    let key_path = dir.join(format!("{name}-key.pem"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(io(&key_path))?;
    std::io::Write::write_all(&mut f, pem.key.as_bytes()).map_err(io(&key_path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::spiffe_from_cert;
    use rustls::pki_types::{pem::PemObject, CertificateDer};

    #[test]
    fn issued_certificate_carries_the_spiffe_id() {
        let ca = create_ca("cluster.local").unwrap();
        let id = SpiffeId::workload("cluster.local", "default", "sleep");
        let leaf = issue(&ca, &id, &["localhost".into()]).unwrap();
        let der = CertificateDer::from_pem_slice(leaf.cert.as_bytes()).unwrap();
        assert_eq!(spiffe_from_cert(&der), Some(id));
    }
}
