//! The cluster's ledger of used participant tokens: the bucket `tessera_tokens` on the
//! NATS server's disk, one key per used token id, so a token logs in once on whichever
//! portal it is presented. Entries expire a day after they are written, by which time
//! every token has expired (`portal.token_lifetime_secs` is at most a day).

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use tessera_core::token::{Spent, TokenClaims, TokenError, TokenLedger};
use tracing::{debug, warn};

use crate::bucket::{self, Keep};
use crate::{ClusterError, NATS_TIMEOUT};

/// The bucket of used token ids.
pub const TOKENS_BUCKET: &str = "tessera_tokens";
/// How long a used token id is remembered: the longest a token may live.
pub const TOKEN_MEMORY: Duration = Duration::from_secs(86_400);
const DESCRIPTION: &str = "Tessera: ids of participant tokens already used to log in";

/// Used tokens, shared by every portal of the cluster.
pub struct ClusterLedger {
    js: jetstream::Context,
    kv: kv::Store,
}

impl ClusterLedger {
    /// Opens (or creates) the bucket.
    pub async fn open(js: &jetstream::Context) -> Result<ClusterLedger, ClusterError> {
        let (kv, _) = bucket::open(js, TOKENS_BUCKET, DESCRIPTION, TOKEN_MEMORY, Keep::Disk).await.map_err(ClusterError::Registry)?;
        Ok(ClusterLedger { js: js.clone(), kv })
    }

    /// Gives back the use written with `attempt`, whatever its revision (a create whose
    /// answer was lost), and never another login's.
    async fn give_back(&self, key: &str, attempt: &str) {
        match tokio::time::timeout(NATS_TIMEOUT, bucket::delete_if_holds(&self.kv, key, attempt.as_bytes())).await {
            Ok(Ok(())) => {}
            // The token stays spent: the user asks for a new one.
            Ok(Err(e)) => debug!(error = %e, "a token could not be given back"),
            Err(_) => debug!("a token could not be given back: NATS did not answer"),
        }
    }
}

/// Token ids are ours (random hex, signed into the token), but a key is checked anyway.
fn key(claims: &TokenClaims) -> Result<String, TokenError> {
    if claims.jti.is_empty() || claims.jti.len() > 64 || !claims.jti.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(TokenError::Malformed);
    }
    Ok(format!("t.{}", claims.jti))
}

fn unavailable(why: impl std::fmt::Display) -> TokenError {
    TokenError::Unavailable(format!("the cluster's token ledger: {why}"))
}

#[async_trait::async_trait]
impl TokenLedger for ClusterLedger {
    async fn consume(&self, claims: &TokenClaims, _now: u64) -> Result<Spent, TokenError> {
        let key = key(claims)?;
        bucket::connected(&self.js.client()).map_err(unavailable)?;
        // Each attempt writes its own value, so giving back a use can tell it from another
        // login's.
        let attempt = format!("{} {}", claims.exp, tessera_core::ids::random_hex(8));
        let why = match tokio::time::timeout(NATS_TIMEOUT, self.kv.create(&key, Bytes::from(attempt.clone()))).await {
            Ok(Ok(revision)) => return Ok(Spent(revision)),
            Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists => return Err(TokenError::Replayed),
            Ok(Err(e)) => {
                // The bucket may be gone (NATS restarted without its store): make it again
                // for the next login.
                let reopen = bucket::open(&self.js, TOKENS_BUCKET, DESCRIPTION, TOKEN_MEMORY, Keep::Disk);
                match tokio::time::timeout(NATS_TIMEOUT, reopen).await {
                    Ok(Err(e)) => warn!(error = %e, "the cluster's token ledger cannot be opened"),
                    Err(_) => warn!("the cluster's token ledger cannot be opened: NATS did not answer"),
                    Ok(Ok(_)) => {}
                }
                e.to_string()
            }
            Err(_) => format!("no answer within {} s", NATS_TIMEOUT.as_secs()),
        };
        // The write may still land (NATS slow, or gone mid-request and queued by the
        // client): give it back, so the login that failed does not spend the token.
        self.give_back(&key, &attempt).await;
        Err(unavailable(why))
    }

    async fn release(&self, claims: &TokenClaims, spent: Spent) {
        let Ok(key) = key(claims) else { return };
        match tokio::time::timeout(NATS_TIMEOUT, self.kv.delete_expect_revision(&key, Some(spent.0))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(error = %e, "a token could not be given back"),
            Err(_) => debug!("a token could not be given back: NATS did not answer"),
        }
    }
}
