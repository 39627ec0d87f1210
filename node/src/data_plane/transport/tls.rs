//! TLS 1.3 settings of the QUIC data plane: libp2p-tls certificates (a self-signed
//! certificate whose extension carries this node's libp2p public key and its signature),
//! verified on both sides so the handshake itself proves each peer's libp2p identity, and
//! the cipher-suite order: AES-128-GCM, AES-256-GCM, then ChaCha20-Poly1305.
//!
//! `libp2p_tls::make_{client,server}_config` build the same configs but offer
//! ChaCha20-Poly1305 first, and the client's order decides the suite; on CPUs with AES
//! instructions AES-GCM costs a fraction of ChaCha20's cycles per byte (measured in the
//! data plane's all-reduce: ChaCha20 took about a third of all CPU time), so these configs
//! are built here. The identity checks are libp2p-tls's own
//! (`libp2p_tls::certificate::parse`: exactly one self-signed certificate with a valid
//! libp2p extension; `P2pCertificate::verify_signature` for the handshake signature); the
//! crypto provider is rustls's aws-lc-rs, as in libp2p-tls.

use libp2p::identity::Keypair;
use libp2p::PeerId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::aws_lc_rs::cipher_suite::{
    TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::sync::Arc;

/// The ALPN protocol both sides announce (libp2p-tls's).
const ALPN: &[u8] = b"libp2p";

/// Why a TLS config could not be built.
#[derive(Debug, thiserror::Error)]
pub(in crate::data_plane) enum TlsError {
    /// The libp2p certificate could not be generated.
    #[error("certificate: {0}")]
    Certificate(#[from] libp2p_tls::certificate::GenError),
    /// rustls refused the settings or the key.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// aws-lc-rs with TLS 1.3 suites only, AES-GCM first.
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// Client config: presents this node's libp2p certificate and accepts only a server
/// whose certificate proves `expected`.
pub(in crate::data_plane) fn client_config(
    key: &Keypair,
    expected: PeerId,
) -> Result<rustls::ClientConfig, TlsError> {
    let p = provider();
    let mine = certified(key, &p)?;
    let mut c = rustls::ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Libp2pVerifier {
            expected: Some(expected),
        }))
        .with_client_cert_resolver(mine);
    c.alpn_protocols = vec![ALPN.to_vec()];
    Ok(c)
}

/// Server config: presents this node's libp2p certificate and requires one from every
/// client (which peer it proves is read from the connection afterwards).
pub(in crate::data_plane) fn server_config(
    key: &Keypair,
) -> Result<rustls::ServerConfig, TlsError> {
    let p = provider();
    let mine = certified(key, &p)?;
    let mut c = rustls::ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(Libp2pVerifier { expected: None }))
        .with_cert_resolver(mine);
    c.alpn_protocols = vec![ALPN.to_vec()];
    Ok(c)
}

/// This node's libp2p certificate (a fresh one) with its key. Not through rustls's
/// `with_single_cert`, whose consistency check parses the certificate with webpki, which
/// refuses libp2p's critical extension.
fn certified(key: &Keypair, p: &CryptoProvider) -> Result<Arc<SingleCertAndKey>, TlsError> {
    let (cert, private) = libp2p_tls::certificate::generate(key)?;
    let signing = p.key_provider.load_private_key(private)?;
    Ok(Arc::new(SingleCertAndKey::from(CertifiedKey::new(
        vec![cert],
        signing,
    ))))
}

/// The peer id a presented certificate chain proves: exactly one certificate, self-signed,
/// with a valid libp2p extension.
pub(in crate::data_plane) fn prove(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<PeerId, rustls::Error> {
    if !intermediates.is_empty() {
        return Err(rustls::Error::General(
            "libp2p-tls requires exactly one certificate".into(),
        ));
    }
    let cert = libp2p_tls::certificate::parse(end_entity)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    Ok(cert.peer_id())
}

/// Checks the handshake signature with the certificate's key.
fn verify_tls13(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    libp2p_tls::certificate::parse(cert)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?
        .verify_signature(dss.scheme, message, dss.signature())
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))?;
    Ok(HandshakeSignatureValid::assertion())
}

/// The signature schemes certificates may use, preferred first (libp2p-tls's list).
fn schemes() -> Vec<SignatureScheme> {
    vec![
        SignatureScheme::ECDSA_NISTP384_SHA384,
        SignatureScheme::ECDSA_NISTP256_SHA256,
        SignatureScheme::ED25519,
        SignatureScheme::RSA_PSS_SHA512,
        SignatureScheme::RSA_PSS_SHA384,
        SignatureScheme::RSA_PSS_SHA256,
        SignatureScheme::RSA_PKCS1_SHA512,
        SignatureScheme::RSA_PKCS1_SHA384,
        SignatureScheme::RSA_PKCS1_SHA256,
    ]
}

/// Verifies libp2p-tls certificates (server side: any valid one, the caller checks
/// membership; client side: only one proving `expected`). TLS 1.2 is refused.
#[derive(Debug)]
struct Libp2pVerifier {
    /// The peer a client dials; `None` on the server side.
    expected: Option<PeerId>,
}

/// The error for a TLS 1.2 signature (the configs allow TLS 1.3 only).
fn no_tls12() -> rustls::Error {
    rustls::Error::General("TLS 1.2 is not allowed".into())
}

impl ServerCertVerifier for Libp2pVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let peer = prove(end_entity, intermediates)?;
        if self.expected.is_some_and(|e| e != peer) {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

impl ClientCertVerifier for Libp2pVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        prove(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a TLS handshake in memory; the client's and server's connections afterwards,
    /// or the first error.
    fn handshake(
        client: rustls::ClientConfig,
        server: rustls::ServerConfig,
    ) -> Result<(rustls::ClientConnection, rustls::ServerConnection), rustls::Error> {
        let name = ServerName::try_from("shoal").unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(client), name)?;
        let mut s = rustls::ServerConnection::new(Arc::new(server))?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
            }
            s.process_new_packets()?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
            }
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok((c, s));
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn two_shoal_endpoints_negotiate_aes_gcm_and_prove_both_identities() {
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let client = client_config(&a, b.public().to_peer_id()).unwrap();
        let server = server_config(&b).unwrap();
        let (c, s) = handshake(client, server).unwrap();
        for suite in [c.negotiated_cipher_suite(), s.negotiated_cipher_suite()] {
            assert_eq!(suite.unwrap().suite(), TLS13_AES_128_GCM_SHA256.suite());
        }
        assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        let client_certs = s.peer_certificates().unwrap();
        assert_eq!(
            prove(&client_certs[0], &client_certs[1..]).unwrap(),
            a.public().to_peer_id()
        );
        let server_certs = c.peer_certificates().unwrap();
        assert_eq!(
            prove(&server_certs[0], &server_certs[1..]).unwrap(),
            b.public().to_peer_id()
        );
    }

    #[test]
    fn a_server_proving_another_identity_is_refused() {
        let (a, b, c) = (
            Keypair::generate_ed25519(),
            Keypair::generate_ed25519(),
            Keypair::generate_ed25519(),
        );
        // The client dials b, but c answers.
        let client = client_config(&a, b.public().to_peer_id()).unwrap();
        let server = server_config(&c).unwrap();
        let err = handshake(client, server).expect_err("refused");
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
            ),
            "{err:?}"
        );
    }
}
