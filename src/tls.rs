//! TLS for `https://` backends: a rustls client configuration on the ring provider (the one
//! lapin already uses), trusting the system's roots plus `backend.ca_file`, and presenting
//! `backend.client_cert_file` / `backend.client_key_file` when a worker asks for a client
//! certificate (mTLS).
//!
//! Built here rather than through reqwest's own TLS options because reqwest's rustls
//! feature brings a second crypto provider (aws-lc-rs, which needs a C toolchain and cmake);
//! reqwest takes this configuration as it is (`tls_backend_preconfigured`).

use std::{path::Path, sync::Arc};

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// Installs ring as the process's default rustls crypto provider, once. reqwest builds a
/// TLS configuration for every client, even one that only ever speaks `http://`, and
/// without a provider it panics. Idempotent; a provider installed earlier is kept.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Why a TLS file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    /// A certificate file is missing, unreadable, or holds no PEM certificate.
    #[error("cannot read certificates from {path}: {reason}")]
    Certificates {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The key file is missing, unreadable, or holds no PEM private key.
    #[error("cannot read a private key from {path}: {reason}")]
    Key {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The certificate and key do not make a usable client identity.
    #[error("client certificate and key do not fit together: {0}")]
    Identity(String),
}

/// The certificates of a PEM bundle.
///
/// # Errors
/// [`TlsFileError::Certificates`] when the file cannot be read or holds no certificate.
pub fn load_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let err = |reason: String| TlsFileError::Certificates {
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

/// A client identity: the certificate chain and its private key.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

/// Loads a client certificate chain and its key, and checks that they fit together.
///
/// # Errors
/// A [`TlsFileError`] naming the file at fault.
pub fn load_identity(cert: &Path, key: &Path) -> Result<Identity, TlsFileError> {
    let chain = load_roots(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsFileError::Key {
        path: key.display().to_string(),
        reason: e.to_string(),
    })?;
    let identity = Identity { chain, key };
    // Building a config checks that the key is usable and matches the certificate.
    client_config(&[], Some(&identity)).map_err(|e| TlsFileError::Identity(e.to_string()))?;
    Ok(identity)
}

/// The client configuration for `https://` backends: the system's roots plus `extra_roots`,
/// and `identity` for workers that ask for a client certificate.
///
/// # Errors
/// When rustls rejects the identity (a key that does not match the certificate, or an
/// unsupported key type).
pub fn client_config(
    extra_roots: &[CertificateDer<'static>],
    identity: Option<&Identity>,
) -> Result<ClientConfig, rustls::Error> {
    let mut roots = RootCertStore::empty();
    // A system store that cannot be read is not fatal: `backend.ca_file` may be all that is
    // needed, and a backend nobody trusts fails its handshake with a clear error.
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!(error = %e, "could not read part of the system's trust store");
    }
    roots.add_parsable_certificates(native.certs);
    roots.add_parsable_certificates(extra_roots.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain.clone(), id.key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The client configuration for the `backend:` section's TLS files.
///
/// # Errors
/// As [`load_roots`] and [`load_identity`]; validation reports these first, with the key.
pub fn from_files(
    ca_file: Option<&Path>,
    client_cert_file: Option<&Path>,
    client_key_file: Option<&Path>,
) -> Result<ClientConfig, TlsFileError> {
    let roots = match ca_file {
        Some(p) => load_roots(p)?,
        None => Vec::new(),
    };
    let identity = match (client_cert_file, client_key_file) {
        (Some(c), Some(k)) => Some(load_identity(c, k)?),
        _ => None,
    };
    client_config(&roots, identity.as_ref()).map_err(|e| TlsFileError::Identity(e.to_string()))
}
