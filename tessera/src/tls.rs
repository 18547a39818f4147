//! TLS for the portal and the management API (`[tls]`): a configured PEM certificate, or
//! a self-signed one generated once into `<data_dir>/dev-tls/` for LAN demos.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tessera_config::Config;

/// What the servers need, and what start-up prints.
pub struct Tls {
    /// The rustls configuration both servers use.
    pub server: rustls::ServerConfig,
    /// The certificate file in use.
    pub cert_path: PathBuf,
    /// SHA-256 of the leaf certificate, `AB:CD:…`, as browsers show it.
    pub fingerprint: String,
    /// Whether the certificate is the generated self-signed one.
    pub self_signed: bool,
}

/// Loads (or, with `tls.dev`, makes) the certificate; `None` without `[tls]`.
pub fn load(config: &Config) -> anyhow::Result<Option<Tls>> {
    let t = &config.tls;
    if !t.enabled() {
        return Ok(None);
    }
    let (cert_path, key_path) = if t.dev { dev_certificate(config)? } else { (t.cert.clone(), t.key.clone()) };
    let certs = read_certs(&cert_path)?;
    let key = read_key(&key_path)?;
    let fingerprint = certs.first().map(|c| fingerprint(c.as_ref())).unwrap_or_default();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| anyhow!("config error: key `tls.cert`/`tls.key`: {} with {}: {e}", cert_path.display(), key_path.display()))?;
    Ok(Some(Tls { server, cert_path, fingerprint, self_signed: t.dev }))
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let bytes = std::fs::read(path).map_err(|e| anyhow!("config error: key `tls.cert`: cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("config error: key `tls.cert`: {} is not a PEM certificate chain: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("config error: key `tls.cert`: {} holds no PEM CERTIFICATE block", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let bytes = std::fs::read(path).map_err(|e| anyhow!("config error: key `tls.key`: cannot read {}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| anyhow!("config error: key `tls.key`: {} holds no PEM private key: {e}", path.display()))
}

/// `AB:CD:…` of the SHA-256 of `der`.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// The dev certificate's files, made at first use and reused after, so a browser that
/// accepted it once keeps accepting it. Delete the folder to make a new one (e.g. after
/// the machine's address changed).
fn dev_certificate(config: &Config) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = config.server.data_dir.join("dev-tls");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let made = rcgen::generate_simple_self_signed(dev_names(config)).context("generating the self-signed certificate")?;
    // The key first, and the certificate renamed into place last: a start cut short
    // leaves no pair that looks complete.
    let _ = std::fs::remove_file(&key);
    crate::serve::write_private(&key, made.signing_key.serialize_pem().trim_end()).with_context(|| format!("cannot write {}", key.display()))?;
    let partial = dir.join("cert.pem.partial");
    std::fs::write(&partial, made.cert.pem()).with_context(|| format!("cannot write {}", partial.display()))?;
    std::fs::rename(&partial, &cert).with_context(|| format!("cannot write {}", cert.display()))?;
    Ok((cert, key))
}

/// The names a LAN demo is opened by: localhost, the machine's addresses, the configured
/// listening and public addresses.
fn dev_names(config: &Config) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    names.extend(tessera_webrtc_agent::net::bind_ips(None).iter().map(IpAddr::to_string));
    for addr in [&config.server.portal_addr, &config.server.api_addr, &config.portal.public_host] {
        if let Some((host, _)) = addr.rsplit_once(':') {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if !host.is_empty() && host.parse::<IpAddr>().map_or(true, |ip| !ip.is_unspecified()) {
                names.push(host.to_string());
            }
        }
    }
    if !config.webrtc.public_ip.is_empty() {
        names.push(config.webrtc.public_ip.clone());
    }
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_names_cover_the_listening_and_public_hosts() {
        let mut config = Config::default();
        config.server.portal_addr = "0.0.0.0:8443".into();
        config.portal.public_host = "meet.example.org:443".into();
        let names = dev_names(&config);
        assert!(names.contains(&"localhost".to_string()) && names.contains(&"meet.example.org".to_string()), "{names:?}");
        assert!(!names.contains(&"0.0.0.0".to_string()), "{names:?}");
    }

    #[test]
    fn fingerprint_is_colon_separated_sha256() {
        let f = fingerprint(b"abc");
        assert!(f.starts_with("BA:78:16:BF:"), "{f}");
        assert_eq!(f.len(), 32 * 3 - 1);
    }
}
