//! HTTPS for the fake platform: the host's cloud-init fetches the bundle
//! with curl restricted to `https://`, so the end-to-end test needs TLS.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A server certificate chain and its private key, both PEM files.
#[derive(Clone, Debug)]
pub struct TlsIdentity {
    /// The server certificate first, then any intermediates.
    pub certificate_chain: PathBuf,
    pub private_key: PathBuf,
}

impl TlsIdentity {
    pub fn new(certificate_chain: impl Into<PathBuf>, private_key: impl Into<PathBuf>) -> Self {
        TlsIdentity {
            certificate_chain: certificate_chain.into(),
            private_key: private_key.into(),
        }
    }

    /// Loads the files into a rustls server configuration that offers
    /// HTTP/1.1 only.
    pub(crate) fn server_config(&self) -> anyhow::Result<Arc<ServerConfig>> {
        let chain = read_chain(&self.certificate_chain)?;
        let key = PrivateKeyDer::from_pem_file(&self.private_key).with_context(|| {
            format!(
                "cannot read a PEM private key from {}",
                self.private_key.display()
            )
        })?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("the TLS provider supports no default protocol version")?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .context("the TLS certificate and private key do not form a usable pair")?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn read_chain(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read PEM certificates from {}", path.display()))?;
    if chain.is_empty() {
        anyhow::bail!("{} contains no PEM certificate", path.display());
    }
    Ok(chain)
}
