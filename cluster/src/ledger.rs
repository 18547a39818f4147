//! The cluster's ledger of used participant tokens: the bucket `tessera_tokens` on the
//! NATS server's disk, one key per used token id, so a token logs in once on whichever
//! portal it is presented. Entries expire a day after they are written, by which time
//! every token has expired (`portal.token_lifetime_secs` is at most a day).

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use tessera_core::token::{TokenClaims, TokenError, TokenLedger};
use tracing::debug;

use crate::bucket::{self, Keep};
use crate::{ClusterError, NATS_TIMEOUT};

/// The bucket of used token ids.
pub const TOKENS_BUCKET: &str = "tessera_tokens";
/// How long a used token id is remembered: the longest a token may live.
pub const TOKEN_MEMORY: Duration = Duration::from_secs(86_400);

/// Used tokens, shared by every portal of the cluster.
pub struct ClusterLedger {
    client: async_nats::Client,
    kv: kv::Store,
}

impl ClusterLedger {
    /// Opens (or creates) the bucket.
    pub async fn open(js: &jetstream::Context) -> Result<ClusterLedger, ClusterError> {
        let (kv, _) = bucket::open(js, TOKENS_BUCKET, "Tessera: ids of participant tokens already used to log in", TOKEN_MEMORY, Keep::Disk)
            .await
            .map_err(ClusterError::Registry)?;
        Ok(ClusterLedger { client: js.client(), kv })
    }
}

/// Token ids are ours (random hex, signed into the token), but a key is checked anyway.
fn key(claims: &TokenClaims) -> Result<String, TokenError> {
    if claims.jti.is_empty() || claims.jti.len() > 64 || !claims.jti.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(TokenError::Malformed);
    }
    Ok(format!("t.{}", claims.jti))
}

#[async_trait::async_trait]
impl TokenLedger for ClusterLedger {
    async fn consume(&self, claims: &TokenClaims, _now: u64) -> Result<(), TokenError> {
        let key = key(claims)?;
        bucket::connected(&self.client).map_err(|e| TokenError::Unavailable(format!("the cluster's token ledger: {e}")))?;
        // The value is the token's expiry, for whoever reads the bucket by hand.
        let why = match tokio::time::timeout(NATS_TIMEOUT, self.kv.create(&key, Bytes::from(claims.exp.to_string()))).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists => return Err(TokenError::Replayed),
            Ok(Err(e)) => format!("the cluster's token ledger: {e}"),
            Err(_) => format!("the cluster's token ledger did not answer within {} s", NATS_TIMEOUT.as_secs()),
        };
        // The write may still land (NATS slow, or gone mid-request and queued by the
        // client): give it back, so the login that failed does not spend the token.
        self.release(claims).await;
        Err(TokenError::Unavailable(why))
    }

    async fn release(&self, claims: &TokenClaims) {
        let Ok(key) = key(claims) else { return };
        match tokio::time::timeout(NATS_TIMEOUT, self.kv.delete(&key)).await {
            Ok(Ok(())) => {}
            // The token stays spent: the user asks for a new one.
            Ok(Err(e)) => debug!(error = %e, "a token could not be given back"),
            Err(_) => debug!("a token could not be given back: NATS did not answer"),
        }
    }
}
