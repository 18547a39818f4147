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
    /// Already used for a relogin, or replaced since by a newer ticket's relogin.
    #[error("Reconnection ticket already used")]
    Used,
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
    #[serde(default, skip_serializing_if = "Seat::is_empty")]
    seat: Seat,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TicketEnvelope {
    participant_id: String,
    ticket_id: String,
    not_before: u64,
    not_after: u64,
    #[serde(default, skip_serializing_if = "Seat::is_empty")]
    seat: Seat,
    signature: String,
}

/// Where the participant sat when the ticket was issued, so a cluster's portal can find
/// the room's home, and a new home can seat the participant again once when the home
/// that issued the ticket is gone. Empty on a single node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seat {
    /// Room id.
    #[serde(default)]
    pub room: String,
    /// User name from the participant's token.
    #[serde(default)]
    pub user: String,
    /// Role name.
    #[serde(default)]
    pub role: String,
    /// The home that issued the ticket (a node's id and its run's instance id).
    #[serde(default)]
    pub home: String,
    /// The participant's permission when the ticket was issued (changes made over REST
    /// since its last ticket refresh are not in it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permission: Option<crate::control::Permission>,
}

impl Seat {
    fn is_empty(&self) -> bool {
        *self == Seat::default()
    }
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
    /// Where the participant sat (a cluster's portals fill it in).
    pub seat: Seat,
}

/// Issues and checks reconnection tickets with one key: per process on a single node,
/// shared by every portal of a cluster so a participant can resume on another one.
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

    /// An authority with a given key (a cluster's, or a test's).
    pub fn with_key(key: &[u8]) -> Self {
        TicketAuthority { key: key.to_vec() }
    }

    /// A ticket for `participant_id` valid from `now_ms` for `lifetime_ms`, with its
    /// fields (the caller keeps `ticket_id` to make the ticket single-use).
    pub fn issue(&self, participant_id: &str, now_ms: u64, lifetime_ms: u64) -> Result<(String, Ticket), TicketError> {
        self.issue_seated(participant_id, &Seat::default(), now_ms, lifetime_ms)
    }

    /// [`TicketAuthority::issue`] with the participant's seat signed in.
    pub fn issue_seated(&self, participant_id: &str, seat: &Seat, now_ms: u64, lifetime_ms: u64) -> Result<(String, Ticket), TicketError> {
        let body = TicketBody {
            participant_id: participant_id.into(),
            ticket_id: crate::ids::random_hex(8),
            not_before: now_ms,
            not_after: now_ms.saturating_add(lifetime_ms),
            seat: seat.clone(),
        };
        let jwt = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &body, &EncodingKey::from_secret(&self.key))
            .map_err(|e| TicketError::Signing(e.to_string()))?;
        let env = TicketEnvelope {
            participant_id: body.participant_id,
            ticket_id: body.ticket_id,
            not_before: body.not_before,
            not_after: body.not_after,
            seat: body.seat,
            signature: jwt,
        };
        let json = serde_json::to_vec(&env).map_err(|e| TicketError::Signing(e.to_string()))?;
        let ticket = Ticket {
            participant_id: env.participant_id,
            ticket_id: env.ticket_id,
            not_before: env.not_before,
            not_after: env.not_after,
            seat: env.seat,
        };
        Ok((B64.encode(json), ticket))
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
            & constant_time_eq(&signed.not_after.to_be_bytes(), &env.not_after.to_be_bytes())
            & (signed.seat == env.seat);
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
            seat: signed.seat,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_owt_shape() {
        let a = TicketAuthority::with_key(b"k");
        let t = a.issue("p1", 10_000, 600_000).unwrap().0;
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
        let t = a.issue("p1", 10_000, 1000).unwrap().0;
        assert_eq!(a.verify(&t, 9_999), Err(TicketError::Expired));
        assert_eq!(a.verify(&t, 11_001), Err(TicketError::Expired));
    }

    /// A cluster's ticket carries the seat, signed: changing the room or the role in the
    /// envelope is refused, and a single node's ticket has no seat field at all.
    #[test]
    fn seat_is_signed() {
        let a = TicketAuthority::random();
        let permission = Some(crate::control::Permission { publish: Default::default(), subscribe: Default::default() });
        let seat = Seat { room: "r1".into(), user: "ann".into(), role: "viewer".into(), home: "n1/abc".into(), permission };
        let (t, fields) = a.issue_seated("p1", &seat, 10_000, 60_000).unwrap();
        assert_eq!(a.verify(&t, 10_001).unwrap(), fields);
        assert_eq!(fields.seat, seat);
        let mut env: serde_json::Value = serde_json::from_slice(&B64.decode(&t).unwrap()).unwrap();
        env["seat"]["role"] = "presenter".into();
        let forged = B64.encode(serde_json::to_vec(&env).unwrap());
        assert_eq!(a.verify(&forged, 10_001), Err(TicketError::BadSignature));
        let plain = a.issue("p1", 10_000, 60_000).unwrap().0;
        let env: serde_json::Value = serde_json::from_slice(&B64.decode(&plain).unwrap()).unwrap();
        assert!(env.get("seat").is_none(), "{env}");
    }

    #[test]
    fn forged_and_rebound() {
        let a = TicketAuthority::with_key(b"k");
        let other = TicketAuthority::with_key(b"x");
        let t = other.issue("p1", 0, 1000).unwrap().0;
        assert_eq!(a.verify(&t, 1), Err(TicketError::BadSignature));
        // Someone else's ticket with the outer participant id rewritten.
        let t = a.issue("p1", 0, 1000).unwrap().0;
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

/// Property tests: `verify` never panics, never accepts an altered ticket with other
/// fields, and every issued ticket verifies to exactly what was issued.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn config() -> ProptestConfig {
        ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() }
    }

    fn text(max: usize) -> impl Strategy<Value = String> {
        prop::collection::vec(any::<char>(), 0..max).prop_map(String::from_iter)
    }

    /// Byte edits: (kind, position, byte); kind 0 flips, 1 inserts, 2 deletes.
    fn edits() -> impl Strategy<Value = Vec<(u8, prop::sample::Index, u8)>> {
        prop::collection::vec((0..3u8, any::<prop::sample::Index>(), 1..=255u8), 1..4)
    }

    fn apply(mut bytes: Vec<u8>, edits: &[(u8, prop::sample::Index, u8)]) -> Vec<u8> {
        for (kind, i, b) in edits {
            match kind {
                0 if !bytes.is_empty() => {
                    let i = i.index(bytes.len());
                    bytes[i] ^= b;
                }
                1 => {
                    let i = i.index(bytes.len() + 1);
                    bytes.insert(i, *b);
                }
                2 if !bytes.is_empty() => {
                    let i = i.index(bytes.len());
                    bytes.remove(i);
                }
                _ => {}
            }
        }
        bytes
    }

    fn check_mutant(a: &TicketAuthority, mutant: &str, ticket: &Ticket) -> Result<(), TestCaseError> {
        if let Ok(got) = a.verify(mutant, ticket.not_before) {
            prop_assert_eq!(&got, ticket, "altered ticket {:?} verified with other fields", mutant);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn verify_refuses_arbitrary_strings(s in text(200), now in any::<u64>()) {
            prop_assert!(TicketAuthority::with_key(b"k").verify(&s, now).is_err());
        }

        #[test]
        fn verify_refuses_base64_of_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            prop_assert!(TicketAuthority::with_key(b"k").verify(&B64.encode(&bytes), 0).is_err());
        }

        #[test]
        fn issue_then_verify_round_trips(participant in text(60), now in any::<u64>(), lifetime in any::<u64>()) {
            let a = TicketAuthority::with_key(b"k");
            let (t, fields) = a.issue(&participant, now, lifetime).unwrap();
            prop_assert_eq!(&fields.participant_id, &participant);
            prop_assert_eq!(fields.not_after, now.saturating_add(lifetime));
            prop_assert_eq!(a.verify(&t, now), Ok(fields.clone()));
            prop_assert_eq!(a.verify(&t, fields.not_after), Ok(fields.clone()));
            if now > 0 {
                prop_assert_eq!(a.verify(&t, now - 1), Err(TicketError::Expired));
            }
            if fields.not_after < u64::MAX {
                prop_assert_eq!(a.verify(&t, fields.not_after + 1), Err(TicketError::Expired));
            }
            prop_assert_eq!(TicketAuthority::with_key(b"x").verify(&t, now), Err(TicketError::BadSignature));
        }

        #[test]
        fn altered_tickets_never_verify_with_other_fields(layer in 0..3u8, e in edits()) {
            let a = TicketAuthority::with_key(b"k");
            let (t, fields) = a.issue("participant-1", 10_000, 600_000).unwrap();
            let mutant = match layer {
                // The base64 text.
                0 => String::from_utf8_lossy(&apply(t.into_bytes(), &e)).into_owned(),
                // The JSON under it.
                1 => B64.encode(apply(B64.decode(&t).unwrap(), &e)),
                // The JWT inside the JSON.
                _ => {
                    let mut env: TicketEnvelope = serde_json::from_slice(&B64.decode(&t).unwrap()).unwrap();
                    env.signature = String::from_utf8_lossy(&apply(env.signature.into_bytes(), &e)).into_owned();
                    B64.encode(serde_json::to_vec(&env).unwrap())
                }
            };
            check_mutant(&a, &mutant, &fields)?;
        }
    }
}
