//! HTTPS on the listener (`server.tls_cert_file`, `server.tls_key_file`): the certificate,
//! checked when the configuration is read, and each accepted connection's TLS handshake, within
//! the request head's time.

use std::sync::Arc;

use pingora::listeners::tls::Acceptor;
use pingora::protocols::Stream;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::tls::ServerConfig;

/// The acceptor of the certificate chain and key in PEM files `cert` and `key` (HTTP/1.1
/// only), or why they do not load.
pub fn acceptor(cert: &str, key: &str) -> Result<Arc<Acceptor>, String> {
    let loaded = pingora::tls::load_certs_and_key_files(cert, key)
        .map_err(|e| format!("cannot read {cert} or {key}: {e}"))?;
    let Some((certs, key)) = loaded else {
        return Err(format!(
            "{cert} holds no certificate, or {key} no private key (PEM)"
        ));
    };
    pingora::tls::install_default_crypto_provider();
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the certificate and key do not go together: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(Acceptor::from_server_config(Arc::new(config))))
}

/// Why a connection was not accepted.
pub enum Refused {
    /// The TLS handshake failed.
    Handshake,
    /// It did not finish in time.
    Slow,
}

/// The connection as gemgate speaks over it: as accepted, or after the TLS handshake (which
/// must finish `within`).
pub async fn accept(
    acceptor: Option<&Acceptor>,
    stream: Box<L4Stream>,
    within: std::time::Duration,
) -> Result<Stream, Refused> {
    let Some(acceptor) = acceptor else {
        return Ok(stream);
    };
    // Boxed: the handshake's future (about 7 KB) would otherwise size every connection's
    // task, TLS or not, for as long as the connection lasts.
    let handshake = Box::pin(acceptor.tls_handshake(*stream));
    match tokio::time::timeout(within, handshake).await {
        Ok(Ok(tls)) => Ok(Box::new(tls)),
        Ok(Err(e)) => {
            tracing::debug!("TLS handshake: {e}");
            Err(Refused::Handshake)
        }
        Err(_) => {
            tracing::debug!("a TLS handshake did not finish in time");
            Err(Refused::Slow)
        }
    }
}
