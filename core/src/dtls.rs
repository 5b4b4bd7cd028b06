//! A DTLS provider whose non-cryptographic randomness (retransmit jitter, hello random bytes,
//! cookie secrets) comes from the agent's seed.
//!
//! str0m's aws-lc-rs provider seeds dimpl only in str0m's own test builds. This provider builds
//! the same dimpl instances with `dangerously_set_rng_seed`; keys, signatures and AEAD remain
//! cryptographically random (aws-lc), which changes packet bytes but never timing or events.
//! The seed is non-secret by design: it only drives jitter and public nonces.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use str0m::config::{CryptoProvider, DtlsCert, DtlsVersion};
use str0m::crypto::dtls::{DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, ProtocolVersion};
use str0m::crypto::CryptoError;

#[derive(Debug)]
pub(crate) struct SeededDtlsProvider {
    /// Next seed; each DTLS instance takes one and advances it.
    next_seed: AtomicU64,
}

impl SeededDtlsProvider {
    /// A crypto provider (aws-lc-rs for everything) with this seeded DTLS.
    ///
    /// str0m wants `&'static` providers, so each agent leaks one small provider (16 bytes)
    /// when it is created. Agents live as long as the process in the live shell.
    pub fn crypto_provider(seed: u64) -> Arc<CryptoProvider> {
        let dtls: &'static SeededDtlsProvider = Box::leak(Box::new(SeededDtlsProvider {
            next_seed: AtomicU64::new(seed),
        }));
        let mut provider = str0m::crypto::from_feature_flags();
        provider.dtls_provider = dtls;
        Arc::new(provider)
    }
}

impl DtlsProvider for SeededDtlsProvider {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        dimpl::certificate::generate_self_signed_certificate()
            .ok()
            .map(|c| DtlsCert {
                certificate: c.certificate,
                private_key: c.private_key,
            })
    }

    fn new_dtls(
        &self,
        cert: &DtlsCert,
        now: Instant,
        dtls_version: DtlsVersion,
        mtu: Option<usize>,
    ) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        // Only this agent's thread creates DTLS instances; the atomic is for Sync, not races.
        let seed = self
            .next_seed
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        let mut builder = dimpl::Config::builder()
            .use_server_cookie(false)
            .dangerously_set_rng_seed(seed);
        if let Some(mtu) = mtu {
            builder = builder.mtu(mtu);
        }
        let config = Arc::new(
            builder
                .build()
                .map_err(|e| CryptoError::Other(format!("dimpl config: {e}")))?,
        );
        let cert = dimpl::DtlsCertificate {
            certificate: cert.certificate.clone(),
            private_key: cert.private_key.clone(),
        };
        let dtls = match dtls_version {
            DtlsVersion::Dtls12 => dimpl::Dtls::new_12(config, cert, now),
            DtlsVersion::Dtls13 => dimpl::Dtls::new_13(config, cert, now),
            DtlsVersion::Auto => dimpl::Dtls::new_auto(config, cert, now),
            other => {
                return Err(CryptoError::Other(format!(
                    "unsupported DTLS version {other}"
                )));
            }
        };
        Ok(Box::new(SeededDtls(dtls)))
    }
}

struct SeededDtls(dimpl::Dtls);

impl std::fmt::Debug for SeededDtls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SeededDtls")
    }
}

impl DtlsInstance for SeededDtls {
    fn set_active(&mut self, active: bool) {
        self.0.set_active(active);
    }
    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        self.0.handle_packet(packet)
    }
    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        self.0.poll_output(buf)
    }
    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        self.0.handle_timeout(now)
    }
    fn send_application_data(&mut self, data: &[u8]) -> Result<usize, DtlsImplError> {
        self.0.send_application_data(data)
    }
    fn is_active(&self) -> bool {
        self.0.is_active()
    }
    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.0.protocol_version()
    }
    fn is_closing(&self) -> bool {
        self.0.is_closing()
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.0.close()
    }
}
