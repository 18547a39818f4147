//! Room homes over NATS: each live room is held by one portal node, claimed atomically in
//! the key-value bucket `tessera_homes`; requests for it travel on a per-room subject and
//! notifications back on per-client subjects.
//!
//! - Claim: key `r.<room>` → `{node, instance, atMs}`, created only if absent (of two
//!   nodes claiming at once, one wins), re-written every [`HEARTBEAT`] by its holder; the
//!   bucket's `max_age` is [`HOME_TTL`], so the claim of a node that died disappears and
//!   another node can take the room over. A room that empties is released (its key
//!   deleted at the holder's revision).
//! - Requests: `tessera.room.<room>.home`, a [`ToHome`] as JSON, answered by the holder
//!   (only the holder subscribes). "No responders" means nobody holds it (any more).
//! - Notifications: `tessera.client.<front>.<socket>`, a [`ToClient`] as JSON; each front
//!   subscribes to `tessera.client.<itself>.*`. NATS keeps one publisher's messages on one
//!   subject in order, so a participant's notifications arrive in the order the home sent them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_nats::jetstream::kv;
use async_nats::{Client, RequestErrorKind};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tessera_core::home::{
    ClientAddr, ControlAnswer, ControlErrorWire, ControlRequest, FrontReply, FrontRequest, Home, HomeError, HomeService, Homes, ToClient,
};
use tessera_core::node::{NodeDirectory, now_ms};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::{ClusterError, ClusterNode, HEARTBEAT, NATS_TIMEOUT, NODE_TTL, bucket};

/// The bucket of room claims.
pub const HOMES_BUCKET: &str = "tessera_homes";
/// A claim disappears this long after its holder's last refresh.
pub const HOME_TTL: Duration = NODE_TTL;
/// How long a forwarded client request may take at the home (a publish waits up to 10 s
/// on its webrtc node).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(15);
/// Notifications waiting to go to NATS; beyond this they are dropped (the front sees the
/// gap and its socket reconnects, as a local socket's overflow does).
const OUTBOX: usize = 8192;
/// How long a liveness probe of a room's home may take.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// A claim not refreshed for this long, whose room's subject nobody serves, belongs to a
/// node that died or lost NATS: another node may take the room over without waiting for
/// the claim to expire. (Holders refresh every [`HEARTBEAT`]; the age is read against the
/// holder's clock, so nodes' clocks must agree within a second or two.)
const STALE: Duration = Duration::from_secs(6);
/// How often the refresh loop looks at the NATS connection.
const RECONNECT_CHECK: Duration = Duration::from_millis(250);
/// The least time between two re-openings of the claims bucket.
const REOPEN_GAP: Duration = Duration::from_secs(2);
/// How long a released room remembers the run it had been taken over from.
const RELEASED_KEPT: Duration = Duration::from_secs(30);
/// How long a forwarded management request may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// A node's claim on a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Claim {
    node: String,
    instance: String,
    at_ms: u64,
}

impl Claim {
    /// The holding run, as [`Homes::incarnation`] names it.
    fn run(&self) -> String {
        run_of(&self.node, &self.instance)
    }

    /// Not written for [`STALE`]: its holder may be gone.
    fn stale(&self) -> bool {
        now_ms().saturating_sub(self.at_ms) > STALE.as_millis() as u64
    }
}

/// A node's run: its id and the instance id of this start.
pub(crate) fn run_of(node: &str, instance: &str) -> String {
    format!("{node}/{instance}")
}

/// What travels on a room's subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
enum ToHome {
    /// A client's request (answered with a [`FrontReply`]).
    Request { request: FrontRequest },
    /// A client's socket closed after `delivered` notifications (answered `true`).
    Closed { client: ClientAddr, delivered: u64, reason: String },
    /// A management request (answered with `Result<ControlAnswer, ControlErrorWire>`).
    Control { request: ControlRequest },
    /// Who holds the room (answered with the holder's incarnation as a JSON string).
    Ping,
}

/// A room this node holds.
struct Held {
    revision: u64,
    /// The run this node took the room over from.
    predecessor: Option<String>,
    /// Serves the room's subject.
    task: JoinHandle<()>,
}

/// The cluster's room homes, as one node sees and serves them.
pub struct ClusterHomes {
    this: Weak<ClusterHomes>,
    node: Arc<ClusterNode>,
    /// Notifications for other fronts' sockets, published in order by one task (callers
    /// hold the portal's room lock and cannot await).
    outbox: mpsc::Sender<(String, Bytes)>,
    client: Client,
    id: String,
    instance: String,
    kv: Mutex<kv::Store>,
    held: Mutex<HashMap<String, Held>>,
    /// Serialises this node's writes of claims (claim, refresh, release), so a release
    /// and a refresh of one room cannot leave a claim nobody serves.
    io: tokio::sync::Mutex<()>,
    /// Rooms released lately and the run they had been taken over from: a room that
    /// empties right after a takeover and is claimed again keeps its predecessor, so the
    /// dead home's participants can still be seated again.
    released: Mutex<HashMap<String, (String, tokio::time::Instant)>>,
    /// When the claims bucket was last opened again (at most every [`REOPEN_GAP`]).
    reopened: Mutex<Option<tokio::time::Instant>>,
    service: OnceLock<Arc<dyn HomeService>>,
}

/// The subject-safe form of a room id: as it is when it is made of letters, digits, `-`
/// and `_` (Tessera's own ids are), else `%` and its bytes in hex.
fn token(room: &str) -> String {
    if !room.is_empty() && room.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        room.to_string()
    } else {
        let hex: String = room.bytes().map(|b| format!("{b:02x}")).collect();
        format!("%{hex}")
    }
}

/// Which run (`<node>/<instance>`) holds `room` now, asked on its subject: `Some(None)`
/// when nobody serves it, `None` when that cannot be told (NATS away, no answer in time).
pub(crate) async fn holder(client: &async_nats::Client, room: &str) -> Option<Option<crate::rpc::Caller>> {
    let payload = serde_json::to_vec(&ToHome::Ping).ok()?;
    let request = async_nats::Request::new().payload(payload.into()).timeout(Some(PING_TIMEOUT));
    match tokio::time::timeout(PING_TIMEOUT, client.send_request(room_subject(room), request)).await {
        Ok(Ok(msg)) => {
            let run: String = serde_json::from_slice(&msg.payload).ok()?;
            Some(Some(crate::rpc::Caller::parse(&run)))
        }
        Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => Some(None),
        _ => None,
    }
}

/// A room's request subject.
pub fn room_subject(room: &str) -> String {
    format!("tessera.room.{}.home", token(room))
}

fn client_subject(client: &ClientAddr) -> String {
    format!("tessera.client.{}.{}", client.front, client.socket)
}

/// The claim's key (bucket keys cannot hold `%`: a hex-encoded id goes after `x.`).
fn key(room: &str) -> String {
    let t = token(room);
    match t.strip_prefix('%') {
        Some(hex) => format!("x.{hex}"),
        None => format!("r.{t}"),
    }
}

async fn open_kv(node: &ClusterNode) -> Result<kv::Store, String> {
    let description = "Tessera room homes: which portal node holds each live room, re-written every 2 s";
    bucket::open(&node.js, HOMES_BUCKET, description, HOME_TTL, bucket::Keep::Memory).await.map(|(kv, _)| kv)
}

fn unavailable(e: impl std::fmt::Display) -> HomeError {
    HomeError::Unavailable(e.to_string())
}

impl ClusterHomes {
    /// Opens the bucket and starts receiving the notifications for this node's sockets and
    /// refreshing this node's claims. `service` is set later with [`ClusterHomes::serve`].
    pub async fn start(node: Arc<ClusterNode>) -> Result<Arc<ClusterHomes>, ClusterError> {
        let kv = open_kv(&node).await.map_err(ClusterError::Registry)?;
        let record = node.this_node();
        let (outbox, mut queued) = mpsc::channel::<(String, Bytes)>(OUTBOX);
        let client = node.client();
        tokio::spawn(async move {
            while let Some((subject, payload)) = queued.recv().await {
                if let Err(e) = client.publish(subject, payload).await {
                    debug!(error = %e, "a message to another node could not be sent");
                }
            }
        });
        let homes = Arc::new_cyclic(|this| ClusterHomes {
            this: this.clone(),
            outbox,
            client: node.client(),
            id: record.id,
            instance: record.instance,
            node,
            kv: Mutex::new(kv),
            held: Mutex::new(HashMap::new()),
            io: tokio::sync::Mutex::new(()),
            released: Mutex::new(HashMap::new()),
            reopened: Mutex::new(None),
            service: OnceLock::new(),
        });
        homes.spawn_refresh();
        homes.spawn_clients().await?;
        Ok(homes)
    }

    /// Hands requests and notifications to `service` (the portal) from now on.
    pub fn serve(&self, service: Arc<dyn HomeService>) {
        let _ = self.service.set(service);
    }

    fn kv(&self) -> kv::Store {
        self.kv.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn claim_value(&self) -> Result<Bytes, HomeError> {
        let claim = Claim { node: self.id.clone(), instance: self.instance.clone(), at_ms: now_ms() };
        serde_json::to_vec(&claim).map(Bytes::from).map_err(|e| HomeError::Protocol(e.to_string()))
    }

    /// Notifications for this node's sockets.
    async fn spawn_clients(self: &Arc<Self>) -> Result<(), ClusterError> {
        let subject = format!("tessera.client.{}.*", self.id);
        let mut sub = self.client.subscribe(subject.clone()).await.map_err(|e| ClusterError::Registry(format!("subscribing to {subject}: {e}")))?;
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Some(me) = me.upgrade() else { return };
                let Some(socket) = msg.subject.rsplit('.').next() else { continue };
                match serde_json::from_slice::<ToClient>(&msg.payload) {
                    Ok(m) => {
                        if let Some(s) = me.service.get() {
                            s.to_client(socket, m);
                        }
                    }
                    Err(e) => warn!(error = %e, "an unreadable client notification was dropped"),
                }
            }
        });
        Ok(())
    }

    /// Re-writes this node's claims every [`HEARTBEAT`].
    fn spawn_refresh(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            // Checked often, written every heartbeat, and at once after NATS comes back: a
            // holder that was cut off learns within a moment whether its rooms were taken
            // over meanwhile (and steps down), so two nodes never serve a room for long.
            let mut tick = tokio::time::interval(RECONNECT_CHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last = tokio::time::Instant::now();
            let mut was_connected = true;
            loop {
                tick.tick().await;
                let Some(me) = me.upgrade() else { return };
                let connected = bucket::connected(&me.client).is_ok();
                let due = last.elapsed() >= HEARTBEAT || (connected && !was_connected);
                was_connected = connected;
                if !due {
                    continue;
                }
                last = tokio::time::Instant::now();
                let rooms: Vec<String> = me.held.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
                for room in rooms {
                    let refreshed = {
                        let _io = me.io.lock().await;
                        tokio::time::timeout(NATS_TIMEOUT, me.refresh(&room)).await
                    };
                    match refreshed {
                        Ok(Ok(())) => {}
                        Ok(Err(HomeError::Unreachable { node, .. })) => {
                            // Taken over while this node could not refresh its claim (cut
                            // off from NATS past the claim's age): the other node holds
                            // the room now; this one steps down so the room has one home.
                            warn!(room = ?room, other = %node, "room taken over by another node while this one could not refresh its claim; stepping down");
                            if let Some(held) = me.held.lock().unwrap_or_else(|p| p.into_inner()).remove(&room) {
                                held.task.abort();
                            }
                            if let Some(s) = me.service.get() {
                                s.room_lost(&room);
                            }
                        }
                        Ok(Err(e)) => warn!(room = ?room, error = %e, "a room claim could not be refreshed"),
                        Err(_) => debug!(room = ?room, "a room claim could not be refreshed: NATS did not answer"),
                    }
                }
            }
        });
    }

    /// Opens the bucket again (making it if NATS lost it).
    async fn reopen(&self) -> Result<(), HomeError> {
        {
            let mut last = self.reopened.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < REOPEN_GAP) {
                return Err(unavailable("the claims bucket is unreadable"));
            }
            *last = Some(tokio::time::Instant::now());
        }
        let kv = open_kv(&self.node).await.map_err(unavailable)?;
        *self.kv.lock().unwrap_or_else(|p| p.into_inner()) = kv;
        Ok(())
    }

    /// Re-writes one claim; called under `io`.
    async fn refresh(&self, room: &str) -> Result<(), HomeError> {
        // Released since the list was taken.
        let Some(revision) = self.held.lock().unwrap_or_else(|p| p.into_inner()).get(room).map(|h| h.revision) else { return Ok(()) };
        bucket::connected(&self.client).map_err(unavailable)?;
        let value = self.claim_value()?;
        let k = key(room);
        let next = match self.kv().update(&k, value.clone(), revision).await {
            Ok(rev) => rev,
            Err(e) => {
                debug!(room = ?room, error = %e, "claim update refused; re-reading it");
                // Expired while NATS was away, or the bucket was lost with a NATS restart.
                let entry = match self.kv().entry(&k).await {
                    Ok(e) => e.filter(|e| e.operation == kv::Operation::Put),
                    Err(_) => {
                        self.reopen().await?;
                        None
                    }
                };
                match entry.map(|e| (serde_json::from_slice::<Claim>(&e.value).ok(), e.revision)) {
                    Some((Some(c), rev)) if c.node == self.id && c.instance == self.instance => {
                        self.kv().update(&k, value, rev).await.map_err(unavailable)?
                    }
                    Some((other, _)) => {
                        let by = other.map(|c| c.node).unwrap_or_default();
                        return Err(HomeError::Unreachable { room: room.into(), node: by });
                    }
                    None => {
                        // Gone (expired while NATS was away, or lost with a NATS restart);
                        // unless another node serves the room by now, it is written again.
                        if let Some(other) = self.answering(room).await?.filter(|o| *o != self.incarnation()) {
                            return Err(HomeError::Unreachable { room: room.into(), node: other });
                        }
                        info!(room = ?room, "claiming room again (the claim had expired)");
                        match self.kv().create(&k, value.clone()).await {
                            Ok(rev) => rev,
                            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => return Err(unavailable(e)),
                            // The bucket itself may be gone (a NATS restart loses memory
                            // storage): made again, then written.
                            Err(_) => {
                                self.reopen().await?;
                                self.kv().create(&k, value).await.map_err(unavailable)?
                            }
                        }
                    }
                }
            }
        };
        if let Some(h) = self.held.lock().unwrap_or_else(|p| p.into_inner()).get_mut(room) {
            h.revision = next;
        }
        Ok(())
    }

    /// Starts serving `room`'s subject.
    async fn serve_room(self: &Arc<Self>, room: &str) -> Result<JoinHandle<()>, HomeError> {
        let mut sub = self.client.subscribe(room_subject(room)).await.map_err(unavailable)?;
        // Sent before the caller learns it holds the room (the claim itself is already in
        // the bucket: a front that reads it meanwhile gets "no responders" and retries).
        let _ = tokio::time::timeout(NATS_TIMEOUT, self.client.flush()).await;
        let me = Arc::downgrade(self);
        let room = room.to_string();
        Ok(tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Some(me) = me.upgrade() else { return };
                let Some(service) = me.service.get().cloned() else { continue };
                let message = match serde_json::from_slice::<ToHome>(&msg.payload) {
                    Ok(ToHome::Ping) => {
                        if let (Some(reply), Ok(payload)) = (msg.reply, serde_json::to_vec(&me.incarnation())) {
                            let _ = me.client.publish(reply, payload.into()).await;
                        }
                        continue;
                    }
                    Ok(ToHome::Closed { client: c, delivered, reason }) => {
                        // In the order received, before any later request of that client
                        // (a relogin) runs; answered so the front knows it arrived.
                        service.closed(&room, c, delivered, reason);
                        if let Some(reply) = msg.reply {
                            let _ = me.client.publish(reply, bytes::Bytes::from_static(b"true")).await;
                        }
                        continue;
                    }
                    Ok(m) => m,
                    Err(e) => {
                        warn!(room = ?room, error = %e, "an unreadable request for a room was dropped");
                        continue;
                    }
                };
                let (client, room) = (me.client.clone(), room.clone());
                // Each request on its own task: a publish waiting on its webrtc node must
                // not hold up the room's other participants. A front sends one client's
                // requests one at a time, so each client's stay in order.
                tokio::spawn(async move {
                    let answer = match message {
                        ToHome::Request { request } => serde_json::to_vec(&service.request(&room, request).await),
                        ToHome::Closed { .. } | ToHome::Ping => return,
                        ToHome::Control { request } => {
                            let answer: Result<ControlAnswer, ControlErrorWire> = service.control(&room, request).await.map_err(Into::into);
                            serde_json::to_vec(&answer)
                        }
                    };
                    let (Some(reply), Ok(payload)) = (msg.reply, answer) else { return };
                    if let Err(e) = client.publish(reply, payload.into()).await {
                        debug!(error = %e, "an answer to a front could not be sent");
                    }
                });
            }
        }))
    }

    async fn read_claim(&self, room: &str) -> Result<Option<(Claim, u64)>, HomeError> {
        let read = || async { tokio::time::timeout(NATS_TIMEOUT, self.kv().entry(&key(room))).await.map_err(|_| unavailable("NATS did not answer")) };
        let entry = match read().await? {
            Ok(entry) => entry,
            // The bucket may be gone (a NATS restart loses memory storage): made again.
            Err(e) => {
                debug!(room = ?room, error = %e, "claims unreadable; opening the bucket again");
                bucket::connected(&self.client).map_err(unavailable)?;
                self.reopen().await?;
                read().await?.map_err(unavailable)?
            }
        };
        Ok(entry.filter(|e| e.operation == kv::Operation::Put).and_then(|e| serde_json::from_slice::<Claim>(&e.value).ok().map(|c| (c, e.revision))))
    }

    /// Sends `message` to the home of `room` and waits for its answer. `Unreachable` when
    /// nobody serves the room's subject (nothing was delivered, so a retry is safe).
    async fn ask(&self, room: &str, message: &ToHome, limit: Duration) -> Result<Bytes, HomeError> {
        bucket::connected(&self.client).map_err(unavailable)?;
        let payload = serde_json::to_vec(message).map_err(|e| HomeError::Protocol(e.to_string()))?;
        let request = async_nats::Request::new().payload(payload.into()).timeout(Some(limit));
        let answer = tokio::time::timeout(limit, self.client.send_request(room_subject(room), request)).await;
        let unreachable = || HomeError::Unreachable { room: room.into(), node: "its home".into() };
        match answer {
            Ok(Ok(msg)) => Ok(msg.payload),
            Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => Err(unreachable()),
            Ok(Err(e)) if e.kind() == RequestErrorKind::TimedOut => {
                Err(unavailable(format!("the room's home did not answer within {} s", limit.as_secs())))
            }
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(unavailable(format!("the room's home did not answer within {} s", limit.as_secs()))),
        }
    }
}

#[async_trait::async_trait]
impl Homes for ClusterHomes {
    fn node(&self) -> &str {
        &self.id
    }

    fn incarnation(&self) -> String {
        run_of(&self.id, &self.instance)
    }

    async fn claim(&self, room: &str) -> Result<Home, HomeError> {
        if self.is_home(room) {
            return Ok(Home::Here);
        }
        // Most often another live node holds it: answered without taking the write lock.
        if let Some((c, _)) = self.read_claim(room).await?
            && c.node != self.id
            && !c.stale()
        {
            return Ok(Home::There(c.node));
        }
        let _io = self.io.lock().await;
        for _ in 0..10 {
            if self.is_home(room) {
                return Ok(Home::Here);
            }
            match self.read_claim(room).await? {
                Some((c, revision)) if c.node != self.id || c.instance != self.instance => {
                    let stale = c.stale();
                    // This node's previous run held it and died: its rooms died with it.
                    let previous_run = c.node == self.id;
                    // A holder that does not answer in time counts as gone once its claim is stale.
                    let holder_gone = previous_run || (stale && self.answering(room).await.map_or(true, |a| a.is_none()));
                    if !holder_gone {
                        return Ok(Home::There(c.node));
                    }
                    // Its holder is gone: the room's live state went with it.
                    let value = self.claim_value()?;
                    if let Ok(rev) = self.kv().update(&key(room), value, revision).await {
                        warn!(room = ?room, dead = %c.node, "room taken over from a node that stopped answering");
                        return self.hold(room, rev, Some(c.run())).await;
                    }
                }
                Some((_, revision)) => {
                    // This run's own claim: one it could not refresh for a while (NATS was
                    // away), or of a room it released whose delete did not go through.
                    let value = self.claim_value()?;
                    if let Ok(rev) = self.kv().update(&key(room), value, revision).await {
                        let still_held = {
                            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                            held.get_mut(room).map(|h| h.revision = rev)
                        };
                        if still_held.is_some() {
                            return Ok(Home::Here);
                        }
                        return self.hold(room, rev, None).await;
                    }
                }
                None => {
                    // No claim, but maybe a holder: a NATS restart empties the bucket, and
                    // holders write their claims again within a heartbeat.
                    if let Some(holder) = self.answering(room).await? {
                        let node = holder.split('/').next().unwrap_or_default().to_string();
                        return Ok(Home::There(node));
                    }
                    bucket::connected(&self.client).map_err(unavailable)?;
                    let value = self.claim_value()?;
                    match tokio::time::timeout(NATS_TIMEOUT, self.kv().create(&key(room), value)).await {
                        Ok(Ok(rev)) => return self.hold(room, rev, None).await,
                        // Another node claimed it first: read whose it is.
                        Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                        // The bucket may be gone (NATS restarted): made again, then retried.
                        Ok(Err(e)) => {
                            debug!(room = ?room, error = %e, "claim refused; opening the bucket again");
                            self.reopen().await?;
                        }
                        Err(_) => return Err(unavailable("NATS did not answer")),
                    }
                }
            }
        }
        Err(HomeError::Unavailable(format!("the claim on room {room:?} keeps changing")))
    }

    async fn holder(&self, room: &str) -> Result<Option<Home>, HomeError> {
        if self.is_home(room) {
            return Ok(Some(Home::Here));
        }
        Ok(match self.read_claim(room).await? {
            Some((c, _)) if c.node != self.id => Some(Home::There(c.node)),
            Some(_) => None,
            // No claim, but maybe a holder about to write it again (after a NATS restart).
            None => self
                .answering(room)
                .await?
                .filter(|h| *h != self.incarnation())
                .map(|h| Home::There(h.split('/').next().unwrap_or_default().to_string())),
        })
    }

    fn is_home(&self, room: &str) -> bool {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).contains_key(room)
    }

    fn predecessor(&self, room: &str) -> Option<String> {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).get(room).and_then(|h| h.predecessor.clone())
    }

    fn node_listed(&self, node: &str) -> bool {
        self.node.known_nodes().iter().any(|n| n.id == node)
    }

    fn is_live(&self, incarnation: &str) -> bool {
        self.node.known_nodes().iter().any(|n| run_of(&n.id, &n.instance) == incarnation)
    }

    fn release(&self, room: &str) {
        let Some(held) = self.held.lock().unwrap_or_else(|p| p.into_inner()).remove(room) else { return };
        held.task.abort();
        if let Some(p) = held.predecessor {
            self.released.lock().unwrap_or_else(|p| p.into_inner()).insert(room.to_string(), (p, tokio::time::Instant::now()));
        }
        let Some(me) = self.this.upgrade() else { return };
        let room = room.to_string();
        tokio::spawn(async move {
            let _io = me.io.lock().await;
            // Claimed again since: keep it.
            if me.is_home(&room) {
                return;
            }
            // The claim at its current revision (a refresh may have moved it), if still ours.
            let delete = async {
                match me.read_claim(&room).await? {
                    Some((c, revision)) if c.node == me.id && c.instance == me.instance => {
                        me.kv().delete_expect_revision(&key(&room), Some(revision)).await.map_err(unavailable)
                    }
                    _ => Ok(()),
                }
            };
            match tokio::time::timeout(NATS_TIMEOUT, delete).await {
                Ok(Ok(())) => debug!(room = ?room, "room released"),
                Ok(Err(e)) => debug!(room = ?room, error = %e, "a room's claim could not be deleted; it expires"),
                Err(_) => debug!(room = ?room, "a room's claim could not be deleted (NATS did not answer); it expires"),
            }
        });
    }

    async fn forward(&self, room: &str, request: FrontRequest) -> Result<FrontReply, HomeError> {
        let answer = self.ask(room, &ToHome::Request { request }, FORWARD_TIMEOUT).await?;
        serde_json::from_slice(&answer).map_err(|e| HomeError::Protocol(format!("unreadable answer from the room's home: {e}")))
    }

    fn closed(&self, room: &str, client: ClientAddr, delivered: u64, reason: String) {
        let Some(me) = self.this.upgrade() else { return };
        let room = room.to_string();
        // Asked until answered (for about the reconnection grace period's first half
        // minute): a close the home never hears of would keep the participant forever.
        tokio::spawn(async move {
            let message = ToHome::Closed { client, delivered, reason };
            for attempt in 0..15u32 {
                match me.ask(&room, &message, PING_TIMEOUT).await {
                    Ok(_) => return,
                    // Nobody holds the room: nobody to tell.
                    Err(HomeError::Unreachable { .. }) if attempt > 2 => return,
                    Err(e) => debug!(room = ?room, error = %e, "a socket's close did not reach its room's home yet"),
                }
                tokio::time::sleep(HEARTBEAT).await;
            }
        });
    }

    fn to_client(&self, client: &ClientAddr, message: ToClient) {
        let Ok(payload) = serde_json::to_vec(&message) else { return };
        if self.outbox.try_send((client_subject(client), payload.into())).is_err() {
            debug!(socket = %client.socket, "a notification for another node's socket was dropped (outbox full)");
        }
    }

    async fn answering(&self, room: &str) -> Result<Option<String>, HomeError> {
        match self.ask(room, &ToHome::Ping, PING_TIMEOUT).await {
            Ok(answer) => serde_json::from_slice(&answer).map(Some).map_err(|e| HomeError::Protocol(e.to_string())),
            Err(HomeError::Unreachable { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn control(&self, room: &str, request: ControlRequest) -> Result<ControlAnswer, HomeError> {
        let message = ToHome::Control { request };
        // A home that just claimed the room subscribes a moment after its claim shows.
        let mut tries = 0;
        let answer = loop {
            match self.ask(room, &message, CONTROL_TIMEOUT).await {
                Err(HomeError::Unreachable { .. }) if tries < 3 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => break other?,
            }
        };
        let answer: Result<ControlAnswer, ControlErrorWire> =
            serde_json::from_slice(&answer).map_err(|e| HomeError::Protocol(format!("unreadable answer from the room's home: {e}")))?;
        answer.map_err(HomeError::Control)
    }
}

impl ClusterHomes {
    async fn hold(&self, room: &str, revision: u64, predecessor: Option<String>) -> Result<Home, HomeError> {
        let predecessor = predecessor.or_else(|| {
            let mut released = self.released.lock().unwrap_or_else(|p| p.into_inner());
            released.retain(|_, (_, at)| at.elapsed() < RELEASED_KEPT);
            released.remove(room).map(|(p, _)| p)
        });
        let me = self.this.upgrade().ok_or_else(|| unavailable("shutting down"))?;
        let task = match me.serve_room(room).await {
            Ok(task) => task,
            Err(e) => {
                // Not served, so not held: give the claim back for the next try.
                let _ = tokio::time::timeout(NATS_TIMEOUT, self.kv().delete_expect_revision(&key(room), Some(revision))).await;
                return Err(e);
            }
        };
        info!(room = ?room, node = %self.id, "room claimed: this node is its home");
        self.held.lock().unwrap_or_else(|p| p.into_inner()).insert(room.to_string(), Held { revision, predecessor, task });
        Ok(Home::Here)
    }
}
