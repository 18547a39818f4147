//! Forwarded media encrypted by Tessera, past rtc's send pipeline.
//!
//! rtc 0.21 keeps a connection's SRTP context to itself, so every forwarded packet had to
//! walk its whole send pipeline (eight handler queues, the interceptor chain, a marshal and
//! then an encrypting copy). The one door rtc leaves open is the crypto provider a
//! connection is built with: the SRTP contexts are keyed through it once the DTLS
//! handshake is done. [`KeyTap`] is that provider, passing every call through to the
//! default one, and noting the master key and salt the first context is keyed with (the
//! local one: rtc keys it before the remote one). RFC 3711's key derivation (§4.3.1)
//! encrypts, with the master key, the master salt XOR the label and index, so the first
//! block derived — label 0, index 0 — is the salt itself. [`outbound`] then keys its own
//! context the same way and checks that it derives the very session key rtc's context was
//! given before it is used.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rtc::crypto::{
    AeadAlgorithm, AeadCipher, BlockCipherAlgorithm, CryptoAlgorithm, CryptoError, HashAlgorithm, HmacAlgorithm, Mac, RTCCrypto, RTCCryptoProvider,
    RTCRandom, StreamCipher, StreamCipherAlgorithm,
};
use rtc::srtp::context::Context;
use rtc::srtp::protection_profile::ProtectionProfile;

/// What the tap saw keyed, in order.
#[derive(Default)]
struct Seen {
    /// Each distinct master key used for key derivation: the key, the first block it
    /// encrypted, and how many session keys had been seen before it.
    masters: Vec<(Vec<u8>, Vec<u8>, usize)>,
    /// Keys given to stream ciphers and AEADs, in order (DTLS's record keys among them).
    sessions: Vec<Vec<u8>>,
}

/// A crypto provider that passes everything to `inner` and notes how SRTP is keyed.
pub struct KeyTap {
    inner: Arc<dyn RTCCryptoProvider>,
    seen: Mutex<Seen>,
    /// Master keys seen since the connection began: two per handshake (local, remote).
    masters: AtomicUsize,
}

impl KeyTap {
    /// A tap over `inner`.
    pub fn new(inner: Arc<dyn RTCCryptoProvider>) -> Arc<KeyTap> {
        Arc::new(KeyTap { inner, seen: Mutex::new(Seen::default()), masters: AtomicUsize::new(0) })
    }

    /// Handshakes whose keys were seen: a context made from an earlier one is stale.
    pub fn handshakes(&self) -> usize {
        self.masters.load(Ordering::Relaxed) / 2
    }

    /// The local master key and salt of the latest handshake, with the session key rtc's
    /// local context was given (the first derived after that master key).
    fn local(&self, salt_len: usize) -> Option<(Vec<u8>, Vec<u8>, Vec<u8>)> {
        let seen = self.seen.lock().ok()?;
        // Contexts are keyed in pairs, local then remote (only SRTP derives keys with a
        // block cipher): the latest pair's first, and the first session key keyed after
        // its derivation began (its SRTP key: rtc-srtp derives, then keys its cipher).
        let pairs = seen.masters.len() / 2;
        let (key, block, at) = seen.masters.get(pairs.checked_sub(1)? * 2)?;
        let session = seen.sessions.get(*at)?;
        Some((key.clone(), block.get(..salt_len)?.to_vec(), session.clone()))
    }

    /// Forgets the keys noted so far (zeroed), once a context was keyed from them: a
    /// connection keeps no secrets here that rtc does not hold anyway.
    fn forget(&self) {
        if let Ok(mut seen) = self.seen.lock() {
            for (key, block, _) in &mut seen.masters {
                key.fill(0);
                block.fill(0);
            }
            for key in &mut seen.sessions {
                key.fill(0);
            }
            *seen = Seen::default();
        }
    }
}

impl RTCCryptoProvider for KeyTap {
    fn name(&self) -> &'static str {
        "tessera-key-tap"
    }

    fn crypto(&self) -> &dyn RTCCrypto {
        self
    }

    fn random(&self) -> &dyn RTCRandom {
        self.inner.random()
    }
}

impl RTCCrypto for KeyTap {
    fn supports(&self, algorithm: CryptoAlgorithm) -> bool {
        self.inner.crypto().supports(algorithm)
    }

    fn hash(&self, algorithm: HashAlgorithm, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.inner.crypto().hash(algorithm, data)
    }

    fn block_encrypt(&self, algorithm: BlockCipherAlgorithm, key: &[u8], block: &mut [u8]) -> Result<(), CryptoError> {
        if let Ok(mut seen) = self.seen.lock()
            && seen.masters.last().is_none_or(|(k, _, _)| k.as_slice() != key)
        {
            let at = seen.sessions.len();
            seen.masters.push((key.to_vec(), block.to_vec(), at));
            self.masters.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.crypto().block_encrypt(algorithm, key, block)
    }

    fn new_hmac(&self, algorithm: HmacAlgorithm, key: &[u8]) -> Result<Box<dyn Mac>, CryptoError> {
        self.inner.crypto().new_hmac(algorithm, key)
    }

    fn new_stream_cipher(&self, algorithm: StreamCipherAlgorithm, key: &[u8]) -> Result<Box<dyn StreamCipher>, CryptoError> {
        if let Ok(mut seen) = self.seen.lock() {
            seen.sessions.push(key.to_vec());
        }
        self.inner.crypto().new_stream_cipher(algorithm, key)
    }

    fn new_aead(&self, algorithm: AeadAlgorithm, key: &[u8]) -> Result<Box<dyn AeadCipher>, CryptoError> {
        if let Ok(mut seen) = self.seen.lock() {
            seen.sessions.push(key.to_vec());
        }
        self.inner.crypto().new_aead(algorithm, key)
    }

    fn new_cbc(&self, algorithm: rtc::crypto::CbcAlgorithm, key: &[u8]) -> Result<Box<dyn rtc::crypto::CbcCipher>, CryptoError> {
        self.inner.crypto().new_cbc(algorithm, key)
    }

    fn start_key_exchange(&self, algorithm: rtc::crypto::KeyExchangeAlgorithm) -> Result<Box<dyn rtc::crypto::ActiveKeyExchange>, CryptoError> {
        self.inner.crypto().start_key_exchange(algorithm)
    }

    fn generate_signing_key(&self, scheme: rtc::crypto::SignatureScheme) -> Result<Arc<dyn rtc::crypto::SigningKey>, CryptoError> {
        self.inner.crypto().generate_signing_key(scheme)
    }

    fn import_signing_key(&self, scheme: rtc::crypto::SignatureScheme, pkcs8_der: &[u8]) -> Result<Arc<dyn rtc::crypto::SigningKey>, CryptoError> {
        self.inner.crypto().import_signing_key(scheme, pkcs8_der)
    }

    fn verify_signature(
        &self,
        scheme: rtc::crypto::SignatureScheme,
        public_key: rtc::crypto::PublicKey<'_>,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), CryptoError> {
        self.inner.crypto().verify_signature(scheme, public_key, message, signature)
    }
}

/// The SRTP profile rtc's transport statistics name.
pub fn profile(cipher: &str) -> Option<ProtectionProfile> {
    match cipher {
        "SRTP_AES128_CM_HMAC_SHA1_80" => Some(ProtectionProfile::Aes128CmHmacSha1_80),
        "SRTP_AES128_CM_HMAC_SHA1_32" => Some(ProtectionProfile::Aes128CmHmacSha1_32),
        "SRTP_AEAD_AES_128_GCM" => Some(ProtectionProfile::AeadAes128Gcm),
        "SRTP_AEAD_AES_256_GCM" => Some(ProtectionProfile::AeadAes256Gcm),
        _ => None,
    }
}

/// A connection's outgoing SRTP context, keyed as rtc's own.
pub fn outbound(tap: &KeyTap, profile: ProtectionProfile) -> Option<Context> {
    let (key, salt, session) = tap.local(profile.salt_len())?;
    // Keyed through a tap of its own, to read back the session key it derives.
    let check = KeyTap::new(tap.inner.clone());
    let context = Context::new(&key, &salt, profile, None, None, check.crypto()).ok()?;
    let derived = check.seen.lock().ok()?.sessions.first().cloned()?;
    check.forget();
    tap.forget();
    (derived == session).then_some(context)
}

#[cfg(test)]
mod tests {
    use rtc::rtp;
    use rtc::shared::marshal::Marshal;

    use super::*;

    fn provider() -> Arc<dyn RTCCryptoProvider> {
        rtc::crypto::default_provider().expect("ring provider")
    }

    /// Keys a local and a remote context through `tap` as rtc does after a handshake.
    fn handshake(tap: &KeyTap, profile: ProtectionProfile, local: (&[u8], &[u8]), remote: (&[u8], &[u8])) {
        for (key, salt) in [local, remote] {
            Context::new(key, salt, profile, None, None, tap.crypto()).expect("context");
        }
    }

    fn packet(seq: u16) -> (Vec<u8>, rtp::Header) {
        let p = rtp::Packet {
            header: rtp::Header { version: 2, payload_type: 96, sequence_number: seq, timestamp: 9000, ssrc: 0x1234_5678, ..Default::default() },
            payload: bytes::Bytes::from(vec![seq as u8; 300]),
        };
        (p.marshal().expect("marshal").to_vec(), p.header)
    }

    /// Our context encrypts exactly as a context keyed with rtc's local master key, and
    /// what it sends the peer's remote context (keyed the same) decrypts.
    #[test]
    fn the_context_is_keyed_as_rtcs_local_one() {
        for profile in [ProtectionProfile::Aes128CmHmacSha1_80, ProtectionProfile::AeadAes128Gcm, ProtectionProfile::AeadAes256Gcm] {
            let (k, s) = (profile.key_len(), profile.salt_len());
            let (lk, ls, rk, rs) = (vec![7u8; k], (1..=s as u8).collect::<Vec<_>>(), vec![9u8; k], vec![3u8; s]);
            let tap = KeyTap::new(provider());
            // DTLS's own record keys go through the provider first.
            let _ = tap.crypto().new_aead(AeadAlgorithm::Aes128Gcm, &[5u8; 16]);
            handshake(&tap, profile, (&lk, &ls), (&rk, &rs));
            assert_eq!(tap.handshakes(), 1);
            let mut ours = outbound(&tap, profile).expect("keyed");
            let mut reference = Context::new(&lk, &ls, profile, None, None, provider().crypto()).expect("reference");
            let mut peer = Context::new(&lk, &ls, profile, None, None, provider().crypto()).expect("peer");
            for seq in [65_530u16, 65_535, 0, 1] {
                let (plain, header) = packet(seq);
                let sealed = ours.encrypt_rtp_with_header(&plain, &header).expect("encrypt");
                assert_eq!(sealed, reference.encrypt_rtp_with_header(&plain, &header).expect("encrypt"), "{profile:?} seq {seq}");
                assert_eq!(peer.decrypt_rtp(&sealed).expect("decrypt").to_vec(), plain, "{profile:?} seq {seq}");
            }
        }
    }

    /// After a second handshake the context comes from its keys; before any (or with half
    /// of one) there is none.
    #[test]
    fn the_latest_handshake_keys_it_and_none_before() {
        let profile = ProtectionProfile::Aes128CmHmacSha1_80;
        let tap = KeyTap::new(provider());
        assert!(outbound(&tap, profile).is_none());
        Context::new(&[1u8; 16], &[2u8; 14], profile, None, None, tap.crypto()).expect("context");
        assert!(outbound(&tap, profile).is_none(), "only the local context of a handshake");
        Context::new(&[3u8; 16], &[4u8; 14], profile, None, None, tap.crypto()).expect("context");
        handshake(&tap, profile, (&[5u8; 16], &[6u8; 14]), (&[7u8; 16], &[8u8; 14]));
        assert_eq!(tap.handshakes(), 2);
        let (plain, header) = packet(10);
        let sealed = outbound(&tap, profile).expect("keyed").encrypt_rtp_with_header(&plain, &header).expect("encrypt");
        let mut peer = Context::new(&[5u8; 16], &[6u8; 14], profile, None, None, provider().crypto()).expect("peer");
        assert_eq!(peer.decrypt_rtp(&sealed).expect("decrypt").to_vec(), plain);
        // Nothing secret is kept once used; a handshake after that keys afresh.
        assert!(tap.seen.lock().is_ok_and(|s| s.masters.is_empty() && s.sessions.is_empty()));
        handshake(&tap, profile, (&[9u8; 16], &[10u8; 14]), (&[11u8; 16], &[12u8; 14]));
        assert_eq!(tap.handshakes(), 3);
        let sealed = outbound(&tap, profile).expect("keyed").encrypt_rtp_with_header(&plain, &header).expect("encrypt");
        let mut peer = Context::new(&[9u8; 16], &[10u8; 14], profile, None, None, provider().crypto()).expect("peer");
        assert_eq!(peer.decrypt_rtp(&sealed).expect("decrypt").to_vec(), plain);
    }

    /// A profile read wrongly (its salt or key of another length) keys nothing rather
    /// than a context the peer cannot decrypt.
    #[test]
    fn a_wrong_profile_keys_nothing() {
        let tap = KeyTap::new(provider());
        handshake(&tap, ProtectionProfile::Aes128CmHmacSha1_80, (&[1u8; 16], &[2u8; 14]), (&[3u8; 16], &[4u8; 14]));
        assert!(outbound(&tap, ProtectionProfile::AeadAes128Gcm).is_none());
        assert!(outbound(&tap, ProtectionProfile::AeadAes256Gcm).is_none());
        assert!(matches!(profile("SRTP_AES128_CM_HMAC_SHA1_80"), Some(ProtectionProfile::Aes128CmHmacSha1_80)));
        assert!(profile("Unknown").is_none());
    }
}
