//! Tessera's portal: participant login and OWT Client-Portal signaling over Socket.IO.
//!
//! Each socket gets one task ([`session`]) that reads its events in order and answers
//! each request with an ack `('ok', data)` or `('error', reason)`. Room state lives in
//! [`conference::Conferences`] behind one mutex that is never held across an await.
//! The protocol is documented in `docs/protocol.md`.

// Input from the network and files must never panic this crate: no unwrap/expect/panic
// and no unchecked indexing outside tests (`./scripts/test` runs clippy with -D warnings).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

mod conference;
#[cfg(test)]
mod controller_tests;
mod front;
pub mod http;
mod media;
pub mod metrics;
mod mixing;
mod permission;
mod requests;
mod session;
pub mod settings;
pub mod socketio;
mod wire;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tessera_core::agent::AgentEvent;
use tessera_core::command::{EndSession, GetStats, Router};
use tessera_core::home::{ControlAnswer, ControlRequest};
use tessera_core::hooks::{Hook, HookSink};
use tessera_core::ticket::TicketAuthority;
use tessera_core::token::{LocalLedger, TokenAuthority, TokenLedger};
use tessera_core::{ControlError, ParticipantInfo, RoomControl, RoomId, Rooms};
use tracing::info;

pub use settings::PortalSettings;

use conference::{Conferences, Link};
use socketio::SocketIo;

/// How the portal admits participants: the key tokens are signed with, the ledger that
/// makes each token log in once, and the key of reconnection tickets.
#[derive(Clone)]
pub struct Admission {
    /// Verifies participant tokens.
    pub tokens: TokenAuthority,
    /// Remembers used tokens (this node's memory, or the cluster's bucket).
    pub ledger: Arc<dyn TokenLedger>,
    /// Signs and checks reconnection tickets.
    pub tickets: TicketAuthority,
}

impl Admission {
    /// One node alone: used tokens kept in memory, a fresh ticket key for this run.
    pub fn local(tokens: TokenAuthority) -> Admission {
        Admission { tokens, ledger: Arc::new(LocalLedger::default()), tickets: TicketAuthority::random() }
    }
}

/// The portal: shared by the Socket.IO sessions, the HTTP server and the management API.
#[derive(Clone)]
pub struct Portal {
    inner: Arc<Inner>,
}

struct Inner {
    settings: PortalSettings,
    store: Arc<dyn Rooms>,
    admission: Admission,
    sio: SocketIo,
    conferences: Mutex<Conferences>,
    /// Finds the media nodes (SFU, mixer) serving a room.
    router: Arc<dyn Router>,
    /// Set when the server drains: no new logins or sessions.
    draining: std::sync::atomic::AtomicBool,
    /// Where room, participant and stream events go (webhooks), when configured.
    hooks: std::sync::OnceLock<Arc<dyn HookSink>>,
    /// Logins and relogins by outcome, for the metrics.
    logins: metrics::LoginCounts,
    /// Serialises, per room, permission changes over REST and participants' own play and
    /// pause (see `permission.rs`).
    permission_changes: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The cluster's room homes (none on a single node: every room is this node's).
    homes: std::sync::OnceLock<Arc<dyn tessera_core::home::Homes>>,
    /// Sockets of this node whose room's home is another node, by socket id.
    fronted: Mutex<std::collections::HashMap<String, front::Fronted>>,
    /// Sockets of other fronts reported closed before their login reached this home.
    closed_early: Mutex<std::collections::HashMap<tessera_core::home::ClientAddr, std::time::Instant>>,
}

/// Seconds since the Unix epoch.
pub(crate) fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Portal {
    /// Creates the portal and starts accepting Socket.IO connections. `router` finds the
    /// media nodes of a room (none: stream requests are refused); `events` is where they
    /// report back. Must be called inside a tokio runtime.
    pub fn new(
        settings: PortalSettings,
        store: Arc<dyn Rooms>,
        admission: Admission,
        router: Arc<dyn Router>,
        events: Option<tokio::sync::mpsc::Receiver<AgentEvent>>,
    ) -> Portal {
        let (sio, mut sockets) = SocketIo::new(settings.socketio.clone());
        let portal = Portal {
            inner: Arc::new(Inner {
                settings,
                store,
                admission,
                sio,
                conferences: Mutex::new(Conferences::default()),
                router,
                draining: std::sync::atomic::AtomicBool::new(false),
                hooks: std::sync::OnceLock::new(),
                logins: metrics::LoginCounts::default(),
                permission_changes: Default::default(),
                homes: std::sync::OnceLock::new(),
                fronted: Mutex::new(Default::default()),
                closed_early: Mutex::new(Default::default()),
            }),
        };
        if let Some(mut events) = events {
            let p = portal.clone();
            tokio::spawn(async move {
                while let Some(ev) = events.recv().await {
                    p.on_agent_event(ev);
                }
            });
        }
        let accepting = portal.clone();
        tokio::spawn(async move {
            while let Some(socket) = sockets.recv().await {
                tokio::spawn(session::run(accepting.clone(), socket));
            }
        });
        portal
    }

    /// The Socket.IO server, for mounting its routes.
    pub fn socketio(&self) -> &SocketIo {
        &self.inner.sio
    }

    /// This portal as the management API's view of live rooms.
    pub fn control(&self) -> Arc<dyn RoomControl> {
        Arc::new(self.clone())
    }

    /// Stops accepting logins and new publications/subscriptions; what runs goes on.
    pub fn drain(&self) {
        self.inner.draining.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the server drains (for `/readyz` and the request checks).
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Drops every participant (sending `drop`) and closes all sockets.
    pub async fn shutdown(&self) {
        let rooms: Vec<RoomId> = self.lock().rooms.keys().cloned().collect();
        for room in rooms {
            self.drop_room(room.as_str(), "server shutdown");
        }
        self.inner.sio.close_all();
    }

    fn lock(&self) -> MutexGuard<'_, Conferences> {
        // A panic while holding the lock would be a bug; the state is still the best we have.
        self.inner.conferences.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends room, participant and stream events to `hooks` from now on (once).
    pub fn set_hooks(&self, hooks: Arc<dyn HookSink>) {
        let _ = self.inner.hooks.set(hooks);
    }

    /// Hands an event to the hooks, if any; never waits.
    pub(crate) fn hook(&self, hook: impl FnOnce() -> Hook) {
        if let Some(h) = self.inner.hooks.get() {
            h.emit(hook());
        }
    }

    /// Number of participants in live rooms (tests and metrics).
    pub fn participant_count(&self) -> usize {
        self.lock().rooms.values().map(|r| r.participants.len()).sum()
    }

    /// Live rooms, participants, streams and subscriptions, and login totals.
    pub fn metrics(&self) -> metrics::PortalMetrics {
        let conf = self.lock();
        let mut m = metrics::PortalMetrics { rooms: conf.rooms.len(), logins: self.inner.logins.snapshot(), ..Default::default() };
        for r in conf.rooms.values() {
            m.participants += r.participants.len();
            m.streams += r.streams.len();
            for p in &r.participants {
                m.reconnecting += usize::from(matches!(p.link, Link::Waiting(_)));
                for s in p.sessions.values() {
                    match s {
                        media::SessionKind::Subscription => m.subscriptions += 1,
                        media::SessionKind::Publication => m.publications += 1,
                    }
                }
            }
        }
        m
    }

    /// Removes a participant from its room and tells the others.
    pub(crate) fn leave(&self, room: &str, participant: &str, reason: &str) {
        let notify_leave = self.inner.store.get(room).map(|r| r.notifying.participant_activities).unwrap_or(true);
        let (publications, emptied) = {
            let mut conf = self.lock();
            // The streams a room ends with go with it (they get no removal of their own).
            let ending: Vec<String> = match conf.room(room) {
                Some(r) if r.participants.len() == 1 => r.streams.iter().map(|s| s.id.to_string()).collect(),
                _ => Vec::new(),
            };
            let Some((p, emptied)) = conf.remove(room, participant) else { return };
            info!(room, participant, reason, "participant left");
            front::spend_reseat(self, room, participant);
            if notify_leave {
                conf.broadcast(room, None, "participant", &json!({"action": "leave", "data": participant}));
            }
            // Under the lock, so a room's events leave in the order they happened (emit
            // only queues).
            self.hook(|| Hook::ParticipantLeft { room: room.into(), participant: participant.into(), user: p.info.user.clone() });
            if emptied {
                for stream in ending {
                    self.hook(|| Hook::StreamUnpublished { room: room.into(), stream, reason: "room ended".into() });
                }
                self.hook(|| Hook::RoomEnded { room: room.into() });
            }
            (p.publications(), emptied)
        };
        let (portal, room, participant) = (self.clone(), room.to_string(), participant.to_string());
        tokio::spawn(async move {
            portal.media_cleanup(&room, &participant, publications).await;
            if emptied {
                portal.room_emptied(&room).await;
            }
        });
    }

    /// Drops one participant: `drop` notification, leave, socket closed.
    pub(crate) fn drop_participant_now(&self, room: &str, participant: &str, reason: &str) -> bool {
        let handle = {
            let conf = self.lock();
            let Some(p) = conf.room(room).and_then(|r| r.participant(participant)) else { return false };
            match &p.link {
                Link::Connected(h) => Some(h.clone()),
                Link::Waiting(_) => None,
            }
        };
        if let Some(h) = &handle {
            let _ = h.emit("drop", vec![]);
        }
        self.leave(room, participant, reason);
        if let Some(h) = handle {
            h.disconnect();
        }
        true
    }

    pub(crate) fn drop_room(&self, room: &str, reason: &str) {
        // Again while anyone is left: a login that read the room before its deletion may
        // seat someone meanwhile, who must leave properly too (events, media, hooks). The
        // room is gone from the store, so this ends within a round or two.
        for _ in 0..3 {
            let ids: Vec<String> = {
                let conf = self.lock();
                conf.room(room).map(|r| r.participants.iter().map(|p| p.info.id.clone()).collect()).unwrap_or_default()
            };
            if ids.is_empty() {
                return;
            }
            for id in ids {
                self.drop_participant_now(room, &id, reason);
            }
        }
        self.lock().rooms.remove(room);
    }

    /// Issues a reconnection ticket for a participant of `room` and records it as the
    /// participant's, so it can be used once.
    pub(crate) fn ticket_for(&self, room: &str, participant: &str) -> Result<String, String> {
        let lifetime = u64::try_from(self.inner.settings.ticket_lifetime.as_millis()).unwrap_or(u64::MAX);
        let mut conf = self.lock();
        let p = conf.rooms.get_mut(room).and_then(|r| r.participant_mut(participant)).ok_or("Client does NOT exist")?;
        // In a cluster the ticket says where the participant sat, so any portal finds the
        // room's home, and a new home can seat the participant again if this one is lost.
        let seat = match self.homes() {
            Some(h) => tessera_core::ticket::Seat {
                room: room.into(),
                user: p.info.user.clone(),
                role: p.info.role.clone(),
                home: h.incarnation(),
                permission: Some(p.info.permission),
            },
            None => tessera_core::ticket::Seat::default(),
        };
        let (ticket, fields) = self.inner.admission.tickets.issue_seated(participant, &seat, now_ms(), lifetime).map_err(|e| e.to_string())?;
        p.ticket_issued(fields.ticket_id);
        Ok(ticket)
    }

    /// [`Portal::ticket_for`] a participant a login (or relogin) has just seated; if none
    /// can be made, the participant leaves again (`what` failed), rather than stay seated
    /// unanswered, a participant nobody would remove.
    pub(crate) fn ticket_for_seated(&self, room: &str, participant: &str, what: &str) -> Result<String, String> {
        self.ticket_for(room, participant).inspect_err(|_| self.leave(room, participant, what))
    }

    /// The room snapshot sent in the login result of `joining`, superseding the
    /// notifications held back for it so far.
    pub(crate) fn room_snapshot(&self, room: &tessera_core::Room, joining: &str) -> Value {
        let mut conf = self.lock();
        let (participants, streams) = conf.room(&room.id).map(|r| (r.participants_json(), r.streams_json())).unwrap_or_default();
        // Under the same lock as the snapshot, so each event is in one or the other.
        if let Some(p) = conf.rooms.get_mut(room.id.as_str()).and_then(|r| r.participant_mut(joining)) {
            p.snapshot_taken();
        }
        json!({
            "id": room.id,
            "views": room.views.iter().map(|v| v.label.clone()).collect::<Vec<_>>(),
            "participants": participants,
            "streams": streams,
        })
    }
}

impl Portal {
    /// A participant's login was answered (or the relogin that seated it again at a new
    /// home): the notifications held back since its snapshot go out.
    pub(crate) fn login_answered(&self, room: &str, participant: &str) {
        if let Some(p) = self.lock().rooms.get_mut(room).and_then(|r| r.participant_mut(participant)) {
            p.login_answered();
        }
    }

    /// Drops a participant of a room this node holds.
    pub(crate) fn local_drop_participant(&self, room: &str, participant: &str) -> Result<(), ControlError> {
        if self.drop_participant_now(room, participant, "dropped over REST") {
            Ok(())
        } else {
            Err(ControlError::ParticipantNotFound(participant.into()))
        }
    }

    /// The streams of a room this node holds.
    pub(crate) fn local_streams(&self, room: &str) -> Vec<Value> {
        self.lock().room(room).map(|r| r.streams_json()).unwrap_or_default()
    }

    /// Stops a forward stream of a room this node holds.
    pub(crate) async fn local_delete_stream(&self, room: &str, stream: &str) -> Result<(), ControlError> {
        let owner = {
            let conf = self.lock();
            match conf.room(room).and_then(|r| r.stream(stream)) {
                None => return Err(ControlError::StreamNotFound(stream.into())),
                Some(s) => match s.owner() {
                    Some(owner) => owner.clone(),
                    None => return Err(ControlError::BadRequest(format!("Stream {stream} is not a forward stream"))),
                },
            }
        };
        if let Some(agent) = self.inner.router.agent_for(&room.into()) {
            let end = EndSession { room: room.into(), participant: owner, session: stream.into() };
            if let Err(e) = agent.call(end).await {
                tracing::debug!(room, stream, error = %e, "ending a deleted stream's publication");
            }
        }
        self.on_agent_event(AgentEvent::StreamEnded { room: room.into(), stream: stream.into(), reason: "deleted over REST".into() });
        Ok(())
    }
}

/// In a cluster each request goes to the room's home when that is another node.
#[async_trait::async_trait]
impl RoomControl for Portal {
    async fn participants(&self, room: &str) -> Result<Vec<ParticipantInfo>, ControlError> {
        match front::control_elsewhere(self, room, ControlRequest::Participants).await {
            Some(answer) => match answer? {
                ControlAnswer::Participants(p) => Ok(p),
                other => Err(front::unexpected(other)),
            },
            None => Ok(self.lock().participant_infos(room)),
        }
    }

    async fn drop_participant(&self, room: &str, participant: &str) -> Result<(), ControlError> {
        match front::control_elsewhere(self, room, ControlRequest::DropParticipant { participant: participant.into() }).await {
            Some(answer) => answer.map(drop),
            None => self.local_drop_participant(room, participant),
        }
    }

    async fn streams(&self, room: &str) -> Result<Vec<Value>, ControlError> {
        match front::control_elsewhere(self, room, ControlRequest::Streams).await {
            Some(answer) => match answer? {
                ControlAnswer::Json(Value::Array(streams)) => Ok(streams),
                other => Err(front::unexpected(other)),
            },
            None => Ok(self.local_streams(room)),
        }
    }

    async fn delete_stream(&self, room: &str, stream: &str) -> Result<(), ControlError> {
        match front::control_elsewhere(self, room, ControlRequest::DeleteStream { stream: stream.into() }).await {
            Some(answer) => answer.map(drop),
            None => self.local_delete_stream(room, stream).await,
        }
    }

    async fn patch_stream(&self, room: &str, stream: &str, ops: &Value) -> Result<Value, ControlError> {
        match front::control_elsewhere(self, room, ControlRequest::PatchStream { stream: stream.into(), ops: ops.clone() }).await {
            Some(answer) => match answer? {
                ControlAnswer::Json(stream) => Ok(stream),
                other => Err(front::unexpected(other)),
            },
            None => self.patch(room, stream, ops).await,
        }
    }

    async fn patch_participant(&self, room: &str, participant: &str, ops: &Value) -> Result<ParticipantInfo, ControlError> {
        let request = ControlRequest::PatchParticipant { participant: participant.into(), ops: ops.clone() };
        match front::control_elsewhere(self, room, request).await {
            Some(answer) => match answer? {
                ControlAnswer::Participant(p) => Ok(p),
                other => Err(front::unexpected(other)),
            },
            None => Portal::patch_participant(self, room, participant, ops).await,
        }
    }

    async fn room_updated(&self, room: &tessera_core::Room) {
        // Limits and roles are read from the store at each login; views run, so the live
        // room's home (this node, or the one a cluster says) starts and stops them now.
        let request = ControlRequest::RoomUpdated { room: Box::new(room.clone()) };
        match front::control_elsewhere(self, room.id.as_str(), request).await {
            Some(Err(e)) => tracing::warn!(room = %room.id, error = %e, "the room's home could not be told its views changed"),
            Some(Ok(_)) => {}
            None => self.views_changed(room).await,
        }
    }

    async fn room_deleted(&self, room: &str) {
        match front::control_elsewhere(self, room, ControlRequest::RoomDeleted).await {
            Some(Err(e)) => tracing::warn!(room, error = %e, "the room's home could not be told the room was deleted"),
            Some(Ok(_)) => {}
            None => self.drop_room(room, "room deleted"),
        }
    }

    async fn stats(&self) -> Value {
        let (rooms, participants, streams) = {
            let conf = self.lock();
            let participants: usize = conf.rooms.values().map(|r| r.participants.len()).sum();
            let streams: usize = conf.rooms.values().map(|r| r.streams.len()).sum();
            (conf.rooms.len(), participants, streams)
        };
        let nodes = self.inner.router.media_nodes();
        let mut media = if nodes.is_empty() { None } else { Some(tessera_core::command::MediaStats::default()) };
        // All at once: in a cluster each is a request to another machine.
        let answers = futures_util::future::join_all(nodes.iter().map(|n| n.call(GetStats))).await;
        for answer in answers {
            match answer {
                Ok(s) => media = media.map(|m| m + s),
                Err(e) => tracing::debug!(error = %e, "a media node did not answer GetStats"),
            }
        }
        json!({
            "rooms": rooms,
            "participants": participants,
            "streams": streams,
            "sockets": self.inner.sio.session_count(),
            "media": media.and_then(|m| serde_json::to_value(m).ok()).unwrap_or(Value::Null),
        })
    }
}
