//! Participant tokens: what the management API hands out and the portal accepts at
//! `login`.
//!
//! The string a client receives is OWT-shaped — base64 of a JSON object with `tokenId`,
//! `host` (the portal's host:port), `secure` and `signature` — because the OWT JS SDK
//! reads `host`/`secure` from it to find the portal. Unlike OWT, whose signature is an
//! HMAC over the id and host with the real grant kept in a database, our `signature` is
//! an HS256 JWT carrying the whole grant (room, user, role, expiry, id). The portal
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
        };
        let jwt = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(&self.key))
            .map_err(|e| TokenError::Signing(e.to_string()))?;
        let envelope = TokenEnvelope {
            token_id: claims.jti.clone(),
            host: portal.host.clone(),
            secure: portal.secure,
            signature: jwt,
        };
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
        let data = jsonwebtoken::decode::<TokenClaims>(&envelope.signature, &DecodingKey::from_secret(&self.key), &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => TokenError::BadSignature,
                _ => TokenError::Malformed,
            })?;
        let claims = data.claims;
        // The outer id is unsigned; it must agree with the signed one or the ledger could
        // be fooled into tracking the wrong id.
        if !crate::crypto::constant_time_eq(claims.jti.as_bytes(), envelope.token_id.as_bytes()) {
            return Err(TokenError::BadSignature);
        }
        if now >= claims.exp {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

/// Remembers used token ids until they expire, so each token logs in once.
#[derive(Debug, Default)]
pub struct TokenLedger {
    used: Mutex<HashMap<String, u64>>,
}

impl TokenLedger {
    /// Marks the token used; fails if it was used before. Forgets expired entries, which
    /// can no longer verify anyway, so the ledger stays as small as the live tokens.
    pub fn consume(&self, claims: &TokenClaims, now: u64) -> Result<(), TokenError> {
        // A poisoned lock only means another thread panicked mid-insert; the map is still usable.
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        used.retain(|_, exp| *exp > now);
        if used.contains_key(&claims.jti) {
            return Err(TokenError::Replayed);
        }
        used.insert(claims.jti.clone(), claims.exp);
        Ok(())
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
    }

    #[test]
    fn malformed() {
        let a = TokenAuthority::new(b"secret");
        assert_eq!(a.verify("not base64!!", 0), Err(TokenError::Malformed));
        assert_eq!(a.verify(&B64.encode("{}"), 0), Err(TokenError::Malformed));
        assert_eq!(a.verify(&B64.encode(r#"{"tokenId":"a","host":"h","secure":false,"signature":"x.y.z"}"#), 0), Err(TokenError::Malformed));
    }

    #[test]
    fn replayed() {
        let a = TokenAuthority::new(b"secret");
        let ledger = TokenLedger::default();
        let (tok, _) = a.issue("r", "u", "presenter", &portal(), 1000, 180).unwrap();
        let c = a.verify(&tok, 1001).unwrap();
        ledger.consume(&c, 1001).unwrap();
        assert_eq!(ledger.consume(&c, 1002), Err(TokenError::Replayed));
        // Entries are pruned after expiry (by then verify refuses the token anyway).
        let (tok2, _) = a.issue("r", "u", "presenter", &portal(), 2000, 180).unwrap();
        ledger.consume(&a.verify(&tok2, 2000).unwrap(), 2000).unwrap();
        assert_eq!(ledger.used.lock().unwrap().len(), 1);
    }
}
