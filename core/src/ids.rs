//! Identifier generation. Room ids look like OWT's (24 hex digits, a Mongo ObjectId in
//! OWT) and session ids like OWT's (32 hex digits, a dashless UUIDv4), so OWT clients and
//! scripts that pattern-match ids keep working.

use rand::RngCore;

/// Random lowercase hex string of `bytes * 2` digits from the OS-seeded thread RNG.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// A new room id: 24 hex digits.
pub fn room_id() -> String {
    random_hex(12)
}

/// A new publication, subscription, recording or token id: 32 hex digits.
pub fn session_id() -> String {
    random_hex(16)
}

/// True when `s` is a plausible id (OWT's `/^[0-9a-zA-Z\-]+$/`, bounded length), so ids
/// from clients can be rejected before any lookup or log line.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_owt_shapes() {
        let r = room_id();
        assert_eq!(r.len(), 24);
        assert!(r.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(session_id().len(), 32);
        assert_ne!(session_id(), session_id());
    }

    #[test]
    fn id_validation() {
        assert!(is_valid_id("abc-DEF_123"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id(&"a".repeat(129)));
    }
}
