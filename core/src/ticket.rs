//! Reconnection tickets: what lets a participant whose socket dropped resume the same
//! session on a new socket (`relogin`).
//!
//! Shaped like OWT's (base64 of JSON with `participantId`, `ticketId`, `notBefore`,
//! `notAfter` in ms, `signature`) because the OWT JS SDK decodes it to schedule
//! `refreshReconnectionTicket` at `notAfter`. Our `signature` is an HS256 JWT over the
//! same fields, with a per-process key (a restarted portal has no sessions to resume).
//! Every outer field is checked against the signed copy in constant time — OWT compared
//! with `!==` and left `ticketId` unsigned.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::crypto::constant_time_eq;

/// Why a ticket was refused; messages follow OWT's where OWT has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// Not a ticket at all.
    #[error("Invalid reconnection ticket")]
    Malformed,
    /// Signed by another key or altered.
    #[error("Invalid reconnection ticket signature")]
    BadSignature,
    /// Outside its notBefore..notAfter window.
    #[error("Ticket is expired")]
    Expired,
    /// Signing failed (a bug, not a client error).
    #[error("Ticket signing failed: {0}")]
    Signing(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TicketBody {
    participant_id: String,
    ticket_id: String,
    not_before: u64,
    not_after: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TicketEnvelope {
    participant_id: String,
    ticket_id: String,
    not_before: u64,
    not_after: u64,
    signature: String,
}

/// A verified ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The participant it resumes.
    pub participant_id: String,
    /// Unique id of this ticket.
    pub ticket_id: String,
    /// Valid from, unix ms.
    pub not_before: u64,
    /// Valid until, unix ms.
    pub not_after: u64,
}

/// Issues and checks reconnection tickets with one (per-process) key.
#[derive(Clone)]
pub struct TicketAuthority {
    key: Vec<u8>,
}

impl std::fmt::Debug for TicketAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TicketAuthority { key: <hidden> }")
    }
}

impl TicketAuthority {
    /// An authority with a fresh random key.
    pub fn random() -> Self {
        TicketAuthority { key: crate::ids::random_hex(32).into_bytes() }
    }

    /// An authority with a given key (tests).
    pub fn with_key(key: &[u8]) -> Self {
        TicketAuthority { key: key.to_vec() }
    }

    /// A ticket for `participant_id` valid from `now_ms` for `lifetime_ms`.
    pub fn issue(&self, participant_id: &str, now_ms: u64, lifetime_ms: u64) -> Result<String, TicketError> {
        let body = TicketBody {
            participant_id: participant_id.into(),
            ticket_id: crate::ids::random_hex(8),
            not_before: now_ms,
            not_after: now_ms.saturating_add(lifetime_ms),
        };
        let jwt = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &body, &EncodingKey::from_secret(&self.key))
            .map_err(|e| TicketError::Signing(e.to_string()))?;
        let env = TicketEnvelope {
            participant_id: body.participant_id,
            ticket_id: body.ticket_id,
            not_before: body.not_before,
            not_after: body.not_after,
            signature: jwt,
        };
        let json = serde_json::to_vec(&env).map_err(|e| TicketError::Signing(e.to_string()))?;
        Ok(B64.encode(json))
    }

    /// Verifies a ticket string at `now_ms`.
    pub fn verify(&self, ticket: &str, now_ms: u64) -> Result<Ticket, TicketError> {
        let raw = B64.decode(ticket.trim().as_bytes()).map_err(|_| TicketError::Malformed)?;
        let env: TicketEnvelope = serde_json::from_slice(&raw).map_err(|_| TicketError::Malformed)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        let signed = jsonwebtoken::decode::<TicketBody>(&env.signature, &DecodingKey::from_secret(&self.key), &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => TicketError::BadSignature,
                _ => TicketError::Malformed,
            })?
            .claims;
        let same = constant_time_eq(signed.participant_id.as_bytes(), env.participant_id.as_bytes())
            & constant_time_eq(signed.ticket_id.as_bytes(), env.ticket_id.as_bytes())
            & constant_time_eq(&signed.not_before.to_be_bytes(), &env.not_before.to_be_bytes())
            & constant_time_eq(&signed.not_after.to_be_bytes(), &env.not_after.to_be_bytes());
        if !same {
            return Err(TicketError::BadSignature);
        }
        if now_ms < signed.not_before || now_ms > signed.not_after {
            return Err(TicketError::Expired);
        }
        Ok(Ticket {
            participant_id: signed.participant_id,
            ticket_id: signed.ticket_id,
            not_before: signed.not_before,
            not_after: signed.not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_owt_shape() {
        let a = TicketAuthority::with_key(b"k");
        let t = a.issue("p1", 10_000, 600_000).unwrap();
        let v = a.verify(&t, 10_001).unwrap();
        assert_eq!(v.participant_id, "p1");
        assert_eq!(v.not_after, 610_000);
        let env: serde_json::Value = serde_json::from_slice(&B64.decode(&t).unwrap()).unwrap();
        assert_eq!(env["participantId"], "p1");
        assert_eq!(env["notAfter"], 610_000);
    }

    #[test]
    fn expiry_window() {
        let a = TicketAuthority::with_key(b"k");
        let t = a.issue("p1", 10_000, 1000).unwrap();
        assert_eq!(a.verify(&t, 9_999), Err(TicketError::Expired));
        assert_eq!(a.verify(&t, 11_001), Err(TicketError::Expired));
    }

    #[test]
    fn forged_and_rebound() {
        let a = TicketAuthority::with_key(b"k");
        let other = TicketAuthority::with_key(b"x");
        let t = other.issue("p1", 0, 1000).unwrap();
        assert_eq!(a.verify(&t, 1), Err(TicketError::BadSignature));
        // Someone else's ticket with the outer participant id rewritten.
        let t = a.issue("p1", 0, 1000).unwrap();
        let mut env: serde_json::Value = serde_json::from_slice(&B64.decode(&t).unwrap()).unwrap();
        env["participantId"] = "p2".into();
        assert_eq!(a.verify(&B64.encode(env.to_string()), 1), Err(TicketError::BadSignature));
        // Extended notAfter.
        let mut env: serde_json::Value = serde_json::from_slice(&B64.decode(&t).unwrap()).unwrap();
        env["notAfter"] = 99_999.into();
        assert_eq!(a.verify(&B64.encode(env.to_string()), 1), Err(TicketError::BadSignature));
        assert_eq!(a.verify("garbage", 1), Err(TicketError::Malformed));
    }
}
