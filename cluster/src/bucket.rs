//! Opening the cluster's key-value buckets on NATS 2.9.

use std::time::Duration;

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::{self, kv};

/// Where a bucket keeps its entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keep {
    /// In the NATS server's memory: gone when it restarts (live state, re-written anyway).
    Memory,
    /// On the NATS server's disk (`-sd`): kept across its restarts (rooms, keys, used tokens).
    Disk,
}

/// Opens (or creates) a key-value bucket (history 1, entries expiring `max_age` after
/// their last write; zero: never). Also says whether this call created it.
///
/// async-nats 0.51 creates buckets only after reading the account's JetStream info, whose
/// reply from NATS 2.9 lacks fields the client requires (`reserved_memory`,
/// `reserved_storage`), so the bucket's stream is made here the way its KV layer makes it
/// (`KV_<bucket>` on `$KV.<bucket>.>`, one message per key, roll-ups, direct gets), then
/// opened as a bucket.
pub(crate) async fn open(
    js: &jetstream::Context,
    bucket: &str,
    description: &str,
    max_age: Duration,
    keep: Keep,
) -> Result<(kv::Store, bool), String> {
    let name = format!("KV_{bucket}");
    let created = match js.get_stream(&name).await {
        Ok(_) => false,
        Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND) => {
            let config = jetstream::stream::Config {
                name: name.clone(),
                description: Some(description.into()),
                subjects: vec![format!("$KV.{bucket}.>")],
                max_messages_per_subject: 1,
                max_age,
                storage: match keep {
                    Keep::Memory => jetstream::stream::StorageType::Memory,
                    Keep::Disk => jetstream::stream::StorageType::File,
                },
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                num_replicas: 1,
                discard: jetstream::stream::DiscardPolicy::New,
                ..Default::default()
            };
            // Another node may create it between the look-up and here: then it is not ours.
            match js.create_stream(config).await {
                Ok(_) => true,
                Err(_) => js.get_stream(&name).await.map(|_| false).map_err(|e| e.to_string())?,
            }
        }
        Err(e) => return Err(e.to_string()),
    };
    let store = js.get_key_value(bucket).await.map_err(|e| e.to_string())?;
    Ok((store, created))
}

/// Deletes `key` if it still holds `value`, at the revision read, so an entry someone
/// else wrote meanwhile is left alone.
pub(crate) async fn delete_if_holds(kv: &kv::Store, key: &str, value: &[u8]) -> Result<(), String> {
    if let Some(e) = kv.entry(key).await.map_err(|e| e.to_string())?
        && e.operation == kv::Operation::Put
        && e.value.as_ref() == value
    {
        kv.delete_expect_revision(key, Some(e.revision)).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Fails while the client is not connected to NATS. Checked before a write whose failure
/// the caller reports: async-nats queues what is published while disconnected and sends
/// it on reconnection, so a write that "failed" would otherwise land later.
pub(crate) fn connected(client: &async_nats::Client) -> Result<(), String> {
    match client.connection_state() {
        async_nats::connection::State::Connected => Ok(()),
        _ => Err("not connected to NATS".into()),
    }
}
