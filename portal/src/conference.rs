//! Live state of rooms: who is in each room, through which socket, and what is
//! published. One `std::sync::Mutex` guards it; every critical section is short and
//! never awaits (emits go into bounded per-socket queues and do not block).
//!
//! A participant is either *connected* (a live socket) or *waiting* (socket lost,
//! inside the reconnection grace period). Notifications for a waiting participant are
//! queued and delivered after `relogin`.

use std::collections::{HashMap, HashSet, VecDeque};

use serde_json::{Value, json};
use tessera_core::{ParticipantId, ParticipantInfo, Permission, RoomId, SessionId, StreamInfo, TransportId, ViewLabel};

use crate::socketio::{SocketClosed, SocketHandle};

/// Where a connected participant's socket is: on this node, or on another portal node (a
/// front) of the cluster, reached through the room homes' per-client subjects.
#[derive(Clone)]
pub(crate) enum ClientLink {
    /// A socket of this node.
    Socket(SocketHandle),
    /// A socket of another node.
    Remote {
        client: tessera_core::home::ClientAddr,
        homes: std::sync::Arc<dyn tessera_core::home::Homes>,
        /// The notifications sent lately, numbered, until the front says which it delivered.
        sent: std::sync::Arc<std::sync::Mutex<SentLog>>,
    },
}

/// Notifications sent lately to a socket of another node. When its front reports the
/// socket closed after delivering some, the rest are queued for the participant's relogin,
/// as a local socket's undelivered ones are.
#[derive(Default)]
pub(crate) struct SentLog {
    next: u64,
    recent: VecDeque<(u64, String, Vec<Value>)>,
}

/// Notifications kept per remote socket for that (the gap between a socket's loss and the
/// home hearing of it is short).
const SENT_KEPT: usize = 256;

impl SentLog {
    /// Keeps notification `seq` (the next one), forgetting the oldest beyond [`SENT_KEPT`].
    pub fn record(&mut self, seq: u64, event: &str, args: &[Value]) {
        self.next = seq + 1;
        if self.recent.len() >= SENT_KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back((seq, event.to_string(), args.to_vec()));
    }

    /// The notifications from number `delivered` on, oldest first.
    pub fn undelivered(&self, delivered: u64) -> VecDeque<(String, Value)> {
        self.recent
            .iter()
            .filter(|(seq, _, _)| *seq >= delivered)
            .map(|(_, event, args)| (event.clone(), args.first().cloned().unwrap_or(Value::Null)))
            .collect()
    }
}

impl From<SocketHandle> for ClientLink {
    fn from(h: SocketHandle) -> Self {
        ClientLink::Socket(h)
    }
}

impl ClientLink {
    /// The socket's id (the participant's id once logged in).
    pub fn id(&self) -> &str {
        match self {
            ClientLink::Socket(h) => h.id(),
            ClientLink::Remote { client, .. } => &client.socket,
        }
    }

    /// Sends a notification. A remote socket's loss is learnt from its front, not here.
    pub fn emit(&self, event: &str, args: Vec<Value>) -> Result<(), SocketClosed> {
        match self {
            ClientLink::Socket(h) => h.emit(event, args),
            ClientLink::Remote { client, homes, sent } => {
                let seq = {
                    let mut log = sent.lock().unwrap_or_else(|p| p.into_inner());
                    let seq = log.next;
                    log.record(seq, event, &args);
                    seq
                };
                homes.to_client(client, tessera_core::home::ToClient::Emit { seq, event: event.into(), args });
                Ok(())
            }
        }
    }

    /// Sends a Socket.IO DISCONNECT and closes the socket.
    pub fn disconnect(&self) {
        match self {
            ClientLink::Socket(h) => h.disconnect(),
            ClientLink::Remote { client, homes, .. } => homes.to_client(client, tessera_core::home::ToClient::Disconnect),
        }
    }

    /// The socket logged in: it no longer counts against the caps on sockets waiting to
    /// (a remote socket's front does this itself).
    pub fn authenticated(&self) {
        if let ClientLink::Socket(h) = self {
            h.authenticated();
        }
    }
}

/// Unused reconnection tickets kept per participant. A client holds one at a time (it
/// replaces it at each refresh); a few more cover a refresh answer lost with the socket.
const MAX_TICKETS: usize = 4;

/// Most notifications kept for a participant while their socket is gone. Beyond this the
/// oldest are dropped: a client that missed that much should rejoin anyway.
const MAX_PENDING: usize = 1024;

/// How a participant is reached right now.
pub(crate) enum Link {
    /// A live socket.
    Connected(ClientLink),
    /// Socket lost; notifications wait here until relogin or the grace period ends.
    Waiting(VecDeque<(String, Value)>),
}

/// One participant in a room.
pub(crate) struct Participant {
    pub info: ParticipantInfo,
    pub link: Link,
    /// Bumped at every socket change, so a stale socket's close or an old grace timer
    /// cannot act on a participant who has moved on.
    pub generation: u64,
    /// Transports (peer connections) this participant opened.
    pub transports: HashSet<TransportId>,
    /// Publications and subscriptions by id.
    pub sessions: HashMap<SessionId, crate::media::SessionKind>,
    /// `attributes` given at publish, by publication id.
    pub attributes: HashMap<SessionId, Value>,
    /// Publications whose media flows (they are streams of the room).
    pub ready: HashSet<SessionId>,
    /// Tracks (session, kind) paused because a permission was revoked over REST, resumed
    /// when it is granted again.
    pub held: HashSet<(String, tessera_core::agent::MediaKind)>,
    /// Subscription tracks the participant paused itself (`subscription-control`), which a
    /// granted permission must not resume.
    pub paused: HashSet<(String, tessera_core::agent::MediaKind)>,
    /// The media kinds each session carries, as requested.
    pub kinds: HashMap<SessionId, Vec<tessera_core::agent::MediaKind>>,
    /// The stream each subscription's audio and video come from (an update keeps them).
    pub reads: HashMap<SessionId, Vec<(tessera_core::agent::MediaKind, tessera_core::StreamId)>>,
    /// Ids of the reconnection tickets issued to this participant and not used yet.
    tickets: VecDeque<String>,
    /// While its login (or the relogin that seats it at a new home) is being answered:
    /// notifications held back, so that none reaches the client before the answer, and
    /// none the login result's snapshot holds reaches it twice (see
    /// [`Participant::snapshot_taken`]).
    joining: Option<VecDeque<(String, Value)>>,
}

impl Participant {
    /// Forgets a publication or subscription and everything kept about it; returns its kind
    /// if it was known.
    pub fn forget(&mut self, session: &str) -> Option<crate::media::SessionKind> {
        self.attributes.remove(session);
        self.ready.remove(session);
        self.held.retain(|(id, _)| id != session);
        self.paused.retain(|(id, _)| id != session);
        self.kinds.remove(session);
        self.reads.remove(session);
        self.sessions.remove(session)
    }

    /// A participant that just logged in on `handle`.
    pub fn new(info: ParticipantInfo, handle: ClientLink) -> Self {
        Participant {
            info,
            link: Link::Connected(handle),
            generation: 0,
            transports: HashSet::new(),
            sessions: HashMap::new(),
            attributes: HashMap::new(),
            ready: HashSet::new(),
            held: HashSet::new(),
            paused: HashSet::new(),
            kinds: HashMap::new(),
            reads: HashMap::new(),
            tickets: VecDeque::new(),
            joining: Some(VecDeque::new()),
        }
    }

    /// The login result's snapshot of the room was taken (under the room lock): the
    /// participant and stream events held back until now are in it (its participants and
    /// streams as they are now); anything else (a text sent to the newcomer meanwhile) is
    /// not, and still goes out after the answer.
    pub fn snapshot_taken(&mut self) {
        if let Some(q) = &mut self.joining {
            q.retain(|(event, _)| event != "participant" && event != "stream");
        }
    }

    /// The login was answered: what was held back since the snapshot goes out.
    pub fn login_answered(&mut self) {
        for (event, data) in self.joining.take().unwrap_or_default() {
            deliver(self, &event, data);
        }
    }

    /// Remembers a ticket just issued to this participant; the oldest unused one is
    /// forgotten (and so refused) beyond [`MAX_TICKETS`].
    pub fn ticket_issued(&mut self, ticket_id: String) {
        if self.tickets.len() >= MAX_TICKETS {
            self.tickets.pop_front();
        }
        self.tickets.push_back(ticket_id);
    }

    /// Spends a ticket for a relogin: true if it was issued to this participant and not
    /// used. Every other outstanding ticket is void from then on, so a ticket copied
    /// before the relogin cannot take the participant over afterwards.
    pub fn use_ticket(&mut self, ticket_id: &str) -> bool {
        let known = self.tickets.iter().any(|t| t == ticket_id);
        if known {
            self.tickets.clear();
        }
        known
    }

    /// Registers a new session on the transport the request named (which must be one of
    /// this participant's) or, without one, on a new transport named after the session
    /// (OWT 1.2's rule). Returns the transport id.
    pub fn open_session(&mut self, requested: Option<String>, session: &str, kind: crate::media::SessionKind) -> Result<TransportId, String> {
        let transport = match requested {
            Some(t) if self.transports.contains(t.as_str()) => TransportId(t),
            Some(t) => return Err(format!("Transport does NOT exist: {t}")),
            None => TransportId::from(session),
        };
        self.transports.insert(transport.clone());
        self.sessions.insert(session.into(), kind);
        Ok(transport)
    }

    /// Publications announced but not flowing yet (they count against inputLimit).
    pub fn pending_publications(&self) -> usize {
        self.sessions.iter().filter(|(id, s)| **s == crate::media::SessionKind::Publication && !self.ready.contains(*id)).count()
    }

    /// Ids of this participant's publications.
    pub fn publications(&self) -> HashSet<SessionId> {
        self.sessions.iter().filter(|(_, s)| **s == crate::media::SessionKind::Publication).map(|(id, _)| id.clone()).collect()
    }
}

/// A room with at least one participant.
#[derive(Default)]
pub(crate) struct RoomState {
    /// Participants in join order.
    pub participants: Vec<Participant>,
    /// Streams in the room, in publication order (mixed ones first, from the room's start).
    pub streams: Vec<StreamInfo>,
}

impl RoomState {
    pub fn participant(&self, id: &str) -> Option<&Participant> {
        self.participants.iter().find(|p| p.info.id == id)
    }

    pub fn participant_mut(&mut self, id: &str) -> Option<&mut Participant> {
        self.participants.iter_mut().find(|p| p.info.id == id)
    }

    pub fn stream(&self, id: &str) -> Option<&StreamInfo> {
        self.streams.iter().find(|s| s.id == id)
    }

    pub fn stream_mut(&mut self, id: &str) -> Option<&mut StreamInfo> {
        self.streams.iter_mut().find(|s| s.id == id)
    }

    /// The streams in OWT's wire shape.
    pub fn streams_json(&self) -> Vec<Value> {
        self.streams.iter().map(crate::wire::stream_json).collect()
    }

    /// The participant list as the login result shows it.
    pub fn participants_json(&self) -> Vec<Value> {
        self.participants.iter().map(|p| json!({"id": p.info.id, "user": p.info.user, "role": p.info.role})).collect()
    }
}

/// All live rooms.
#[derive(Default)]
pub(crate) struct Conferences {
    pub rooms: HashMap<RoomId, RoomState>,
    /// participant id → room id, so `relogin` (which carries only a participant id) finds the room.
    pub where_is: HashMap<ParticipantId, RoomId>,
    /// The views started for each room, to stop when it empties (even if the room's
    /// configuration changed meanwhile).
    pub mixing: HashMap<RoomId, Vec<ViewLabel>>,
    /// Logins (and re-seats) in progress per room: a room this node holds is not given up
    /// under one (see [`crate::session::Seating`]).
    pub seating: HashMap<RoomId, usize>,
}

impl Conferences {
    pub fn room(&self, id: &str) -> Option<&RoomState> {
        self.rooms.get(id)
    }

    /// Sends (or queues) one notification to one participant.
    pub fn notify(&mut self, room: &str, participant: &str, event: &str, data: Value) {
        let Some(p) = self.rooms.get_mut(room).and_then(|r| r.participant_mut(participant)) else { return };
        deliver(p, event, data);
    }

    /// Sends a notification to everyone in the room except `except`.
    pub fn broadcast(&mut self, room: &str, except: Option<&str>, event: &str, data: &Value) {
        let Some(r) = self.rooms.get_mut(room) else { return };
        for p in r.participants.iter_mut().filter(|p| Some(p.info.id.as_str()) != except) {
            deliver(p, event, data.clone());
        }
    }

    /// Removes a participant, returning it and whether the room emptied (its state is
    /// then dropped: streams belong to participants, mixed ones to the room's life).
    pub fn remove(&mut self, room: &str, participant: &str) -> Option<(Participant, bool)> {
        let r = self.rooms.get_mut(room)?;
        let idx = r.participants.iter().position(|p| p.info.id == participant)?;
        let p = r.participants.remove(idx);
        self.where_is.remove(participant);
        let emptied = r.participants.is_empty();
        if emptied {
            self.rooms.remove(room);
        }
        Some((p, emptied))
    }

    /// REST view of a room's participants.
    pub fn participant_infos(&self, room: &str) -> Vec<ParticipantInfo> {
        self.rooms.get(room).map(|r| r.participants.iter().map(|p| p.info.clone()).collect()).unwrap_or_default()
    }
}

fn deliver(p: &mut Participant, event: &str, data: Value) {
    if let Some(held) = &mut p.joining {
        if held.len() >= MAX_PENDING {
            held.pop_front();
        }
        held.push_back((event.to_string(), data));
        return;
    }
    match &mut p.link {
        Link::Connected(handle) => {
            if handle.emit(event, vec![data.clone()]).is_err() {
                // The socket just died; its session task will move us to Waiting. Keep
                // the message for relogin instead of losing it.
                let mut q = VecDeque::new();
                q.push_back((event.to_string(), data));
                p.link = Link::Waiting(q);
            }
        }
        Link::Waiting(queue) => {
            if queue.len() >= MAX_PENDING {
                queue.pop_front();
            }
            queue.push_back((event.to_string(), data));
        }
    }
}

/// Builds a participant's permission from its room role.
pub(crate) fn permission_of(role: &tessera_core::room::Role) -> Permission {
    Permission { publish: role.publish, subscribe: role.subscribe }
}
