//! Participant tokens: what the management API hands out and the portal accepts at
//! `login`.
//!
//! The string a client receives is OWT-shaped — base64 of a JSON object with `tokenId`,
//! `host` (the portal's host:port), `secure` and `signature` — because the OWT JS SDK
//! reads `host`/`secure` from it to find the portal. Unlike OWT, whose signature is an
//! HMAC over the id and host with the real grant kept in a database, our `signature` is
//! an HS256 JWT carrying the whole grant (room, user, role, expiry, id) and the envelope's
//! `host`/`secure`, so a token cannot be pointed at another portal. The portal
//! therefore needs no shared database, only the service key and a ledger of used ids.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not base64 of a JSON token object.
    #[error("Malformed token")]
    Malformed,
    /// The signature does not verify with this server's key (tampered or foreign token).
    #[error("Invalid token signature")]
    BadSignature,
    /// Past its expiry.
    #[error("Token expired")]
    Expired,
    /// Already used for a login.
    #[error("Token already used")]
    Replayed,
    /// The shared ledger (the cluster's) cannot be reached, so the token cannot be spent.
    #[error("Login unavailable, retry later: {0}")]
    Unavailable(String),
    /// Signing failed (a bug, not a client error).
    #[error("Token signing failed: {0}")]
    Signing(String),
}

/// The grant a token carries, as signed into its JWT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    /// Token id, unique; equal to the outer `tokenId`.
    pub jti: String,
    /// Room id.
    pub room: String,
    /// User name chosen by the issuer.
    pub user: String,
    /// Role name in the room.
    pub role: String,
    /// Issued at, unix seconds.
    pub iat: u64,
    /// Expires at, unix seconds.
    pub exp: u64,
    /// The portal `host:port` of the envelope, signed so it cannot be redirected.
    pub host: String,
    /// The envelope's `secure` flag, signed for the same reason.
    pub secure: bool,
}

/// The outer, OWT-compatible token object.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenEnvelope {
    token_id: String,
    host: String,
    secure: bool,
    signature: String,
}

/// Creates and verifies participant tokens with one service key.
#[derive(Clone)]
pub struct TokenAuthority {
    key: Vec<u8>,
}

impl std::fmt::Debug for TokenAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenAuthority { key: <hidden> }")
    }
}

/// Where a token sends its client: the portal's public host:port and scheme.
#[derive(Debug, Clone)]
pub struct PortalAddress {
    /// `host:port` as clients reach the portal.
    pub host: String,
    /// Whether clients must use https/wss.
    pub secure: bool,
}

impl TokenAuthority {
    /// An authority signing with `key` (the service key's bytes).
    pub fn new(key: &[u8]) -> Self {
        TokenAuthority { key: key.to_vec() }
    }

    /// Issues a token for `user` in `room` with `role`, valid for `lifetime_secs` from `now`.
    pub fn issue(
        &self,
        room: &str,
        user: &str,
        role: &str,
        portal: &PortalAddress,
        now: u64,
        lifetime_secs: u64,
    ) -> Result<(String, TokenClaims), TokenError> {
        let claims = TokenClaims {
            jti: crate::ids::session_id(),
            room: room.into(),
            user: user.into(),
            role: role.into(),
            iat: now,
            exp: now.saturating_add(lifetime_secs),
            host: portal.host.clone(),
            secure: portal.secure,
        };
        let jwt = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(&self.key))
            .map_err(|e| TokenError::Signing(e.to_string()))?;
        let envelope = TokenEnvelope { token_id: claims.jti.clone(), host: portal.host.clone(), secure: portal.secure, signature: jwt };
        let json = serde_json::to_vec(&envelope).map_err(|e| TokenError::Signing(e.to_string()))?;
        Ok((B64.encode(json), claims))
    }

    /// Checks a token's signature and expiry at `now` and returns its grant. Single use is
    /// the [`TokenLedger`]'s job, since it needs shared state.
    pub fn verify(&self, token: &str, now: u64) -> Result<TokenClaims, TokenError> {
        let raw = B64.decode(token.trim().as_bytes()).map_err(|_| TokenError::Malformed)?;
        let envelope: TokenEnvelope = serde_json::from_slice(&raw).map_err(|_| TokenError::Malformed)?;
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is checked below against the caller's clock, without leeway.
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        let data =
            jsonwebtoken::decode::<TokenClaims>(&envelope.signature, &DecodingKey::from_secret(&self.key), &validation).map_err(|e| {
                match e.kind() {
                    jsonwebtoken::errors::ErrorKind::InvalidSignature => TokenError::BadSignature,
                    _ => TokenError::Malformed,
                }
            })?;
        let claims = data.claims;
        // The outer fields are what OWT clients read; each must agree with its signed copy,
        // or the ledger could track the wrong id and a client be sent to another portal.
        let same = crate::crypto::constant_time_eq(claims.jti.as_bytes(), envelope.token_id.as_bytes())
            & crate::crypto::constant_time_eq(claims.host.as_bytes(), envelope.host.as_bytes())
            & (claims.secure == envelope.secure);
        if !same {
            return Err(TokenError::BadSignature);
        }
        if now >= claims.exp {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

/// Remembers which tokens logged in, so each logs in once: this node's memory
/// ([`LocalLedger`]), or in a cluster a bucket every portal shares (`tessera-cluster`), so
/// a token used on one portal is refused on all the others.
#[async_trait::async_trait]
pub trait TokenLedger: Send + Sync {
    /// Marks the token used; fails with [`TokenError::Replayed`] if it was used before.
    /// Atomic across every portal sharing the ledger: of two logins racing with one token,
    /// one wins. Returns a receipt for [`TokenLedger::release`].
    async fn consume(&self, claims: &TokenClaims, now: u64) -> Result<Spent, TokenError>;
    /// Gives back a token whose login failed after it was consumed (say, the room filled
    /// up meanwhile), so the user can retry with it; only this consume's use, never
    /// another login's.
    async fn release(&self, claims: &TokenClaims, spent: Spent);
}

/// What a ledger needs to give back exactly one use of a token (the entry's revision in
/// a cluster's ledger).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spent(pub u64);

/// The ledger of one node: used token ids in memory until they expire.
#[derive(Debug, Default)]
pub struct LocalLedger {
    used: Mutex<HashMap<String, u64>>,
}

#[async_trait::async_trait]
impl TokenLedger for LocalLedger {
    /// Forgets expired entries, which can no longer verify anyway, so the ledger stays as
    /// small as the live tokens.
    async fn consume(&self, claims: &TokenClaims, now: u64) -> Result<Spent, TokenError> {
        // A poisoned lock only means another thread panicked mid-insert; the map is still usable.
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        used.retain(|_, exp| *exp > now);
        if used.contains_key(&claims.jti) {
            return Err(TokenError::Replayed);
        }
        used.insert(claims.jti.clone(), claims.exp);
        Ok(Spent(0))
    }

    async fn release(&self, claims: &TokenClaims, _spent: Spent) {
        // One process: the use being given back is the only one there can be.
        self.used.lock().unwrap_or_else(|p| p.into_inner()).remove(&claims.jti);
    }
}

/// Reads the portal address a token points to, without verifying it (for clients and tests).
pub fn peek_host(token: &str) -> Option<(String, bool)> {
    let raw = B64.decode(token.trim().as_bytes()).ok()?;
    let env: TokenEnvelope = serde_json::from_slice(&raw).ok()?;
    Some((env.host, env.secure))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn portal() -> PortalAddress {
        PortalAddress { host: "127.0.0.1:8080".into(), secure: false }
    }

    #[test]
    fn issue_and_verify() {
        let a = TokenAuthority::new(b"secret");
        let (tok, claims) = a.issue("room1", "alice", "presenter", &portal(), 1000, 180).unwrap();
        let got = a.verify(&tok, 1001).unwrap();
        assert_eq!(got, claims);
        assert_eq!(got.exp, 1180);
        // OWT-shaped envelope.
        let env: serde_json::Value = serde_json::from_slice(&B64.decode(&tok).unwrap()).unwrap();
        assert_eq!(env["host"], "127.0.0.1:8080");
        assert_eq!(env["secure"], false);
        assert_eq!(env["tokenId"], claims.jti.as_str());
        assert!(env["signature"].as_str().unwrap().split('.').count() == 3);
        assert_eq!(peek_host(&tok), Some(("127.0.0.1:8080".into(), false)));
    }

    #[test]
    fn expired() {
        let a = TokenAuthority::new(b"secret");
        let (tok, _) = a.issue("r", "u", "presenter", &portal(), 1000, 180).unwrap();
        assert_eq!(a.verify(&tok, 1180), Err(TokenError::Expired));
    }

    #[test]
    fn wrong_key() {
        let a = TokenAuthority::new(b"secret");
        let b = TokenAuthority::new(b"other");
        let (tok, _) = a.issue("r", "u", "presenter", &portal(), 1000, 180).unwrap();
        assert_eq!(b.verify(&tok, 1001), Err(TokenError::BadSignature));
    }

    #[test]
    fn tampered_claims_and_envelope() {
        let a = TokenAuthority::new(b"secret");
        let (tok, _) = a.issue("r", "u", "viewer", &portal(), 1000, 180).unwrap();
        let mut env: serde_json::Value = serde_json::from_slice(&B64.decode(&tok).unwrap()).unwrap();
        // Swap the JWT payload for one claiming another role and room.
        let jwt = env["signature"].as_str().unwrap().to_string();
        let parts: Vec<&str> = jwt.split('.').collect();
        let b64u = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut payload: serde_json::Value = serde_json::from_slice(&b64u.decode(parts[1]).unwrap()).unwrap();
        payload["role"] = "presenter".into();
        payload["room"] = "other-room".into();
        let forged = format!("{}.{}.{}", parts[0], b64u.encode(payload.to_string()), parts[2]);
        env["signature"] = forged.into();
        let forged_tok = B64.encode(env.to_string());
        assert_eq!(a.verify(&forged_tok, 1001), Err(TokenError::BadSignature));
        // Changing the unsigned outer id is caught too.
        let mut env2: serde_json::Value = serde_json::from_slice(&B64.decode(&tok).unwrap()).unwrap();
        env2["tokenId"] = "ffff".into();
        assert_eq!(a.verify(&B64.encode(env2.to_string()), 1001), Err(TokenError::BadSignature));
        // So is a token pointed at another portal, or switched to plain http.
        let mut env3: serde_json::Value = serde_json::from_slice(&B64.decode(&tok).unwrap()).unwrap();
        env3["host"] = "evil.example:443".into();
        assert_eq!(a.verify(&B64.encode(env3.to_string()), 1001), Err(TokenError::BadSignature));
        let secure = PortalAddress { host: "127.0.0.1:8080".into(), secure: true };
        let (tok4, _) = a.issue("r", "u", "viewer", &secure, 1000, 180).unwrap();
        let mut env4: serde_json::Value = serde_json::from_slice(&B64.decode(&tok4).unwrap()).unwrap();
        assert!(a.verify(&tok4, 1001).is_ok());
        env4["secure"] = false.into();
        assert_eq!(a.verify(&B64.encode(env4.to_string()), 1001), Err(TokenError::BadSignature));
    }

    #[test]
    fn malformed() {
        let a = TokenAuthority::new(b"secret");
        assert_eq!(a.verify("not base64!!", 0), Err(TokenError::Malformed));
        assert_eq!(a.verify(&B64.encode("{}"), 0), Err(TokenError::Malformed));
        assert_eq!(a.verify(&B64.encode(r#"{"tokenId":"a","host":"h","secure":false,"signature":"x.y.z"}"#), 0), Err(TokenError::Malformed));
    }

    #[tokio::test]
    async fn replayed_and_released() {
        let a = TokenAuthority::new(b"secret");
        let ledger = LocalLedger::default();
        let (tok, _) = a.issue("r", "u", "presenter", &portal(), 1000, 180).unwrap();
        let c = a.verify(&tok, 1001).unwrap();
        let spent = ledger.consume(&c, 1001).await.unwrap();
        assert_eq!(ledger.consume(&c, 1002).await, Err(TokenError::Replayed));
        // A released token (its login failed after all) can be used again, once.
        ledger.release(&c, spent).await;
        ledger.consume(&c, 1003).await.unwrap();
        assert_eq!(ledger.consume(&c, 1004).await, Err(TokenError::Replayed));
        // Entries are pruned after expiry (by then verify refuses the token anyway).
        let (tok2, _) = a.issue("r", "u", "presenter", &portal(), 2000, 180).unwrap();
        ledger.consume(&a.verify(&tok2, 2000).unwrap(), 2000).await.unwrap();
        assert_eq!(ledger.used.lock().unwrap().len(), 1);
    }
}

/// Property tests: `verify` never panics, never accepts an altered token with other
/// claims, and every issued token verifies to exactly what was issued.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &[u8] = b"property-test-service-key";

    fn config() -> ProptestConfig {
        ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() }
    }

    /// Any string, control characters and non-BMP characters included.
    fn text(max: usize) -> impl Strategy<Value = String> {
        prop::collection::vec(any::<char>(), 0..max).prop_map(String::from_iter)
    }

    /// One byte-level edit at a position chosen relative to the input's length.
    #[derive(Debug, Clone)]
    enum Edit {
        Flip(prop::sample::Index, u8),
        Insert(prop::sample::Index, u8),
        Delete(prop::sample::Index),
    }

    fn edits() -> impl Strategy<Value = Vec<Edit>> {
        let edit = prop_oneof![
            (any::<prop::sample::Index>(), 1..=255u8).prop_map(|(i, x)| Edit::Flip(i, x)),
            (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
            any::<prop::sample::Index>().prop_map(Edit::Delete),
        ];
        prop::collection::vec(edit, 1..4)
    }

    fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
        for e in edits {
            match e {
                Edit::Flip(i, x) if !bytes.is_empty() => {
                    let i = i.index(bytes.len());
                    bytes[i] ^= x;
                }
                Edit::Insert(i, b) => {
                    let i = i.index(bytes.len() + 1);
                    bytes.insert(i, *b);
                }
                Edit::Delete(i) if !bytes.is_empty() => {
                    let i = i.index(bytes.len());
                    bytes.remove(i);
                }
                _ => {}
            }
        }
        bytes
    }

    fn issued() -> (TokenAuthority, String, TokenClaims) {
        let a = TokenAuthority::new(KEY);
        let portal = PortalAddress { host: "portal.example:8080".into(), secure: true };
        let (tok, claims) = a.issue("room1", "alice", "presenter", &portal, 1000, 180).unwrap();
        (a, tok, claims)
    }

    /// The verdict on an altered token: refused, or (if the edit was a no-op for the
    /// parsers, e.g. whitespace in the JSON) exactly the original grant.
    fn check_mutant(a: &TokenAuthority, mutant: &str, claims: &TokenClaims) -> Result<(), TestCaseError> {
        if let Ok(got) = a.verify(mutant, 1001) {
            prop_assert_eq!(&got, claims, "altered token {:?} verified with other claims", mutant);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn verify_refuses_arbitrary_strings(s in text(200)) {
            let a = TokenAuthority::new(KEY);
            prop_assert!(a.verify(&s, 0).is_err());
            let _ = peek_host(&s);
        }

        #[test]
        fn verify_refuses_base64_of_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let a = TokenAuthority::new(KEY);
            prop_assert!(a.verify(&B64.encode(&bytes), 0).is_err());
        }

        #[test]
        fn verify_refuses_envelopes_with_arbitrary_fields(id in text(20), host in text(20), secure in any::<bool>(), sig in text(80)) {
            let a = TokenAuthority::new(KEY);
            let env = TokenEnvelope { token_id: id, host, secure, signature: sig };
            let tok = B64.encode(serde_json::to_vec(&env).unwrap());
            prop_assert!(a.verify(&tok, 0).is_err());
        }

        #[test]
        fn issue_then_verify_round_trips(
            room in text(40), user in text(40), role in text(40), host in text(40), secure in any::<bool>(),
            now in 0..u64::MAX / 2, lifetime in 1..u64::MAX / 2,
        ) {
            let a = TokenAuthority::new(KEY);
            let portal = PortalAddress { host: host.clone(), secure };
            let (tok, claims) = a.issue(&room, &user, &role, &portal, now, lifetime).unwrap();
            prop_assert_eq!((&claims.room, &claims.user, &claims.role, &claims.host), (&room, &user, &role, &host));
            prop_assert_eq!(claims.exp, now + lifetime);
            prop_assert_eq!(a.verify(&tok, now), Ok(claims.clone()));
            prop_assert_eq!(a.verify(&tok, claims.exp - 1), Ok(claims.clone()));
            prop_assert_eq!(a.verify(&tok, claims.exp), Err(TokenError::Expired));
            prop_assert_eq!(TokenAuthority::new(b"another key").verify(&tok, now), Err(TokenError::BadSignature));
            prop_assert_eq!(peek_host(&tok), Some((host, secure)));
        }

        #[test]
        fn altered_base64_never_verifies_with_other_claims(e in edits()) {
            let (a, tok, claims) = issued();
            let mutant = String::from_utf8_lossy(&apply(tok.into_bytes(), &e)).into_owned();
            check_mutant(&a, &mutant, &claims)?;
        }

        #[test]
        fn altered_envelope_json_never_verifies_with_other_claims(e in edits()) {
            let (a, tok, claims) = issued();
            let json = B64.decode(&tok).unwrap();
            check_mutant(&a, &B64.encode(apply(json, &e)), &claims)?;
        }

        #[test]
        fn altered_jwt_never_verifies_with_other_claims(part in 0..3usize, decoded in any::<bool>(), e in edits()) {
            let (a, tok, claims) = issued();
            let mut env: TokenEnvelope = serde_json::from_slice(&B64.decode(&tok).unwrap()).unwrap();
            let mut parts: Vec<String> = env.signature.split('.').map(str::to_string).collect();
            let b64u = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            parts[part] = if decoded {
                // Edit the JSON (or signature bytes) under the base64url, as a forger would.
                b64u.encode(apply(b64u.decode(&parts[part]).unwrap(), &e))
            } else {
                String::from_utf8_lossy(&apply(parts[part].clone().into_bytes(), &e)).into_owned()
            };
            env.signature = parts.join(".");
            check_mutant(&a, &B64.encode(serde_json::to_vec(&env).unwrap()), &claims)?;
        }
    }
}
