//! Test certificates: a private CA that signs a server certificate for `localhost` and
//! 127.0.0.1 and a client certificate, written as PEM files, and the worker's TLS config.

use std::{path::PathBuf, sync::Arc};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use tokio_rustls::rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::WebPkiClientVerifier,
};

use super::TempDir;

/// A private CA with a server and a client certificate, as PEM files in a temp dir.
pub struct Pki {
    /// The CA certificate (for `backend.ca_file`).
    pub ca_file: PathBuf,
    /// The client certificate and key (for `backend.client_cert_file` / `client_key_file`).
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
    ca_der: CertificateDer<'static>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: Vec<u8>,
    _dir: TempDir,
}

impl Pki {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(super::unique("pki"));
        std::fs::create_dir_all(&dir).expect("pki dir");
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "amqp-sidecar test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key).expect("ca cert");
        let issue = |names: Vec<String>, cn: &str| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(names).expect("params");
            params.distinguished_name.push(DnType::CommonName, cn);
            let cert = params.signed_by(&key, &ca, &ca_key).expect("sign");
            (cert, key)
        };
        let (server, server_key) =
            issue(vec!["localhost".into(), "127.0.0.1".into()], "test worker");
        let (client, client_key) = issue(vec!["amqp-sidecar".into()], "amqp-sidecar");
        let write = |name: &str, pem: String| {
            let path = dir.join(name);
            std::fs::write(&path, pem).expect("write pem");
            path
        };
        Self {
            ca_file: write("ca.pem", ca.pem()),
            client_cert_file: write("client.pem", client.pem()),
            client_key_file: write("client.key", client_key.serialize_pem()),
            ca_der: ca.der().clone(),
            server_chain: vec![server.der().clone()],
            server_key: server_key.serialize_der(),
            _dir: TempDir(dir),
        }
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone()))
    }

    /// A worker's TLS config: the server certificate, no client authentication.
    pub fn server(&self) -> Arc<ServerConfig> {
        Arc::new(
            ServerConfig::builder_with_provider(Arc::new(
                tokio_rustls::rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(self.server_chain.clone(), self.key())
            .expect("server config"),
        )
    }

    /// A worker's TLS config that requires a client certificate signed by the CA (mTLS).
    pub fn server_requiring_client_cert(&self) -> Arc<ServerConfig> {
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("ca root");
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .build()
                .expect("client verifier");
        Arc::new(
            ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_client_cert_verifier(verifier)
                .with_single_cert(self.server_chain.clone(), self.key())
                .expect("server config"),
        )
    }
}
