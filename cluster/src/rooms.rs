//! Room configurations shared by every node: the bucket `tessera_rooms` on the NATS
//! server's disk.
//!
//! Keys: `rooms.<id>` holds `{createdMs, room}` (the room as the REST API shows it), and
//! `names.<sha-256 of the name, hex>` holds the id of the room with that name, so two
//! nodes creating rooms with one name at once cannot both succeed (a create is atomic
//! per key). Each node keeps a copy of every room in memory, read once at start and then
//! kept current by a watch on `rooms.>`, so reads — a participant joining, the REST API
//! listing — never wait on NATS and keep working while it is away; writes go to NATS
//! (compare-and-set on the entry's revision) and fail with a clear error while it is away.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tessera_core::store::{Rooms, StoreError};
use tessera_core::{Room, node::now_ms};
use tracing::{debug, info, warn};

use crate::bucket::{self, Keep};
use crate::{ClusterError, NATS_TIMEOUT};

/// The bucket of room configurations.
pub const ROOMS_BUCKET: &str = "tessera_rooms";
const ROOMS_DESCRIPTION: &str = "Tessera rooms: configurations shared by every node";
const ROOM_PREFIX: &str = "rooms.";
const NAME_PREFIX: &str = "names.";
/// How long the copy waits before reading the bucket again after its watch ended.
const RESYNC_PAUSE: Duration = Duration::from_secs(1);
/// How often the copy checks that the bucket is the one it follows (NATS may have
/// restarted without its store, and the bucket been made anew).
const BUCKET_CHECK: Duration = Duration::from_secs(5);
/// A name entry whose room is missing is taken over only after this long: a create in
/// progress (name claimed, room not written yet) looks the same.
const STALE_NAME: Duration = Duration::from_secs(60);

/// A room's entry.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Stored {
    /// When it was created (rooms are listed in creation order).
    created_ms: u64,
    room: Room,
}

struct Cached {
    room: Room,
    created_ms: u64,
    revision: u64,
}

/// This node's copy of the rooms.
#[derive(Default)]
struct Copy {
    rooms: HashMap<String, Cached>,
    /// The last revision applied per room id, deletes included, so a change that arrives
    /// late (the watch replaying what a read already showed) never undoes a newer one.
    seen: HashMap<String, u64>,
}

impl Copy {
    fn apply(&mut self, id: &str, revision: u64, stored: Option<Stored>) {
        if self.seen.get(id).is_some_and(|&r| r >= revision) {
            return;
        }
        self.seen.insert(id.to_string(), revision);
        match stored {
            Some(s) => {
                self.rooms.insert(id.to_string(), Cached { room: s.room, created_ms: s.created_ms, revision });
            }
            None => {
                self.rooms.remove(id);
            }
        }
    }

    /// Applies an entry of the bucket (a room key's put or delete).
    fn apply_entry(&mut self, entry: &kv::Entry) {
        let Some(id) = entry.key.strip_prefix(ROOM_PREFIX) else { return };
        match entry.operation {
            kv::Operation::Put => match decode(&entry.value) {
                Ok(stored) => self.apply(id, entry.revision, Some(stored)),
                Err(e) => warn!(room = %id.escape_debug(), error = %e, "unreadable room entry ignored"),
            },
            kv::Operation::Delete | kv::Operation::Purge => self.apply(id, entry.revision, None),
        }
    }
}

fn decode(value: &[u8]) -> Result<Stored, String> {
    let stored: Stored = serde_json::from_slice(value).map_err(|e| e.to_string())?;
    stored.room.validate().map_err(|e| e.to_string())?;
    Ok(stored)
}

fn room_key(id: &str) -> String {
    format!("{ROOM_PREFIX}{id}")
}

/// Names can hold any character, keys cannot: a name's key is its hash.
fn name_key(name: &str) -> String {
    format!("{NAME_PREFIX}{}", hex::encode(sha2::Sha256::digest(name.as_bytes())))
}

/// How a compare-and-set write failed.
enum Write {
    /// The entry is not at the expected revision (or exists, for a create).
    Moved,
    /// NATS refused or failed.
    Failed(String),
}
use Write::{Failed, Moved};
const MOVED: &str = "the entry changed";

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// The rooms of the cluster (see the module docs).
pub struct ClusterRooms {
    client: async_nats::Client,
    kv: kv::Store,
    copy: Arc<RwLock<Copy>>,
    follower: tokio::task::JoinHandle<()>,
}

impl Drop for ClusterRooms {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

impl ClusterRooms {
    /// Opens the bucket (creating it if this is the cluster's first node, and then
    /// putting `seed` in it: the rooms this node had before it joined), reads every room
    /// and follows changes.
    pub async fn open(js: &jetstream::Context, seed: Vec<Room>) -> Result<Arc<ClusterRooms>, ClusterError> {
        let (kv, created) = bucket::open(js, ROOMS_BUCKET, ROOMS_DESCRIPTION, Duration::ZERO, Keep::Disk).await.map_err(ClusterError::Registry)?;
        let (copy, last, born) = read_all(&kv).await.map_err(|e| ClusterError::Registry(format!("reading the rooms: {e}")))?;
        let copy = Arc::new(RwLock::new(copy));
        let follower = tokio::spawn(follow(js.clone(), kv.clone(), copy.clone(), last, born));
        let rooms = Arc::new(ClusterRooms { client: js.client(), kv, copy, follower });
        if created && !seed.is_empty() {
            let n = seed.len();
            for room in seed {
                let id = room.id.clone();
                if let Err(e) = rooms.create(room).await {
                    warn!(room = %id, error = %e, "room of this node's store not added to the cluster");
                }
            }
            info!(rooms = n, "the cluster's rooms start from this node's store");
        }
        Ok(rooms)
    }

    /// A request to NATS, refused at once while the connection is down (a write would be
    /// queued and land when NATS returns, long after the caller was told it failed) and
    /// bounded in time, so a REST call answers 503 while NATS is away.
    async fn call<T, E: std::fmt::Display>(&self, f: impl std::future::Future<Output = Result<T, E>>) -> Result<T, StoreError> {
        bucket::connected(&self.client).map_err(StoreError::Unavailable)?;
        match tokio::time::timeout(NATS_TIMEOUT, f).await {
            Ok(r) => r.map_err(unavailable),
            Err(_) => Err(StoreError::Unavailable(format!("no answer from NATS within {} s", NATS_TIMEOUT.as_secs()))),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Copy> {
        self.copy.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Copy> {
        self.copy.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `name` for room `id`; true when this call took it (and must give it back
    /// if the room's write fails), false when `id` held it already. A name entry left
    /// behind by a write that failed half-way (its room gone or renamed) is taken over —
    /// only once it is older than [`STALE_NAME`], since a create still in progress looks
    /// the same.
    async fn claim_name(&self, name: &str, id: &str) -> Result<bool, StoreError> {
        let key = name_key(name);
        match self.call(async { Ok::<_, String>(self.kv.create(&key, Bytes::from(id.to_string())).await) }).await? {
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(unavailable(e)),
        }
        let Some(entry) = self.call(self.kv.entry(&key)).await?.filter(|e| e.operation == kv::Operation::Put) else {
            return Err(StoreError::Conflict(format!("a room named `{name}` is being created; retry")));
        };
        let holder = String::from_utf8_lossy(&entry.value).to_string();
        if holder == id {
            return Ok(false);
        }
        let holder_room = self.call(self.kv.entry(room_key(&holder))).await?.filter(|e| e.operation == kv::Operation::Put);
        if holder_room.and_then(|e| decode(&e.value).ok()).is_some_and(|s| s.room.name == name) {
            return Err(StoreError::Conflict(format!("a room named `{name}` exists")));
        }
        let age_secs = i64::try_from(now_ms() / 1000).unwrap_or(i64::MAX).saturating_sub(entry.created.unix_timestamp());
        if age_secs < STALE_NAME.as_secs() as i64 {
            return Err(StoreError::Conflict(format!("a room named `{name}` is being created; retry")));
        }
        debug!(name = ?name, stale = %holder.escape_debug(), "taking over a stale room name entry");
        match self.call(async { Ok::<_, String>(self.kv.update(&key, Bytes::from(id.to_string()), entry.revision).await) }).await? {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                Err(StoreError::Conflict(format!("a room named `{name}` is being created; retry")))
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Gives a name back, if `id` still holds it.
    async fn release_name(&self, name: &str, id: &str) {
        let key = name_key(name);
        if let Err(e) = self.call(bucket::delete_if_holds(&self.kv, &key, id.as_bytes())).await {
            // Harmless: a later create of this name takes the stale entry over.
            debug!(name = ?name, error = %e, "room name entry left behind");
        }
    }

    /// Puts a room this node wrote into its copy at once (the watch brings it too), so
    /// a read right after the write sees it; returns the room.
    fn written(&self, stored: Stored, revision: u64) -> Room {
        let room = stored.room.clone();
        self.write().apply(&room.id, revision, Some(stored));
        room
    }

    /// Writes a room's entry: a create (`revision` none) or a compare-and-set update.
    async fn put_room(&self, stored: &Stored, revision: Option<u64>) -> Result<u64, StoreError> {
        let value = serde_json::to_vec(stored).map(Bytes::from).map_err(unavailable)?;
        let key = room_key(&stored.room.id);
        let written = match revision {
            Some(r) => self.call(async { Ok::<_, String>(self.kv.update(&key, value, r).await) }).await?.map_err(|e| match e.kind() {
                kv::UpdateErrorKind::WrongLastRevision => Moved,
                _ => Failed(e.to_string()),
            }),
            None => self.call(async { Ok::<_, String>(self.kv.create(&key, value).await) }).await?.map_err(|e| match e.kind() {
                kv::CreateErrorKind::AlreadyExists => Moved,
                _ => Failed(e.to_string()),
            }),
        };
        written.map_err(|w| match w {
            Moved => StoreError::Conflict(MOVED.into()),
            Failed(e) => StoreError::Unavailable(e),
        })
    }
}

/// Reads every room, and the bucket's last revision before reading (the watch resumes
/// after it, so nothing written meanwhile is missed; what the read already saw is
/// skipped by revision).
async fn read_all(kv: &kv::Store) -> Result<(Copy, u64, Born), String> {
    let read = async {
        let mut stream = kv.stream.clone();
        let info = stream.info().await.map_err(|e| e.to_string())?;
        let (last, born) = (info.state.last_sequence, info.created.unix_timestamp());
        let mut keys = kv.keys().await.map_err(|e| e.to_string())?;
        let mut ids = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(|e| e.to_string())?;
            if k.starts_with(ROOM_PREFIX) {
                ids.push(k);
            }
        }
        let mut copy = Copy::default();
        for key in ids {
            if let Some(entry) = kv.entry(&key).await.map_err(|e| e.to_string())? {
                copy.apply_entry(&entry);
            }
        }
        Ok::<_, String>((copy, last, born))
    };
    tokio::time::timeout(NATS_TIMEOUT * 10, read).await.map_err(|_| "NATS did not answer".to_string())?
}

/// Keeps the copy current: follows the bucket's changes from `last`. When the watch ends
/// or errs, or the bucket turns out to be another one than was read (NATS restarted
/// without its store: the watch would go on silently from a position the new bucket does
/// not have), it opens the bucket again (making it if it is gone), reads everything and
/// follows on.
async fn follow(js: jetstream::Context, mut kv: kv::Store, copy: Arc<RwLock<Copy>>, mut last: u64, mut born: Born) {
    loop {
        match kv.watch_from_revision(format!("{ROOM_PREFIX}>"), last.saturating_add(1)).await {
            Ok(mut changes) => {
                let mut check = tokio::time::interval(BUCKET_CHECK);
                check.tick().await;
                loop {
                    tokio::select! {
                        change = changes.next() => match change {
                            Some(Ok(entry)) => {
                                last = last.max(entry.revision);
                                copy.write().unwrap_or_else(|p| p.into_inner()).apply_entry(&entry);
                            }
                            Some(Err(e)) => {
                                warn!(error = %e, "watching the cluster's rooms failed; reading them again");
                                break;
                            }
                            None => break,
                        },
                        _ = check.tick() => {
                            if !same_bucket(&js, &kv, born).await {
                                warn!("the cluster's rooms bucket was made anew (NATS lost its store?); reading it again");
                                break;
                            }
                        }
                    }
                }
            }
            Err(e) => debug!(error = %e, "cannot watch the cluster's rooms yet"),
        }
        loop {
            tokio::time::sleep(RESYNC_PAUSE).await;
            match bucket::open(&js, ROOMS_BUCKET, ROOMS_DESCRIPTION, Duration::ZERO, Keep::Disk).await {
                Ok((store, _)) => kv = store,
                Err(e) => {
                    debug!(error = %e, "the cluster's rooms bucket cannot be opened yet");
                    continue;
                }
            }
            match read_all(&kv).await {
                Ok((fresh, at, b)) => {
                    *copy.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                    (last, born) = (at, b);
                    info!(revision = at, "the cluster's rooms read again");
                    break;
                }
                Err(e) => debug!(error = %e, "the cluster's rooms cannot be read yet"),
            }
        }
    }
}

/// When the bucket's stream was made (seconds since the epoch): tells a bucket from one
/// made anew under the same name.
type Born = i64;

/// False when the bucket's stream is not the one read (or is gone) while NATS answers;
/// true when it is, or when NATS cannot be asked (nothing to compare then).
async fn same_bucket(js: &jetstream::Context, kv: &kv::Store, born: Born) -> bool {
    if bucket::connected(&js.client()).is_err() {
        return true;
    }
    let mut stream = kv.stream.clone();
    match tokio::time::timeout(NATS_TIMEOUT, stream.info()).await {
        Ok(Ok(info)) => info.created.unix_timestamp() == born,
        Ok(Err(e)) => {
            debug!(error = %e, "the cluster's rooms bucket cannot be looked at");
            false
        }
        Err(_) => true,
    }
}

#[async_trait::async_trait]
impl Rooms for ClusterRooms {
    fn get(&self, id: &str) -> Option<Room> {
        self.read().rooms.get(id).map(|c| c.room.clone())
    }

    fn list_page(&self, offset: usize, limit: usize) -> Result<Vec<Room>, StoreError> {
        let copy = self.read();
        let mut all: Vec<&Cached> = copy.rooms.values().collect();
        all.sort_by(|a, b| (a.created_ms, &a.room.id).cmp(&(b.created_ms, &b.room.id)));
        Ok(all.into_iter().skip(offset).take(limit).map(|c| c.room.clone()).collect())
    }

    fn count(&self) -> Result<usize, StoreError> {
        Ok(self.read().rooms.len())
    }

    async fn create(&self, room: Room) -> Result<Room, StoreError> {
        if self.read().rooms.contains_key(&room.id) {
            return Err(StoreError::Conflict(format!("a room with id `{}` exists", room.id)));
        }
        let claimed = self.claim_name(&room.name, &room.id).await?;
        let stored = Stored { created_ms: now_ms(), room };
        match self.put_room(&stored, None).await {
            Ok(revision) => Ok(self.written(stored, revision)),
            Err(e) => {
                if claimed {
                    self.release_name(&stored.room.name, &stored.room.id).await;
                }
                Err(match e {
                    StoreError::Conflict(_) => StoreError::Conflict(format!("a room with id `{}` exists", stored.room.id)),
                    other => other,
                })
            }
        }
    }

    async fn update(&self, room: Room) -> Result<Room, StoreError> {
        let (base, created_ms, mut revision) = match self.read().rooms.get(&room.id) {
            Some(c) => (c.room.clone(), c.created_ms, c.revision),
            None => return Err(StoreError::NotFound(room.id)),
        };
        let old_name = base.name.clone();
        let renamed = old_name != room.name;
        let claimed = renamed && self.claim_name(&room.name, &room.id).await?;
        let stored = Stored { created_ms, room };
        let changed_meanwhile = || StoreError::Conflict(format!("room `{}` was changed by another request meanwhile; retry", stored.room.id));
        let mut retried = false;
        let result = loop {
            match self.put_room(&stored, Some(revision)).await {
                Err(StoreError::Conflict(_)) if !retried => {
                    // Our copy may lag the bucket by a watch delivery: if the entry still
                    // holds what the change was based on, apply it to the newer revision.
                    retried = true;
                    let now = match self.call(self.kv.entry(room_key(&stored.room.id))).await {
                        Ok(now) => now.filter(|e| e.operation == kv::Operation::Put),
                        Err(e) => break Err(e),
                    };
                    match now.map(|e| (e.revision, decode(&e.value))) {
                        None => break Err(StoreError::NotFound(stored.room.id.clone())),
                        Some((r, Ok(s))) if s.room == base => revision = r,
                        Some(_) => break Err(changed_meanwhile()),
                    }
                }
                Err(StoreError::Conflict(_)) => break Err(changed_meanwhile()),
                other => break other,
            }
        };
        match result {
            Ok(revision) => {
                if renamed {
                    self.release_name(&old_name, &stored.room.id).await;
                }
                Ok(self.written(stored, revision))
            }
            Err(e) => {
                if claimed {
                    self.release_name(&stored.room.name, &stored.room.id).await;
                }
                Err(e)
            }
        }
    }

    async fn delete(&self, id: &str) -> Result<Room, StoreError> {
        let key = room_key(id);
        let Some(entry) = self.call(self.kv.entry(&key)).await?.filter(|e| e.operation == kv::Operation::Put) else {
            // Gone from the bucket: make sure our copy agrees.
            let stale = self.read().rooms.get(id).map(|c| c.revision);
            if let Some(revision) = stale {
                self.write().apply(id, revision.saturating_add(1), None);
            }
            return Err(StoreError::NotFound(id.into()));
        };
        // Not validated: a room that no longer validates must still be deletable.
        let room = serde_json::from_slice::<serde_json::Value>(&entry.value)
            .ok()
            .and_then(|v| v.get("room").cloned())
            .and_then(|r| serde_json::from_value::<Room>(r).ok())
            .ok_or_else(|| StoreError::Unavailable(format!("room `{id}` is unreadable in the cluster's bucket")))?;
        // Unconditional: a DELETE racing an update still deletes.
        self.call(self.kv.delete(&key)).await?;
        self.release_name(&room.name, id).await;
        // The delete marker's revision is not returned; any revision above the put's is
        // enough for the copy, and the watch brings the real one.
        self.write().apply(id, entry.revision.saturating_add(1), None);
        Ok(room)
    }
}
