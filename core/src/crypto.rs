//! Small cryptographic helpers shared by tokens, tickets and the MAuth scheme.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// HMAC-SHA256(key, message) as lower-case hex (webhook signatures).
pub fn hmac_sha256_hex(key: &[u8], message: &[u8]) -> String {
    // unwrap-free: HMAC accepts keys of any length.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC-SHA256 accepts any key length"),
    };
    mac.update(message);
    hex::encode(mac.finalize().into_bytes())
}

/// OWT's signature encoding: base64 of the *hex string* of HMAC-SHA256(key, message).
pub fn owt_signature(key: &[u8], message: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(hmac_sha256_hex(key, message.as_bytes()))
}

/// Compares two secrets without leaking where they differ through timing.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// The MAuth request signature as OWT's management API checks it: over
/// `timestamp,cnonce` or, when the caller also names a user and role,
/// `timestamp,cnonce,username,role` (username in its base64-encoded form).
pub fn mauth_signature(service_key: &str, timestamp: &str, cnonce: &str, user_role: Option<(&str, &str)>) -> String {
    let message = match user_role {
        Some((user, role)) => format!("{timestamp},{cnonce},{user},{role}"),
        None => format!("{timestamp},{cnonce}"),
    };
    owt_signature(service_key.as_bytes(), &message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owt_signature_is_base64_of_hex() {
        use base64::Engine;
        let sig = owt_signature(b"key", "1,2");
        let decoded = base64::engine::general_purpose::STANDARD.decode(sig).unwrap();
        let s = String::from_utf8(decoded).unwrap();
        assert_eq!(s.len(), 64);
        assert!(s.bytes().all(|b| b.is_ascii_hexdigit()));
        // Known-answer: HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog").
        let kat = owt_signature(b"key", "The quick brown fox jumps over the lazy dog");
        let kat = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(kat).unwrap()).unwrap();
        assert_eq!(kat, "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8");
    }

    #[test]
    fn constant_time_eq_works() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}

/// TURN REST API credentials (draft-uberti-behave-turn-rest, coturn's `use-auth-secret`):
/// the user name `<expiry unix secs>:<participant>` and the credential
/// `base64(HMAC-SHA1(secret, user name))`, which a TURN server holding the same secret
/// checks without asking anyone.
pub fn turn_credentials(secret: &[u8], participant: &str, expires_at_secs: u64) -> (String, String) {
    let username = format!("{expires_at_secs}:{participant}");
    let password = turn_password(secret, &username);
    (username, password)
}

/// The TURN REST API credential of a user name: `base64(HMAC-SHA1(secret, user name))`.
pub fn turn_password(secret: &[u8], username: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(turn_password_mac(secret, username))
}

/// HMAC-SHA1 of a TURN user name with the shared secret (the credential before base64).
pub fn turn_password_mac(secret: &[u8], username: &str) -> Vec<u8> {
    let mut mac = match Hmac::<sha1::Sha1>::new_from_slice(secret) {
        Ok(m) => m,
        // HMAC takes keys of any length; this cannot happen.
        Err(_) => return Vec::new(),
    };
    mac.update(username.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

#[cfg(test)]
mod turn_tests {
    #[test]
    fn turn_credentials_match_coturns_scheme() {
        // RFC 2202 test case 2 for HMAC-SHA1: key "Jefe", data "what do ya want for nothing?".
        let mac = super::turn_password_mac(b"Jefe", "what do ya want for nothing?");
        assert_eq!(hex::encode(mac), "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79");
        let (user, cred) = super::turn_credentials(b"secret", "p1", 1_700_000_000);
        assert_eq!(user, "1700000000:p1");
        assert_eq!(cred.len(), 28, "base64 of 20 bytes");
    }
}
