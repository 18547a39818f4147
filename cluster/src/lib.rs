//! Tessera's cluster: nodes coordinated over NATS.
//!
//! A node joins by registering itself in the JetStream key-value bucket `tessera_nodes`
//! (key: its id; value: its [`NodeRecord`] as JSON) and re-writes that entry every
//! [`HEARTBEAT`] with its current load. The bucket's `max_age` is [`NODE_TTL`], so the
//! entry of a node that stops reporting (killed, cut off) disappears after at most that
//! long; a node that stops cleanly deletes it at once. Writes are compare-and-set on the
//! entry's revision, so two processes started with the same node id cannot both believe
//! they own it: the second is refused while the first keeps reporting.
//!
//! NATS 2.9 (Debian 12) has no per-key TTL and no expiry events: expiry is bucket-wide and
//! silent, which is why liveness is "the entry is there", read from the server.
//! What lives in NATS and what only in a node's memory is listed in docs/cluster.md.

// Input from the network must never panic this crate: no unwrap/expect/panic and no
// unchecked indexing outside tests (`./scripts/test` runs clippy with -D warnings).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

mod bucket;
pub mod homes;
pub mod ledger;
mod placed;
pub mod relay;
pub mod rooms;
pub mod router;
pub mod rpc;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures_util::StreamExt;
use tessera_core::node::{NodeDirectory, NodeDirectoryError, NodeLoad, NodeRecord, Role, now_ms};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// The bucket of live nodes.
pub const NODES_BUCKET: &str = "tessera_nodes";
/// A node's entry disappears this long after its last report.
pub const NODE_TTL: Duration = Duration::from_secs(10);
/// How often a node reports.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// The bucket of cluster-wide secrets (the service key, the reconnection-ticket key).
pub const SECRETS_BUCKET: &str = "tessera_cluster";
/// How long connecting (and each request to NATS) may take.
pub(crate) const NATS_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest wait between two attempts to reconnect to NATS. The client's own backoff
/// grows to 4 s, but other nodes give a media node up after 2 s of not hearing it
/// (`router.rs`): a node whose link comes back must be on NATS again well within that.
const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(250);

/// The wait before reconnection attempt `attempts` (1: the first): none, then doubling
/// from 2 ms up to [`RECONNECT_MAX_DELAY`].
fn reconnect_delay(attempts: usize) -> Duration {
    let exp = u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX).min(16);
    if attempts <= 1 { Duration::ZERO } else { Duration::from_millis(2u64.pow(exp)).min(RECONNECT_MAX_DELAY) }
}

/// How a node joins the cluster.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// NATS server URL.
    pub nats_url: String,
    /// This node's id.
    pub node_id: String,
    /// What this node does.
    pub roles: Vec<Role>,
    /// Where other nodes send it relayed media.
    pub relay_addr: String,
    /// Its region label.
    pub region: String,
}

/// Why joining or talking to the cluster failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The NATS server could not be reached.
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect {
        /// The URL tried.
        url: String,
        /// Why.
        reason: String,
    },
    /// NATS is there but JetStream (the key-value buckets) is not usable.
    #[error("NATS at {url} has no usable JetStream (start nats-server with -js): {reason}")]
    JetStream {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// Another running node registered this id.
    #[error("node id `{id}` is in use by another running node (instance {instance}, last report {age_ms} ms ago)")]
    NodeIdInUse {
        /// The id.
        id: String,
        /// The other node's instance.
        instance: String,
        /// How long ago it reported.
        age_ms: u64,
    },
    /// A registry read or write failed.
    #[error("node registry: {0}")]
    Registry(String),
    /// The media relay could not start.
    #[error("{0}")]
    Relay(String),
}

/// This process as a member of the cluster.
pub struct ClusterNode {
    client: async_nats::Client,
    js: jetstream::Context,
    /// The registry bucket (opened again if NATS lost it: memory storage does not survive a restart).
    nodes: Mutex<kv::Store>,
    record: Mutex<NodeRecord>,
    /// The revision of our entry, for compare-and-set writes.
    revision: Mutex<u64>,
    stop: watch::Sender<bool>,
    /// The heartbeat task, stopped before the entry is deleted (so it cannot write it again).
    heartbeat: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The live nodes as last read (every heartbeat), for placement without waiting on NATS.
    known: Mutex<Vec<NodeRecord>>,
    /// This node's NATS connection, as its client reported it.
    link: Arc<Mutex<Link>>,
}

/// Whether the NATS connection is up, and when it last came back.
#[derive(Debug, Clone, Copy)]
enum Link {
    /// Up; since its last reconnection (none: since the start).
    Up(Option<std::time::Instant>),
    Down,
}

impl ClusterNode {
    /// Connects to NATS, opens the registry and registers this node. Fails with the URL and
    /// the reason when NATS cannot be reached, and when another live node has this id.
    pub async fn join(settings: ClusterSettings) -> Result<Arc<ClusterNode>, ClusterError> {
        let url = settings.nats_url.clone();
        let link = Arc::new(Mutex::new(Link::Up(None)));
        let on_event = link.clone();
        let client = async_nats::ConnectOptions::new()
            .event_callback(move |event| {
                let link = on_event.clone();
                async move {
                    let mut link = link.lock().unwrap_or_else(|p| p.into_inner());
                    match (event, *link) {
                        (async_nats::Event::Connected, Link::Down) => *link = Link::Up(Some(std::time::Instant::now())),
                        (async_nats::Event::Disconnected | async_nats::Event::Closed, _) => *link = Link::Down,
                        _ => {}
                    }
                }
            })
            .name(format!("tessera-{}", settings.node_id))
            .reconnect_delay_callback(reconnect_delay)
            .connection_timeout(NATS_TIMEOUT)
            .request_timeout(Some(NATS_TIMEOUT))
            .connect(url.as_str())
            .await
            .map_err(|e| ClusterError::Connect { url: url.clone(), reason: e.to_string() })?;
        let js = jetstream::ContextBuilder::new().timeout(NATS_TIMEOUT).build(client.clone());
        let nodes = open_nodes(&js).await.map_err(|reason| ClusterError::JetStream { url: url.clone(), reason })?;
        let record = NodeRecord::starting(settings.node_id.clone(), settings.roles, settings.relay_addr, settings.region);
        let revision = register(&nodes, &record).await?;
        info!(node = %record.id, instance = %record.instance, nats = %url, "joined the cluster");
        let (stop, _) = watch::channel(false);
        let node = Arc::new(ClusterNode {
            client,
            js,
            nodes: Mutex::new(nodes),
            record: Mutex::new(record),
            revision: Mutex::new(revision),
            stop,
            heartbeat: Mutex::new(None),
            known: Mutex::new(Vec::new()),
            link,
        });
        node.refresh_known().await;
        Ok(node)
    }

    /// Reports this node every [`HEARTBEAT`] with the load `load` measures, until
    /// [`ClusterNode::leave`]. A report that fails (NATS away) is retried at the next beat;
    /// the entry expires meanwhile if NATS stays away longer than [`NODE_TTL`], and the
    /// node registers again when it is back.
    pub fn spawn_heartbeat(self: &Arc<Self>, load: impl Fn() -> NodeLoad + Send + Sync + 'static) {
        let me = self.clone();
        let mut stop = self.stop.subscribe();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT);
            // After a stalled report (NATS away), one report, not a burst of the missed ones.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                if *stop.borrow() {
                    return;
                }
                if let Err(e) = me.report(load()).await {
                    warn!(node = %me.id(), error = %e, "cluster heartbeat failed");
                }
                me.refresh_known().await;
            }
        });
        *self.heartbeat.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    }

    /// Writes this node's entry with `load` (compare-and-set on our revision).
    async fn report(&self, load: NodeLoad) -> Result<(), ClusterError> {
        let record = {
            let mut r = self.record.lock().unwrap_or_else(|p| p.into_inner());
            r.load = load;
            r.reported_ms = now_ms();
            r.clone()
        };
        let value = encode(&record)?;
        let revision = *self.revision.lock().unwrap_or_else(|p| p.into_inner());
        let next = match self.store().update(&record.id, value.clone(), revision).await {
            Ok(rev) => rev,
            Err(e) => {
                debug!(node = %record.id, error = %e, "heartbeat update refused; re-reading the entry");
                self.recover(&record, value).await?
            }
        };
        *self.revision.lock().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    /// After a refused report: the entry expired (NATS was away longer than the TTL), a
    /// timed-out write landed after all, or NATS restarted and lost the bucket. Finds out
    /// which and returns the entry's new revision.
    async fn recover(&self, record: &NodeRecord, value: Bytes) -> Result<u64, ClusterError> {
        let store = self.store();
        // A delete marker (someone's clean leave) counts as no entry.
        match store.entry(&record.id).await.map(|e| e.filter(|e| e.operation == kv::Operation::Put)) {
            Ok(Some(entry)) if decode(&entry.value).is_some_and(|r| r.instance == record.instance) => {
                store.update(&record.id, value, entry.revision).await.map_err(|e| ClusterError::Registry(e.to_string()))
            }
            Ok(Some(entry)) => {
                let other = decode(&entry.value).map(|r| r.instance).unwrap_or_default();
                Err(ClusterError::Registry(format!("node id `{}` was taken by instance {other}", record.id)))
            }
            Ok(None) => {
                info!(node = %record.id, "registering again (the entry had expired)");
                register(&store, record).await
            }
            Err(e) => {
                debug!(node = %record.id, error = %e, "registry unreadable; opening the bucket again");
                let store = open_nodes(&self.js).await.map_err(ClusterError::Registry)?;
                *self.nodes.lock().unwrap_or_else(|p| p.into_inner()) = store.clone();
                info!(node = %record.id, "registering again (the registry was recreated)");
                register(&store, record).await
            }
        }
    }

    fn store(&self) -> kv::Store {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the live nodes again (bounded; on failure the last list stays).
    pub async fn refresh_known(&self) {
        match tokio::time::timeout(NATS_TIMEOUT, self.list()).await {
            Ok(Ok(nodes)) => *self.known.lock().unwrap_or_else(|p| p.into_inner()) = nodes,
            Ok(Err(e)) => debug!(error = %e.0, "the node list could not be read"),
            Err(_) => debug!("the node list could not be read: NATS did not answer"),
        }
    }

    /// The live nodes as last read, at most one heartbeat old.
    pub fn known_nodes(&self) -> Vec<NodeRecord> {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Counts a placement on `node` in the known list until its next report, so rooms
    /// placed between two reports spread instead of all going to the node that looked
    /// least used.
    pub fn count_placement(&self, node: &str) {
        if let Some(n) = self.known.lock().unwrap_or_else(|p| p.into_inner()).iter_mut().find(|n| n.id == node) {
            n.load.transports += 1;
        }
    }

    /// Whether this node's NATS connection is down or came back less than `within` ago
    /// (what others' subjects look like then is not to be trusted: they may be reconnecting).
    pub fn reconnected_within(&self, within: Duration) -> bool {
        let link = *self.link.lock().unwrap_or_else(|p| p.into_inner());
        match link {
            _ if self.client.connection_state() != async_nats::connection::State::Connected => true,
            Link::Down => true,
            Link::Up(since) => since.is_some_and(|at| at.elapsed() < within),
        }
    }

    /// When this node's NATS connection last came back (`None`: never lost since the start,
    /// or down now).
    pub fn came_back(&self) -> Option<std::time::Instant> {
        match *self.link.lock().unwrap_or_else(|p| p.into_inner()) {
            Link::Up(at) => at,
            Link::Down => None,
        }
    }

    /// The NATS connection.
    pub fn client(&self) -> async_nats::Client {
        self.client.clone()
    }

    /// Marks this node draining in its next report.
    pub fn set_draining(&self, draining: bool) {
        self.record.lock().unwrap_or_else(|p| p.into_inner()).draining = draining;
    }

    /// This node's id.
    pub fn id(&self) -> String {
        self.record.lock().unwrap_or_else(|p| p.into_inner()).id.clone()
    }

    /// The cluster's rooms, shared by every node. `seed` (this node's own rooms) fills
    /// the bucket when this node is the first to open it.
    pub async fn rooms(&self, seed: Vec<tessera_core::Room>) -> Result<Arc<rooms::ClusterRooms>, ClusterError> {
        rooms::ClusterRooms::open(&self.js, seed).await
    }

    /// The cluster's ledger of used participant tokens.
    pub async fn token_ledger(&self) -> Result<ledger::ClusterLedger, ClusterError> {
        ledger::ClusterLedger::open(&self.js).await
    }

    /// The cluster's value of the secret `name`, if a node set it.
    pub async fn secret(&self, name: &str) -> Result<Option<String>, ClusterError> {
        let kv = self.secrets().await?;
        let value = tokio::time::timeout(NATS_TIMEOUT, kv.get(name)).await.map_err(|_| timed_out())?;
        let value = value.map_err(|e| ClusterError::Registry(format!("reading the cluster's {name}: {e}")))?;
        Ok(value.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// The cluster's value of the secret `name`: `proposed` if no node set it before
    /// (the first node to join decides), else the value already set.
    pub async fn agree_secret(&self, name: &str, proposed: &str) -> Result<String, ClusterError> {
        let kv = self.secrets().await?;
        let created = tokio::time::timeout(NATS_TIMEOUT, kv.create(name, Bytes::from(proposed.to_string()))).await.map_err(|_| timed_out())?;
        match created {
            Ok(_) => Ok(proposed.to_string()),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                self.secret(name).await?.ok_or_else(|| ClusterError::Registry(format!("the cluster's {name} vanished while being read")))
            }
            Err(e) => Err(ClusterError::Registry(format!("setting the cluster's {name}: {e}"))),
        }
    }

    async fn secrets(&self) -> Result<kv::Store, ClusterError> {
        let description = "Tessera: secrets every node shares (service key, reconnection-ticket key)";
        let (kv, _) =
            bucket::open(&self.js, SECRETS_BUCKET, description, Duration::ZERO, bucket::Keep::Disk).await.map_err(ClusterError::Registry)?;
        Ok(kv)
    }

    /// Stops reporting and removes this node's entry, so the others see it gone at once.
    /// Bounded: with NATS away it gives up after a few seconds (the entry then expires), so
    /// a shutdown never waits for NATS.
    pub async fn leave(&self) {
        let _ = self.stop.send(true);
        let task = self.heartbeat.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        let id = self.id();
        let revision = *self.revision.lock().unwrap_or_else(|p| p.into_inner());
        // Only our own revision: if another process took the id meanwhile, its entry stays.
        let delete = async {
            self.store().delete_expect_revision(&id, Some(revision)).await?;
            let _ = self.client.flush().await;
            Ok::<(), kv::DeleteError>(())
        };
        match tokio::time::timeout(NATS_TIMEOUT, delete).await {
            Ok(Ok(())) => info!(node = %id, "left the cluster"),
            Ok(Err(e)) => warn!(node = %id, error = %e, "could not remove this node's entry; it expires in {} s", NODE_TTL.as_secs()),
            Err(_) => warn!(node = %id, "NATS did not answer; this node's entry expires in {} s", NODE_TTL.as_secs()),
        }
    }
}

/// Creates a node's entry; if one exists, waits (up to the TTL) for it to expire, in
/// case it is this node's own predecessor that was killed, and refuses if it keeps
/// being reported.
async fn register(nodes: &kv::Store, record: &NodeRecord) -> Result<u64, ClusterError> {
    let value = encode(record)?;
    let deadline = tokio::time::Instant::now() + NODE_TTL + HEARTBEAT;
    loop {
        match nodes.create(&record.id, value.clone()).await {
            Ok(rev) => return Ok(rev),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let entry = nodes.entry(&record.id).await.map_err(|e| ClusterError::Registry(e.to_string()))?;
                let other = entry.as_ref().filter(|e| e.operation == kv::Operation::Put).and_then(|e| decode(&e.value).map(|r| (r, e.revision)));
                match other {
                    // Our own entry (an earlier write that timed out but landed): carry on from it.
                    Some((o, revision)) if o.instance == record.instance => {
                        return nodes.update(&record.id, value, revision).await.map_err(|e| ClusterError::Registry(e.to_string()));
                    }
                    Some((o, _)) if tokio::time::Instant::now() >= deadline => {
                        return Err(ClusterError::NodeIdInUse {
                            id: record.id.clone(),
                            age_ms: now_ms().saturating_sub(o.reported_ms),
                            instance: o.instance,
                        });
                    }
                    Some((o, _)) => {
                        info!(node = %record.id, other = %o.instance, "node id registered by another instance; waiting for its entry to expire");
                    }
                    // Gone (expired or deleted) since the create: try again shortly.
                    None if tokio::time::Instant::now() >= deadline => {
                        return Err(ClusterError::Registry(format!("could not register node `{}`: the entry keeps changing", record.id)));
                    }
                    None => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
                tokio::time::sleep(HEARTBEAT / 2).await;
            }
            Err(e) => return Err(ClusterError::Registry(e.to_string())),
        }
    }
}

/// Opens (or creates) the node registry.
async fn open_nodes(js: &jetstream::Context) -> Result<kv::Store, String> {
    let (store, _) =
        bucket::open(js, NODES_BUCKET, "Tessera nodes: one entry per live node, re-written every 2 s", NODE_TTL, bucket::Keep::Memory).await?;
    Ok(store)
}

fn timed_out() -> ClusterError {
    ClusterError::Registry(format!("no answer from NATS within {} s", NATS_TIMEOUT.as_secs()))
}

fn encode(record: &NodeRecord) -> Result<Bytes, ClusterError> {
    serde_json::to_vec(record).map(Bytes::from).map_err(|e| ClusterError::Registry(e.to_string()))
}

fn decode(value: &[u8]) -> Option<NodeRecord> {
    serde_json::from_slice(value).ok()
}

#[async_trait::async_trait]
impl NodeDirectory for ClusterNode {
    fn this_node(&self) -> NodeRecord {
        self.record.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, NodeDirectoryError> {
        // The key listing waits for NATS while it is away: bound it, so a caller gets an answer.
        tokio::time::timeout(NATS_TIMEOUT, self.list())
            .await
            .map_err(|_| NodeDirectoryError(format!("no answer from NATS within {} s", NATS_TIMEOUT.as_secs())))?
    }
}

impl ClusterNode {
    async fn list(&self) -> Result<Vec<NodeRecord>, NodeDirectoryError> {
        let err = |e: String| NodeDirectoryError(e);
        let store = self.store();
        let mut keys = store.keys().await.map_err(|e| err(e.to_string()))?;
        let mut ids = Vec::new();
        while let Some(k) = keys.next().await {
            ids.push(k.map_err(|e| err(e.to_string()))?);
        }
        let mut out = Vec::new();
        for id in ids {
            // Gone between the listing and the read: expired or left.
            if let Some(v) = store.get(&id).await.map_err(|e| err(e.to_string()))? {
                match decode(&v) {
                    Some(r) => out.push(r),
                    None => warn!(key = %id.escape_debug(), "unreadable node entry skipped"),
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}
