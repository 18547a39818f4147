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
//! block derived — label 0, index 0 — is the salt itself. [`outbound`] then keys a
//! [`Sealer`] the same way and checks that it derives the very session key rtc's context
//! was given before it is used.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use rtc::crypto::{
    AeadAlgorithm, AeadCipher, BlockCipherAlgorithm, CryptoAlgorithm, CryptoError, HashAlgorithm, HmacAlgorithm, Mac, RTCCrypto, RTCCryptoProvider,
    RTCRandom, StreamCipher, StreamCipherAlgorithm,
};
use rtc::rtp;
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

/// A connection's outgoing SRTP protection, keyed as rtc's own local context: `None` when
/// the keys seen are not a handshake's, or do not derive the very session key rtc's
/// context was given (rtc's path then carries everything, as before).
pub fn outbound(tap: &KeyTap, profile: ProtectionProfile) -> Option<Sealer> {
    let (mut key, mut salt, mut session) = tap.local(profile.salt_len())?;
    tap.forget();
    let sealer = Sealer::new(profile, &key, &salt, &session);
    key.fill(0);
    salt.fill(0);
    session.fill(0);
    sealer
}

/// Bytes a sealed packet may grow by: the longest tag of a profile [`Sealer`] keys.
pub const MAX_TAG: usize = 16;

/// Forwarded packets' SRTP protection (RFC 3711's AES-CM with HMAC-SHA1, RFC 7714's
/// AES-GCM), done by Tessera: the key schedules are expanded once, when keyed, and each
/// packet is marshalled into the datagram buffer it leaves in and sealed there. rtc-srtp's
/// context (which Tessera used first) allocates the protected packet, looks the SSRC up in
/// a hash map and expands the AES key again for every packet.
pub struct Sealer {
    cipher: Cipher,
    /// What each SSRC sent so far, searched linearly: a connection sends a few.
    streams: Vec<Roll>,
    /// Packets sealed: the clock of [`Roll::used`].
    sealed: u64,
}

/// A profile's session keys, ready to use.
// One per connection, inside its boxed state: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Cipher {
    /// AES-128 in counter mode, HMAC-SHA1 truncated to `tag` bytes.
    Cm { aes: aes::Aes128Enc, salt: [u8; 14], auth: hmac::Hmac<sha1::Sha1>, tag: usize },
    /// AES-GCM (128 or 256), its 16-byte tag.
    Gcm { key: ring::aead::LessSafeKey, salt: [u8; 12] },
}

/// One SSRC's packet index as RFC 3711 Appendix A keeps it (the rollover count and the
/// highest sequence number sent), and which of the 64 indices up to the highest were used.
struct Roll {
    ssrc: u32,
    roc: u32,
    highest: u16,
    /// Bit `i`: index `highest − i` was sealed. An index is never sealed twice (libsrtp's
    /// sender refuses too): a repeat with other content would reuse a keystream, and
    /// under GCM a nonce.
    window: u64,
    /// When it was last sealed on, in the sealer's count (see [`MAX_STREAMS`]).
    used: u64,
}

impl Roll {
    fn new(ssrc: u32, seq: u16) -> Roll {
        Roll { ssrc, roc: 0, highest: seq, window: 0, used: 0 }
    }

    /// The rollover count a receiver estimates for `seq` (RFC 3711 Appendix A; while the
    /// first half cycle is not passed, libsrtp and rtc take the first cycle, not the one
    /// before).
    fn estimate(&self, seq: u16) -> u32 {
        const HALF: u16 = 0x8000;
        if self.roc == 0 && self.highest <= HALF {
            0
        } else if self.highest < HALF {
            if i32::from(seq) - i32::from(self.highest) > i32::from(HALF) { self.roc.wrapping_sub(1) } else { self.roc }
        } else if self.highest - HALF > seq {
            self.roc.wrapping_add(1)
        } else {
            self.roc
        }
    }

    /// The rollover count to seal `seq` with, the index marked used; `None` for an index
    /// already sealed or too old to tell, and once 2^48 packets were sealed (RFC 3711 §9.2:
    /// new keys are needed).
    fn advance(&mut self, seq: u16) -> Option<u32> {
        let v = self.estimate(seq);
        if v == 0 && self.roc == u32::MAX {
            return None;
        }
        let (new, top) = (packet_index(v, seq), packet_index(self.roc, self.highest));
        if new > top || self.window == 0 {
            let shift = new.saturating_sub(top);
            self.window = if shift >= 64 { 1 } else { (self.window << shift) | 1 };
            (self.roc, self.highest) = (v, seq);
        } else {
            let back = top - new;
            if back >= 64 || self.window & (1 << back) != 0 {
                return None;
            }
            self.window |= 1 << back;
        }
        Some(v)
    }
}

/// RFC 3711's 48-bit packet index: the rollover count, then the sequence number.
fn packet_index(roc: u32, seq: u16) -> u64 {
    (u64::from(roc) << 16) | u64::from(seq)
}

/// SSRCs a sealer keeps the state of; the one sealed on least recently makes room.
const MAX_STREAMS: usize = 64;

/// RFC 3711's key derivation (§4.3.1, AES-CM PRF, key derivation rate 0, as DTLS-SRTP
/// uses it; RFC 7714 §11 for GCM): `out.len()` bytes for `label`, with AES-128 or AES-256
/// as the master key's length says.
fn derive(master: &[u8], salt: &[u8], label: u8, out: &mut [u8]) -> Option<()> {
    use aes::cipher::{BlockEncrypt, KeyInit};
    let mut x = [0u8; 16];
    x.get_mut(..salt.len()).filter(|_| salt.len() <= 14)?.copy_from_slice(salt);
    x[7] ^= label;
    let aes128 = aes::Aes128Enc::new_from_slice(master).ok();
    let aes256 = aes::Aes256Enc::new_from_slice(master).ok();
    for (i, chunk) in out.chunks_mut(16).enumerate() {
        let mut block = x;
        let [hi, lo] = u16::try_from(i).ok()?.to_be_bytes();
        (block[14], block[15]) = (hi, lo);
        match (&aes128, &aes256) {
            (Some(k), _) => k.encrypt_block((&mut block).into()),
            (None, Some(k)) => k.encrypt_block((&mut block).into()),
            (None, None) => return None,
        }
        chunk.copy_from_slice(block.get(..chunk.len())?);
    }
    Some(())
}

impl Sealer {
    /// Keyed from a master key and salt for `profile`; `None` for a profile it does not
    /// do, keys of the wrong length, or when the encryption key it derives is not `expect`.
    pub fn new(profile: ProtectionProfile, master: &[u8], salt: &[u8], expect: &[u8]) -> Option<Sealer> {
        if master.len() != profile.key_len() || salt.len() != profile.salt_len() {
            return None;
        }
        let mut key = [0u8; 32];
        let key = key.get_mut(..profile.key_len())?;
        derive(master, salt, 0, key)?;
        let cipher = if *key != *expect {
            None
        } else {
            match profile {
                ProtectionProfile::Aes128CmHmacSha1_80 | ProtectionProfile::Aes128CmHmacSha1_32 => {
                    use aes::cipher::KeyInit;
                    let (mut s, mut auth) = ([0u8; 14], [0u8; 20]);
                    derive(master, salt, 2, &mut s)?;
                    derive(master, salt, 1, &mut auth)?;
                    let cipher = Cipher::Cm {
                        aes: aes::Aes128Enc::new_from_slice(key).ok()?,
                        salt: s,
                        auth: <hmac::Hmac<sha1::Sha1> as hmac::Mac>::new_from_slice(&auth).ok()?,
                        tag: profile.rtp_auth_tag_len(),
                    };
                    auth.fill(0);
                    Some(cipher)
                }
                ProtectionProfile::AeadAes128Gcm | ProtectionProfile::AeadAes256Gcm => {
                    let algorithm = if key.len() == 16 { &ring::aead::AES_128_GCM } else { &ring::aead::AES_256_GCM };
                    let mut s = [0u8; 12];
                    derive(master, salt, 2, &mut s)?;
                    let key = ring::aead::UnboundKey::new(algorithm, key).ok()?;
                    Some(Cipher::Gcm { key: ring::aead::LessSafeKey::new(key), salt: s })
                }
                _ => None,
            }
        };
        key.fill(0);
        cipher.map(|cipher| Sealer { cipher, streams: Vec::new(), sealed: 0 })
    }

    /// Marshals `packet` into `buf` (replacing what it held) and seals it there: the
    /// payload encrypted in place, the tag appended. False when it cannot be (nothing in
    /// `buf` is then to be sent).
    pub fn seal(&mut self, packet: &rtp::Packet, buf: &mut BytesMut) -> bool {
        use rtc::shared::marshal::{Marshal, MarshalSize};
        let (len, header_len) = (packet.marshal_size(), packet.header.marshal_size());
        buf.clear();
        buf.resize(len, 0);
        if packet.marshal_to(buf).ok() != Some(len) {
            return false;
        }
        let (ssrc, seq) = (packet.header.ssrc, packet.header.sequence_number);
        self.sealed += 1;
        let at = match self.streams.iter().position(|r| r.ssrc == ssrc) {
            Some(at) => at,
            None => {
                if self.streams.len() >= MAX_STREAMS
                    && let Some(oldest) = self.streams.iter().enumerate().min_by_key(|(_, r)| r.used).map(|(i, _)| i)
                {
                    self.streams.swap_remove(oldest);
                }
                self.streams.push(Roll::new(ssrc, seq));
                self.streams.len() - 1
            }
        };
        let Some(roll) = self.streams.get_mut(at) else { return false };
        roll.used = self.sealed;
        let Some(roc) = roll.advance(seq) else { return false };
        let Some((head, body)) = buf.split_at_mut_checked(header_len) else { return false };
        match &self.cipher {
            Cipher::Cm { aes, salt, auth, tag } => {
                use ctr::cipher::{InnerIvInit, StreamCipher};
                // IV = salt·2^16 ⊕ SSRC·2^64 ⊕ index·2^16 (RFC 3711 §4.1.1).
                let mut iv = [0u8; 16];
                let index = packet_index(roc, seq);
                iv[4..8].copy_from_slice(&ssrc.to_be_bytes());
                iv[8..14].copy_from_slice(&index.to_be_bytes()[2..]);
                iv.iter_mut().zip(salt).for_each(|(v, s)| *v ^= s);
                let core = ctr::CtrCore::<aes::Aes128Enc, ctr::flavors::Ctr128BE>::inner_iv_init(aes.clone(), &iv.into());
                ctr::Ctr128BE::from_core(core).apply_keystream(body);
                use hmac::Mac;
                // The keyed state is copied, not derived again from the key.
                let mut mac = auth.clone();
                mac.update(buf);
                mac.update(&roc.to_be_bytes());
                let signed = mac.finalize().into_bytes();
                let Some(tag) = signed.get(..*tag) else { return false };
                buf.extend_from_slice(tag);
            }
            Cipher::Gcm { key, salt } => {
                // IV = (00 00 ‖ SSRC ‖ ROC ‖ SEQ) ⊕ salt (RFC 7714 §8.1); the header is
                // the associated data.
                let mut iv = [0u8; 12];
                iv[2..6].copy_from_slice(&ssrc.to_be_bytes());
                iv[6..10].copy_from_slice(&roc.to_be_bytes());
                iv[10..12].copy_from_slice(&seq.to_be_bytes());
                iv.iter_mut().zip(salt).for_each(|(v, s)| *v ^= s);
                let nonce = ring::aead::Nonce::assume_unique_for_key(iv);
                let Ok(tag) = key.seal_in_place_separate_tag(nonce, ring::aead::Aad::from(&*head), body) else { return false };
                buf.extend_from_slice(tag.as_ref());
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use rtc::rtp;
    use rtc::shared::marshal::Marshal;
    use rtc::srtp::context::Context;

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

    fn packet(seq: u16) -> rtp::Packet {
        packet_on(0x1234_5678, seq, 300, false)
    }

    fn packet_on(ssrc: u32, seq: u16, len: usize, padding: bool) -> rtp::Packet {
        let header = rtp::Header { version: 2, padding, payload_type: 96, sequence_number: seq, timestamp: 9000, ssrc, ..Default::default() };
        rtp::Packet { header, payload: bytes::Bytes::from(vec![seq as u8; len]) }
    }

    /// What `sealer` sends for `p`, sealed in a buffer that held something else.
    fn sealed(sealer: &mut Sealer, p: &rtp::Packet) -> Vec<u8> {
        let mut buf = BytesMut::from(&[0xAAu8; 2000][..]);
        assert!(sealer.seal(p, &mut buf));
        buf.to_vec()
    }

    /// Ours encrypts exactly as an rtc-srtp context keyed with rtc's local master key, and
    /// what it sends the peer's remote context (keyed the same) decrypts: every profile,
    /// across a sequence-number wrap, with padding, on several SSRCs.
    #[test]
    fn the_sealer_is_keyed_as_rtcs_local_context() {
        for profile in [
            ProtectionProfile::Aes128CmHmacSha1_80,
            ProtectionProfile::Aes128CmHmacSha1_32,
            ProtectionProfile::AeadAes128Gcm,
            ProtectionProfile::AeadAes256Gcm,
        ] {
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
            let mut sent = 0;
            for (ssrc, first) in [(0x1234_5678u32, 65_000u16), (0x0BAD_CAFE, 65_500), (7, 3)] {
                for n in 0..1200u16 {
                    let p = packet_on(ssrc, first.wrapping_add(n), 40 + usize::from(n % 900), n % 7 == 0);
                    let plain = p.marshal().expect("marshal");
                    let got = sealed(&mut ours, &p);
                    assert_eq!(got, reference.encrypt_rtp_with_header(&plain, &p.header).expect("encrypt").to_vec(), "{profile:?} {ssrc} {n}");
                    assert_eq!(peer.decrypt_rtp(&got).expect("decrypt").to_vec(), plain.to_vec(), "{profile:?} {ssrc} {n}");
                    sent += 1;
                }
            }
            assert_eq!(sent, 3600);
        }
    }

    /// The rollover count follows the sequence numbers as a receiver estimates it: up at
    /// a wrap, the cycle before for a late packet from it, and never below the first.
    #[test]
    fn the_rollover_count_is_estimated_as_a_receiver_does() {
        let mut r = Roll::new(1, 100);
        assert_eq!(r.advance(100), Some(0));
        assert_eq!(r.advance(40_000), Some(0), "the first half cycle: no cycle before the first");
        assert_eq!(r.advance(65_500), Some(0));
        assert_eq!(r.advance(2), Some(1));
        assert_eq!(r.advance(65_534), Some(0), "late, from the cycle before");
        assert_eq!((r.roc, r.highest), (1, 2));
        for seq in (3..=65_535).chain(0..10) {
            assert!(r.advance(seq).is_some());
        }
        assert_eq!((r.roc, r.highest), (2, 9));
        assert_eq!(r.advance(9), None, "an index is never sealed twice");
        assert_eq!(r.advance(65_535), None, "nor the cycle before's again");
        r.window &= !(1 << 4);
        assert_eq!(r.advance(5), Some(2), "reordered inside the cycle, not sent yet");
        assert_eq!(r.advance(5), None);
        assert_eq!(r.highest, 9);
        assert_eq!(Roll::new(1, 9).advance(9), Some(0));
        // Older than the window: refused rather than guessed.
        let mut r = Roll::new(1, 1000);
        assert!(r.advance(1000).is_some() && r.advance(1100).is_some());
        assert_eq!(r.advance(1001), None);
        // 2^48 packets: keys must change, nothing more is sealed.
        let mut r = Roll { roc: u32::MAX, highest: 65_535, ..Roll::new(1, 0) };
        r.window = 1;
        assert_eq!(r.advance(0), None);
    }

    /// A repeated packet is not sealed again; a connection keeps at most [`MAX_STREAMS`]
    /// streams' state, making room by the least recently used.
    #[test]
    fn repeats_are_refused_and_streams_are_bounded() {
        let mut sealer = Sealer::new(ProtectionProfile::AeadAes128Gcm, &[1u8; 16], &[2u8; 12], &{
            let mut k = [0u8; 16];
            derive(&[1u8; 16], &[2u8; 12], 0, &mut k).expect("derive");
            k
        })
        .expect("keyed");
        let mut buf = BytesMut::new();
        assert!(sealer.seal(&packet(7), &mut buf));
        assert!(!sealer.seal(&packet(7), &mut buf), "the same index twice");
        assert!(sealer.seal(&packet(8), &mut buf));
        for ssrc in 0..200u32 {
            assert!(sealer.seal(&packet_on(ssrc, 1, 10, false), &mut buf));
        }
        assert_eq!(sealer.streams.len(), MAX_STREAMS);
        assert!(sealer.streams.iter().all(|r| r.ssrc >= 200 - MAX_STREAMS as u32));
    }

    /// After a second handshake the sealer comes from its keys; before any (or with half
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
        let p = packet(10);
        let plain = p.marshal().expect("marshal").to_vec();
        let got = sealed(&mut outbound(&tap, profile).expect("keyed"), &p);
        let mut peer = Context::new(&[5u8; 16], &[6u8; 14], profile, None, None, provider().crypto()).expect("peer");
        assert_eq!(peer.decrypt_rtp(&got).expect("decrypt").to_vec(), plain);
        // Nothing secret is kept once used; a handshake after that keys afresh.
        assert!(tap.seen.lock().is_ok_and(|s| s.masters.is_empty() && s.sessions.is_empty()));
        handshake(&tap, profile, (&[9u8; 16], &[10u8; 14]), (&[11u8; 16], &[12u8; 14]));
        assert_eq!(tap.handshakes(), 3);
        let got = sealed(&mut outbound(&tap, profile).expect("keyed"), &p);
        let mut peer = Context::new(&[9u8; 16], &[10u8; 14], profile, None, None, provider().crypto()).expect("peer");
        assert_eq!(peer.decrypt_rtp(&got).expect("decrypt").to_vec(), plain);
    }

    /// Keys that do not derive the session key rtc was given key nothing.
    #[test]
    fn a_session_key_other_than_rtcs_keys_nothing() {
        let profile = ProtectionProfile::AeadAes128Gcm;
        assert!(Sealer::new(profile, &[1u8; 16], &[2u8; 12], &[0u8; 16]).is_none());
        let mut key = [0u8; 16];
        derive(&[1u8; 16], &[2u8; 12], 0, &mut key).expect("derive");
        assert!(Sealer::new(profile, &[1u8; 16], &[2u8; 12], &key).is_some());
        assert!(Sealer::new(profile, &[1u8; 16], &[2u8; 14], &key).is_none(), "a salt of another profile");
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
