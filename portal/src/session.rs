//! One task per socket: the Client-Portal state machine (not logged in → in a room →
//! ended), request dispatch with acks, flood control, and the reconnection grace period
//! when the socket drops.

use std::time::Instant;

use futures_util::StreamExt as _;
use serde_json::{Value, json};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::conference::{ClientLink, Link, Participant, permission_of};
use crate::requests::{self, Login, Text};
use crate::socketio::{Incoming, Socket, SocketHandle};
use crate::{Portal, now_ms, now_secs};
use tessera_core::hooks::Hook;

/// Where a socket stands.
pub(crate) enum State {
    /// Connected, not logged in yet: only `login`/`relogin` are allowed.
    Fresh,
    /// Logged in as `participant` of `room`, owning the participant while `generation` matches.
    Joined { room: String, participant: String, generation: u64 },
    /// Logged out, dropped or failed login: every request is refused.
    Ended,
    /// Logged in to `room`, whose home is another node of the cluster: every request is
    /// forwarded there (`front.rs`).
    Away { room: String, session: tessera_core::home::FrontSession },
    /// The room's home was lost under this socket: its transport is dropped after the ack,
    /// so the client reconnects and resumes with `relogin` at the new home.
    Lost,
}

impl State {
    /// The state a home keeps for a socket of another front, from what the front sent.
    pub(crate) fn from_front(session: tessera_core::home::FrontSession) -> State {
        use tessera_core::home::FrontSession;
        match session {
            FrontSession::Fresh => State::Fresh,
            FrontSession::Joined { room, participant, generation } => State::Joined { room, participant, generation },
            FrontSession::Ended => State::Ended,
        }
    }

    /// What a home tells the front about the socket's state.
    pub(crate) fn to_front(&self) -> tessera_core::home::FrontSession {
        use tessera_core::home::FrontSession;
        match self {
            State::Fresh => FrontSession::Fresh,
            State::Joined { room, participant, generation } => {
                FrontSession::Joined { room: room.clone(), participant: participant.clone(), generation: *generation }
            }
            State::Ended | State::Away { .. } | State::Lost => FrontSession::Ended,
        }
    }
}

/// Flood control: a token bucket of `rate` requests per second with a burst of `2 * rate`.
/// Requests past it are refused, not served; a client that keeps sending while refused
/// (its refusals outrun `4 * rate`, forgiven at `rate` per second) is disconnected. Bursts
/// are refused rather than punished because real clients make them: OWT's JS SDK sends
/// every subscribe, offer and ICE candidate at once when it joins a busy room.
struct Flood {
    tokens: f64,
    refused: f64,
    rate: f64,
    last: Instant,
}

/// What a repeated ICE candidate costs flood control, in requests: repeats are answered
/// without reaching the agent (see [`SentCandidates`]), but a client may not send them
/// without end.
const REPEAT_COST: f64 = 0.05;

/// What flood control says of one request.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Serve,
    Refuse,
    Disconnect,
}

impl Flood {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Flood { tokens: rate * 2.0, refused: 0.0, rate, last: Instant::now() }
    }

    /// A request costing `cost` tokens (1 for a request; less for a repeat served at once).
    fn check(&mut self, cost: f64) -> Verdict {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate * 2.0);
        self.refused = (self.refused - elapsed * self.rate).max(0.0);
        if self.tokens >= cost {
            self.tokens -= cost;
            return Verdict::Serve;
        }
        self.refused += cost;
        if self.refused > self.rate * 4.0 { Verdict::Disconnect } else { Verdict::Refuse }
    }
}

/// The ICE candidates a socket already sent, per transport. OWT's JS SDK sends its
/// candidates again after every answer it gets (it never clears its pending list), so a
/// participant that subscribes to twenty streams would send each candidate twenty times;
/// repeats are answered at once, without reaching the agent or counting as requests. Kept
/// as hashes (keyed per socket), so a client sending huge candidate lines cannot make the
/// portal hold them.
#[derive(Default)]
struct SentCandidates {
    seen: std::collections::HashSet<u64>,
    keys: std::hash::RandomState,
}

impl SentCandidates {
    /// Bounds the memory a client can make the portal hold; past it, repeats are served.
    const MAX: usize = 256;

    /// The hash of (transport, candidate) of a `soac` carrying an ICE candidate.
    fn key(&self, name: &str, args: &[Value]) -> Option<u64> {
        if name != "soac" {
            return None;
        }
        let d = args.first()?;
        let sig = d.get("signaling")?;
        if sig.get("type")?.as_str()? != "candidate" {
            return None;
        }
        let line = sig.get("candidate")?.get("candidate")?.as_str()?;
        Some(std::hash::BuildHasher::hash_one(&self.keys, (d.get("id")?.as_str()?, line.trim())))
    }

    fn seen(&self, key: u64) -> bool {
        self.seen.contains(&key)
    }

    fn remember(&mut self, key: u64) {
        if self.seen.len() < Self::MAX {
            self.seen.insert(key);
        }
    }
}

/// Answer to a request: `('ok', data?)` or `('error', reason)`.
pub(crate) type Reply = Result<Option<Value>, String>;

use crate::metrics::{LoginKind, Refusal, Refused};

fn ack(handle: &SocketHandle, id: Option<u64>, reply: Reply) {
    let Some(id) = id else { return };
    let args = match reply {
        Ok(None) => vec![json!("ok")],
        Ok(Some(data)) => vec![json!("ok"), data],
        Err(reason) => vec![json!("error"), json!(reason)],
    };
    let _ = handle.ack(id, args);
}

/// Runs one socket until it closes.
pub(crate) async fn run(portal: Portal, socket: Socket) {
    let span = info_span!("socket", socket = %socket.id);
    run_inner(portal, socket).instrument(span).await
}

async fn run_inner(portal: Portal, mut socket: Socket) {
    let handle = socket.handle.clone();
    let link = ClientLink::Socket(handle.clone());
    let mut state = State::Fresh;
    let mut flood = Flood::new(portal.inner.settings.max_requests_per_sec);
    // Set once a flood closed the socket: events still queued are dropped unanswered.
    let mut flooded = false;
    // Set while requests are refused for a flood, so the warning is logged once per flood.
    let mut refusing = false;
    let mut sent_candidates = SentCandidates::default();
    let login_deadline = tokio::time::sleep(portal.inner.settings.login_timeout);
    tokio::pin!(login_deadline);
    debug!("socket connected");
    loop {
        let event = tokio::select! {
            ev = socket.events.next() => ev,
            _ = &mut login_deadline, if matches!(state, State::Fresh) => {
                info!("no login within the login timeout; closing");
                handle.disconnect();
                continue;
            }
        };
        match event {
            None | Some(Incoming::Closed { .. }) => {
                let reason = match event {
                    Some(Incoming::Closed { reason }) => reason,
                    _ => "transport gone".into(),
                };
                // A socket served here, or one whose room's home is another node (whose
                // home then keeps its participant for relogin).
                on_closed(&portal, &state, &reason);
                crate::front::closed(&portal, &handle, reason);
                return;
            }
            Some(Incoming::Invalid { reason }) => {
                debug!(reason = ?truncate(&reason), "invalid packet from client");
            }
            Some(Incoming::Event(_)) if flooded => {}
            Some(Incoming::Event(event)) => {
                let crate::socketio::Event { name, args, ack: ack_id } = *event;
                let candidate = sent_candidates.key(&name, &args);
                let repeat = candidate.is_some_and(|c| sent_candidates.seen(c));
                match flood.check(if repeat { REPEAT_COST } else { 1.0 }) {
                    Verdict::Serve if repeat => {
                        ack(&handle, ack_id, Ok(None));
                        continue;
                    }
                    Verdict::Serve => {}
                    Verdict::Refuse => {
                        if !refusing {
                            refusing = true;
                            // `?`: the name is the client's, and must not forge log lines.
                            warn!(request = ?truncate(&name), "request flood; refusing this client's requests past the limit");
                        }
                        ack(&handle, ack_id, Err("Too many requests".into()));
                        continue;
                    }
                    Verdict::Disconnect => {
                        flooded = true;
                        warn!(request = ?truncate(&name), "request flood goes on while refused; disconnecting this client");
                        ack(&handle, ack_id, Err("Too many requests".into()));
                        handle.disconnect();
                        continue;
                    }
                }
                refusing = false;
                let mut replay = Vec::new();
                // Requests are served boxed: this task lives as long as the participant's
                // socket and waits between requests, and an inline request future (the
                // largest of them all) made each such task ~3 KB larger for its whole life.
                let reply = match &state {
                    State::Away { room, .. } => {
                        let room = room.clone();
                        Box::pin(crate::front::forward(&portal, &handle, &mut state, &room, &name, &args, &mut replay)).await
                    }
                    State::Fresh if matches!(name.as_str(), "login" | "relogin") => {
                        match Box::pin(crate::front::home_elsewhere(&portal, &name, &args)).await {
                            Ok(Some(room)) => Box::pin(crate::front::forward(&portal, &handle, &mut state, &room, &name, &args, &mut replay)).await,
                            Ok(None) => Box::pin(handle_request(&portal, &link, &mut state, &name, &args, &mut replay)).await,
                            Err(reason) => {
                                state = State::Ended;
                                Err(reason)
                            }
                        }
                    }
                    _ => Box::pin(handle_request(&portal, &link, &mut state, &name, &args, &mut replay)).await,
                };
                let close_after = matches!(state, State::Ended) && matches!(name.as_str(), "login" | "relogin");
                if let Some(c) = candidate
                    && reply.is_ok()
                {
                    sent_candidates.remember(c);
                }
                ack(&handle, ack_id, reply);
                if let (State::Joined { room, participant, .. }, "login" | "relogin") = (&state, name.as_str()) {
                    portal.login_answered(room, participant);
                }
                // Notifications queued while the socket was gone, after the relogin ack.
                for (event, data) in replay {
                    if handle.emit(&event, vec![data]).is_err() {
                        break;
                    }
                }
                if matches!(state, State::Away { .. }) {
                    crate::front::release_held_back(&portal, &handle);
                }
                if close_after {
                    // OWT closes the socket after a failed login/relogin.
                    handle.disconnect();
                }
                if matches!(state, State::Lost) {
                    state = State::Ended;
                    handle.drop_transport();
                }
            }
        }
    }
}

/// One request of a socket whose room this node holds (its own socket, or another
/// front's, forwarded).
pub(crate) async fn handle_request(
    portal: &Portal,
    link: &ClientLink,
    state: &mut State,
    name: &str,
    args: &[Value],
    replay: &mut Vec<(String, Value)>,
) -> Reply {
    let reply = match &*state {
        State::Fresh if name == "login" => login(portal, link, state, args).await,
        // In a cluster, a participant whose room's home was lost resumes at the new home.
        State::Fresh if name == "relogin" => match crate::front::reseat_ticket(portal, args) {
            Some(ticket) => crate::front::reseat(portal, link, state, ticket).await,
            None => dispatch(portal, link, state, name, args, replay),
        },
        State::Joined { room, participant, .. } if MEDIA.contains(&name) => {
            let (room, participant) = (room.clone(), participant.clone());
            portal.media_request(&room, &participant, name, args).await
        }
        _ => dispatch(portal, link, state, name, args, replay),
    };
    // A room this node claimed for a login that failed goes back, unless someone sits in it.
    if matches!(name, "login" | "relogin") && !matches!(state, State::Joined { .. }) {
        crate::front::release_unused(portal, name, args);
    }
    reply
}

pub(crate) fn dispatch(
    portal: &Portal,
    handle: &ClientLink,
    state: &mut State,
    name: &str,
    args: &[Value],
    replay: &mut Vec<(String, Value)>,
) -> Reply {
    match (name, &*state) {
        ("relogin", State::Fresh) => relogin(portal, handle, state, args, replay),
        ("login" | "relogin", _) => Err("Connection is in service".into()),
        (_, State::Joined { room, participant, .. }) => {
            let (room, participant) = (room.clone(), participant.clone());
            in_room(portal, state, &room, &participant, name, args)
        }
        (_, _) if KNOWN.contains(&name) => Err("Illegal request".into()),
        _ => Err(format!("Unknown request: {}", truncate(name))),
    }
}

/// Requests handled by [`Portal::media_request`] (they wait on the media agent).
pub(crate) const MEDIA: [&str; 7] = ["publish", "unpublish", "stream-control", "subscribe", "unsubscribe", "subscription-control", "soac"];

/// Requests the protocol defines, so an unknown name gets a different error than a
/// known one sent at the wrong time.
const KNOWN: [&str; 13] = [
    "login",
    "relogin",
    "logout",
    "refreshReconnectionTicket",
    "text",
    "publish",
    "unpublish",
    "stream-control",
    "subscribe",
    "unsubscribe",
    "subscription-control",
    "soac",
    "get-region",
];

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// `login`, counted by outcome for the metrics.
pub(crate) async fn login(portal: &Portal, handle: &ClientLink, state: &mut State, args: &[Value]) -> Reply {
    let result = try_login(portal, handle, state, args).await;
    portal.inner.logins.count(LoginKind::Login, result.as_ref().err().map(|r| r.0));
    result.map_err(|Refused(_, message)| message)
}

async fn try_login(portal: &Portal, handle: &ClientLink, state: &mut State, args: &[Value]) -> Result<Option<Value>, Refused> {
    // A failed login ends the socket (OWT behaviour); success replaces this below.
    *state = State::Ended;
    // A draining home still takes the participants other portals bring to its live rooms
    // (those rooms end with it); its own portal takes no new ones.
    if portal.is_draining() && matches!(handle, ClientLink::Socket(_)) {
        return Err(Refused::new(Refusal::Draining, "Server is draining: log in to another server or retry later"));
    }
    let bad = |m: String| Refused(Refusal::BadRequest, m);
    let req: Login = requests::parse("login", args).map_err(bad)?;
    req.check_client().map_err(bad)?;
    let inner = &portal.inner;
    let claims = inner.admission.tokens.verify(&req.token, now_secs()).map_err(|e| Refused(Refusal::from(&e), e.to_string()))?;
    let room = inner.store.get(&claims.room).ok_or_else(|| Refused(Refusal::RoomNotFound, format!("Room not found: {}", claims.room)))?;
    let role = room.role(&claims.role).ok_or(Refused::new(Refusal::Role, "Invalid role"))?;
    let permission = permission_of(role);
    let _seating = Seating::new(portal, &room.id);
    let participant = handle.id().to_string();
    let info = tessera_core::ParticipantInfo { id: participant.clone(), role: claims.role.clone(), user: claims.user.clone(), permission };
    // Spent before the seat is taken, since the ledger may be another machine's (a
    // cluster's) and the room lock is not held across a wait. Of two sockets racing with
    // one token, only the first consume wins; a used token is refused as such, even at a
    // full room.
    let spent = inner.admission.ledger.consume(&claims, now_secs()).await.map_err(|e| Refused(Refusal::from(&e), e.to_string()))?;
    if let Err(refused) = seat(portal, &room, info, handle) {
        // Given back, so the user can retry with it when a seat frees up.
        inner.admission.ledger.release(&claims, spent).await;
        return Err(refused);
    }
    info!(room = %room.id, participant = %participant, user = ?claims.user, role = ?claims.role, "participant joined");
    portal.ensure_mixing(&room).await;
    let ticket = portal.ticket_for_seated(&room.id, &participant, "login failed after seating").map_err(|m| Refused(Refusal::Internal, m))?;
    handle.authenticated();
    *state = State::Joined { room: room.id.clone(), participant: participant.clone(), generation: 0 };
    let mut result = json!({
        "id": participant,
        "user": claims.user,
        "role": claims.role,
        "permission": permission,
        "room": portal.room_snapshot(&room, &participant),
        "reconnectionTicket": ticket,
    });
    let mut ice_servers = inner.settings.ice_servers.clone();
    if let Some(turn) = &inner.settings.turn {
        let expires = now_secs() + turn.lifetime.as_secs();
        let (username, credential) = tessera_core::crypto::turn_credentials(&turn.secret, &participant, expires);
        ice_servers.push(json!({"urls": turn.urls, "username": username, "credential": credential}));
    }
    if !ice_servers.is_empty() {
        // Tessera extension: clients that read it configure their RTCPeerConnection with it.
        if let Value::Object(m) = &mut result {
            m.insert("iceServers".into(), json!(ice_servers));
        }
    }
    Ok(Some(result))
}

/// A login in progress for a room, counted while it lives: in a cluster a room that
/// emptied is not given up by its home under a login that is about to seat someone.
pub(crate) struct Seating<'a> {
    portal: &'a Portal,
    room: String,
}

impl<'a> Seating<'a> {
    pub(crate) fn new(portal: &'a Portal, room: &str) -> Seating<'a> {
        *portal.lock().seating.entry(room.into()).or_default() += 1;
        Seating { portal, room: room.to_string() }
    }
}

impl Drop for Seating<'_> {
    fn drop(&mut self) {
        let mut conf = self.portal.lock();
        if let Some(n) = conf.seating.get_mut(self.room.as_str()) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                conf.seating.remove(self.room.as_str());
            }
        }
    }
}

/// Seats a participant in `room`, telling the others, unless the room is full or (in a
/// cluster) this node does not hold it (any more).
pub(crate) fn seat(portal: &Portal, room: &tessera_core::Room, info: tessera_core::ParticipantInfo, handle: &ClientLink) -> Result<(), Refused> {
    let mut conf = portal.lock();
    let present = conf.room(&room.id).map_or(0, |r| r.participants.len());
    if room.participant_limit >= 0 && i64::try_from(present).unwrap_or(i64::MAX) >= room.participant_limit {
        return Err(Refused::new(Refusal::RoomFull, "Room is full"));
    }
    // Checked under the room lock, which the release of an emptied room also holds.
    if portal.homes().is_some_and(|h| !h.is_home(&room.id)) {
        return Err(Refused::new(Refusal::Unavailable, "Room is moving to another server; retry"));
    }
    if let ClientLink::Remote { client, .. } = handle
        && portal.inner.closed_early.lock().unwrap_or_else(|p| p.into_inner()).remove(client).is_some()
    {
        return Err(Refused::new(Refusal::Internal, "Connection closed before the login completed"));
    }
    let started = !conf.rooms.contains_key(room.id.as_str());
    let participant = info.id.clone();
    let (user, role) = (info.user.clone(), info.role.clone());
    let r = conf.rooms.entry(room.id.as_str().into()).or_default();
    r.participants.push(Participant::new(info, handle.clone()));
    conf.where_is.insert(participant.as_str().into(), room.id.as_str().into());
    if room.notifying.participant_activities {
        let joined = json!({"action": "join", "data": {"id": participant, "user": user, "role": role}});
        conf.broadcast(&room.id, Some(&participant), "participant", &joined);
    }
    // Under the lock, so a room's events leave in the order they happened.
    if started {
        portal.hook(|| Hook::RoomStarted { room: room.id.clone() });
    }
    portal.hook(|| Hook::ParticipantJoined { room: room.id.clone(), participant, user, role });
    Ok(())
}

/// `relogin`, counted by outcome for the metrics.
fn relogin(portal: &Portal, handle: &ClientLink, state: &mut State, args: &[Value], replay: &mut Vec<(String, Value)>) -> Reply {
    let result = try_relogin(portal, handle, state, args, replay);
    portal.inner.logins.count(LoginKind::Relogin, result.as_ref().err().map(|r| r.0));
    result.map_err(|Refused(_, message)| message)
}

fn try_relogin(
    portal: &Portal,
    handle: &ClientLink,
    state: &mut State,
    args: &[Value],
    replay: &mut Vec<(String, Value)>,
) -> Result<Option<Value>, Refused> {
    *state = State::Ended;
    // OWT clients send the ticket string itself; accept `{ticket}` too for clients that follow the doc.
    let ticket = match args.first() {
        Some(Value::Object(_)) => crate::front::relogin_ticket(args).ok_or(Refused::new(Refusal::BadRequest, "relogin: missing ticket"))?,
        _ => crate::front::relogin_ticket(args).ok_or(Refused::new(Refusal::BadRequest, "relogin: missing reconnection ticket"))?,
    };
    let ticket = portal.inner.admission.tickets.verify(&ticket, now_ms()).map_err(|e| Refused(Refusal::from(&e), e.to_string()))?;
    let participant = ticket.participant_id;
    let gone = || Refused::new(Refusal::UnknownParticipant, "Client does NOT exist");
    let (room, generation, pending, old) = {
        let mut conf = portal.lock();
        let room = conf.where_is.get(participant.as_str()).map(ToString::to_string).ok_or_else(gone)?;
        let p = conf.rooms.get_mut(room.as_str()).and_then(|r| r.participant_mut(&participant)).ok_or_else(gone)?;
        // Checked before anything changes: a replayed ticket leaves the live session alone.
        if !p.use_ticket(&ticket.ticket_id) {
            warn!(room = ?room, participant = ?participant, "relogin with a used reconnection ticket refused");
            let used = tessera_core::ticket::TicketError::Used;
            return Err(Refused(Refusal::from(&used), used.to_string()));
        }
        p.generation += 1;
        let old = std::mem::replace(&mut p.link, Link::Connected(handle.clone()));
        let (pending, old_handle) = match old {
            Link::Waiting(q) => (q, None),
            Link::Connected(h) => (Default::default(), Some(h)),
        };
        (room, p.generation, pending, old_handle)
    };
    if let Some(old) = old {
        // The client came back on a new socket before we noticed the old one died.
        old.disconnect();
    }
    let new_ticket = portal.ticket_for(&room, &participant).map_err(|m| Refused(Refusal::Internal, m))?;
    handle.authenticated();
    *state = State::Joined { room: room.clone(), participant: participant.clone(), generation };
    info!(room = %room, participant = %participant, queued = pending.len(), "participant resumed by relogin");
    replay.extend(pending);
    // SDK 5.1 parses the relogin answer as the ticket string (OWT's server sends
    // `{ticket, messages}`, which the SDK cannot read); queued messages are re-sent as
    // ordinary notifications instead. See docs/protocol.md.
    Ok(Some(Value::String(new_ticket)))
}

fn in_room(portal: &Portal, state: &mut State, room: &str, participant: &str, name: &str, args: &[Value]) -> Reply {
    match name {
        "logout" => {
            *state = State::Ended;
            portal.leave(room, participant, "logout");
            Ok(None)
        }
        "refreshReconnectionTicket" => Ok(Some(Value::String(portal.ticket_for(room, participant)?))),
        "text" => {
            let (to, message) = requests::parse::<Text>("text", args)?.checked()?;
            let mut conf = portal.lock();
            if to == "all" {
                // To everyone, the sender included, as OWT does: OWT apps show their own
                // messages when they come back.
                let data = json!({"from": participant, "to": "all", "message": message});
                conf.broadcast(room, None, "text", &data);
            } else {
                if conf.room(room).and_then(|r| r.participant(&to)).is_none() {
                    return Err(format!("Target participant does NOT exist: {}", truncate(&to)));
                }
                conf.notify(room, &to, "text", json!({"from": participant, "to": "me", "message": message}));
            }
            Ok(None)
        }
        _ if KNOWN.contains(&name) => Err(format!("{name}: not supported")),
        _ => Err(format!("Unknown request: {}", truncate(name))),
    }
}

/// The socket closed: a joined participant waits for relogin for the grace period.
pub(crate) fn on_closed(portal: &Portal, state: &State, reason: &str) {
    let State::Joined { room, participant, generation } = state else {
        debug!(%reason, "socket closed");
        return;
    };
    {
        let mut conf = portal.lock();
        let Some(p) = conf.rooms.get_mut(room.as_str()).and_then(|r| r.participant_mut(participant)) else { return };
        if p.generation != *generation {
            // Another socket took this participant over (relogin); nothing to do.
            return;
        }
        if let Link::Connected(_) = p.link {
            p.link = Link::Waiting(Default::default());
        }
    }
    let grace = portal.inner.settings.reconnection_timeout;
    info!(%room, %participant, %reason, grace_secs = grace.as_secs(), "socket lost; keeping participant for relogin");
    let (portal, room, participant, generation) = (portal.clone(), room.clone(), participant.clone(), *generation);
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        let expired = {
            let conf = portal.lock();
            conf.room(&room)
                .and_then(|r| r.participant(&participant))
                .is_some_and(|p| p.generation == generation && matches!(p.link, Link::Waiting(_)))
        };
        if expired {
            portal.leave(&room, &participant, "reconnection timeout");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn flood_allows_burst_then_refuses_then_disconnects() {
        let mut f = Flood::new(5);
        let verdicts: Vec<Verdict> = (0..31).map(|_| f.check(1.0)).collect();
        // A burst of 10 is served, the next 20 refused, the 21st refusal disconnects.
        assert!(verdicts[..10].iter().all(|v| *v == Verdict::Serve), "{verdicts:?}");
        assert!(verdicts[10..30].iter().all(|v| *v == Verdict::Refuse), "{verdicts:?}");
        assert_eq!(verdicts[30], Verdict::Disconnect);
        // A client that backs off is served again and forgiven.
        let mut f = Flood::new(5);
        for _ in 0..25 {
            f.check(1.0);
        }
        f.last -= Duration::from_secs(4);
        assert_eq!(f.check(1.0), Verdict::Serve);
        assert_eq!(f.refused, 0.0);
    }

    #[test]
    fn repeated_candidates_count_a_little_against_the_flood() {
        // OWT's SDK repeats its candidates after each answer: 20 subscriptions × 5 candidates
        // cost 5 requests of a burst of 10...
        let mut f = Flood::new(5);
        assert!((0..100).all(|_| f.check(REPEAT_COST) == Verdict::Serve));
        assert!((0..4).all(|_| f.check(1.0) == Verdict::Serve));
        // ...but a client sending nothing else without end is refused, then disconnected.
        let mut f = Flood::new(5);
        let verdicts: Vec<Verdict> = (0..1000).map(|_| f.check(REPEAT_COST)).collect();
        let served = verdicts.iter().filter(|v| **v == Verdict::Serve).count();
        assert!((199..=201).contains(&served), "{served}");
        assert_eq!(verdicts.last(), Some(&Verdict::Disconnect));
    }

    #[test]
    fn candidate_repeats_are_recognised() {
        let soac =
            |id: &str, line: &str| vec![json!({"id": id, "signaling": {"type": "candidate", "candidate": {"candidate": line, "sdpMid": "0"}}})];
        let mut sent = SentCandidates::default();
        let a = sent.key("soac", &soac("t1", "a=candidate:1 1 udp 9 127.0.0.1 5000 typ host")).unwrap();
        assert!(!sent.seen(a));
        sent.remember(a);
        assert!(sent.seen(a));
        // The same line again (spaces around it do not count) is a repeat.
        assert!(sent.seen(sent.key("soac", &soac("t1", " a=candidate:1 1 udp 9 127.0.0.1 5000 typ host ")).unwrap()));
        // The same line on another transport, or another line, is new.
        assert!(!sent.seen(sent.key("soac", &soac("t2", "a=candidate:1 1 udp 9 127.0.0.1 5000 typ host")).unwrap()));
        assert!(!sent.seen(sent.key("soac", &soac("t1", "a=candidate:2 1 udp 9 127.0.0.1 5001 typ host")).unwrap()));
        // Offers and other requests are not candidates.
        let offer = vec![json!({"id": "t1", "signaling": {"type": "offer", "sdp": "v=0"}})];
        assert_eq!(sent.key("soac", &offer), None);
        assert_eq!(sent.key("text", &soac("t1", "x")), None);
        // What is kept is bounded in number and size, however long the lines.
        let long = "x".repeat(100_000);
        for i in 0..1000 {
            let key = sent.key("soac", &soac("t", &format!("{long}{i}"))).unwrap();
            sent.remember(key);
        }
        assert_eq!(sent.seen.len(), SentCandidates::MAX);
    }
}

/// Property tests of every request a client can send (and the REST stream PATCH), on a
/// live portal with fake media and mix agents: any arguments give an answer, never a
/// panic, and a refused request leaves the participant's sessions as they were.
#[cfg(test)]
mod proptests {
    use super::*;
    use crate::media::SessionKind;
    use crate::socketio::packet::proptests::{config, json_with, text};
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tessera_core::agent::{AgentError, MediaKind};
    use tessera_core::command::{AgentCommand, AgentReply, LocalRouter, MediaNode, MixCommand, MixError, MixNode, MixReply};
    use tessera_core::stream::{ForwardInfo, LayoutEntry, MixedInfo, StreamInfo, StreamKind, TrackFormat, TrackInfo, TrackStatus};
    use tessera_core::token::{PortalAddress, TokenAuthority};
    use tessera_core::{ParticipantInfo, Room, RoomStore};

    const ROOM: &str = "room1";
    const ME: &str = "p1";

    /// Accepts everything, except tracks whose mid is `fail` (to test the cleanup).
    struct FakeAgent;

    #[async_trait::async_trait]
    impl MediaNode for FakeAgent {
        async fn handle(&self, command: AgentCommand) -> Result<AgentReply, AgentError> {
            Ok(match command {
                AgentCommand::Publish(spec) if spec.tracks.iter().any(|t| t.mid == "fail") => {
                    return Err(AgentError::Rejected("refused".into()));
                }
                AgentCommand::Subscribe(spec) if spec.tracks.iter().any(|t| t.mid == "fail") => {
                    return Err(AgentError::Rejected("refused".into()));
                }
                AgentCommand::Publish(_) => AgentReply::Publish(()),
                AgentCommand::Subscribe(_) => AgentReply::Subscribe(()),
                AgentCommand::Signal(_) => AgentReply::Signal(()),
                AgentCommand::EndSession(_) => AgentReply::EndSession(()),
                AgentCommand::SwitchTracks(_) => AgentReply::SwitchTracks(()),
                AgentCommand::RequestKeyframe(_) => AgentReply::RequestKeyframe(()),
                AgentCommand::SelectLayer(_) => AgentReply::SelectLayer(()),
                AgentCommand::ParticipantLeft(_) => AgentReply::ParticipantLeft(()),
                AgentCommand::GetStats(_) => AgentReply::GetStats(Default::default()),
            })
        }
    }

    /// One view, `common`, whose layout has two regions with s-fwd in the first.
    struct FakeMixer;

    fn layout() -> Vec<LayoutEntry> {
        let region = |id: &str| serde_json::from_value(json!({"id": id, "area": {"left": "0", "top": "0", "width": "1/2", "height": "1"}})).unwrap();
        vec![LayoutEntry { stream: Some("s-fwd".into()), region: region("1") }, LayoutEntry { stream: None, region: region("2") }]
    }

    #[async_trait::async_trait]
    impl MixNode for FakeMixer {
        async fn handle(&self, command: MixCommand) -> Result<MixReply, MixError> {
            let view = match &command {
                MixCommand::StartView(_) | MixCommand::StopView(_) => return Err(MixError::Failed("not in these tests".into())),
                MixCommand::Mix(c) => &c.view,
                MixCommand::Unmix(c) => &c.view,
                MixCommand::SetLayout(c) => &c.view,
                MixCommand::SetTemplate(c) => &c.view,
                MixCommand::SetRegion(c) => &c.view,
                MixCommand::GetLayout(c) => &c.view,
            };
            if view != "common" {
                return Err(MixError::NoView(view.clone()));
            }
            Ok(match command {
                MixCommand::Mix(_) => MixReply::Mix(layout()),
                MixCommand::Unmix(_) => MixReply::Unmix(layout()),
                MixCommand::SetLayout(_) => MixReply::SetLayout(layout()),
                MixCommand::SetTemplate(_) => MixReply::SetTemplate(layout()),
                MixCommand::SetRegion(_) => MixReply::SetRegion(layout()),
                _ => MixReply::GetLayout(layout()),
            })
        }
    }

    struct Fixture {
        rt: tokio::runtime::Runtime,
        portal: Portal,
        tokens: TokenAuthority,
        _dir: tempfile::TempDir,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RoomStore::open(dir.path().join("rooms.db")).unwrap());
        store.create(Room::from_options(ROOM.into(), "Room".into(), json!({})).unwrap()).unwrap();
        let tokens = TokenAuthority::new(b"property-test-service-key");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let router = LocalRouter { agent: Some(Arc::new(FakeAgent)), mixer: Some(Arc::new(FakeMixer)), recorder: None };
        let portal = rt.block_on(async { Portal::new(Default::default(), store, crate::Admission::local(tokens.clone()), Arc::new(router), None) });
        Fixture { rt, portal, tokens, _dir: dir }
    }

    /// Room state before each case: p1 publishes s-fwd (mixed into `common`) and has
    /// subscription sub1 on transport t1; the room has the mixed stream room1-common.
    fn reset(portal: &Portal) {
        let mut conf = portal.lock();
        conf.rooms.clear();
        conf.where_is.clear();
        let presenter = tessera_core::room::Role::defaults().into_iter().find(|r| r.role == "presenter").unwrap();
        let info = ParticipantInfo { id: ME.into(), role: "presenter".into(), user: "alice".into(), permission: permission_of(&presenter) };
        let (handle, _) = SocketHandle::for_test(ME, 1);
        let mut p = Participant::new(info, handle.into());
        p.link = Link::Waiting(Default::default());
        p.transports.insert("t1".into());
        p.sessions.insert("s-fwd".into(), SessionKind::Publication);
        p.ready.insert("s-fwd".into());
        p.sessions.insert("sub1".into(), SessionKind::Subscription);
        let r = conf.rooms.entry(ROOM.into()).or_default();
        r.participants.push(p);
        let track = |kind: MediaKind| TrackInfo {
            kind,
            source: "camera".into(),
            mid: None,
            format: TrackFormat::Video(tessera_core::room::VideoFormat { codec: "vp8".into(), profile: None }),
            parameters: None,
            status: TrackStatus::Active,
            rid: None,
        };
        r.streams.push(StreamInfo {
            id: "s-fwd".into(),
            kind: StreamKind::Forward(ForwardInfo { owner: ME.into(), in_views: vec!["common".into()], attributes: json!({}) }),
            tracks: vec![track(MediaKind::Audio), track(MediaKind::Video)],
            data: true,
        });
        r.streams.push(StreamInfo {
            id: "room1-common".into(),
            kind: StreamKind::Mixed(MixedInfo { label: "common".into(), layout: layout(), active_input: None }),
            tracks: vec![track(MediaKind::Audio), track(MediaKind::Video)],
            data: false,
        });
        conf.where_is.insert(ME.into(), ROOM.into());
    }

    fn sessions(portal: &Portal) -> HashMap<tessera_core::SessionId, SessionKind> {
        portal.lock().room(ROOM).and_then(|r| r.participant(ME)).map(|p| p.sessions.clone()).unwrap_or_default()
    }

    /// The words a request parser looks for, as keys and values.
    const WORDS: &[&str] = &[
        "id",
        "media",
        "tracks",
        "type",
        "mid",
        "source",
        "from",
        "data",
        "transport",
        "attributes",
        "signaling",
        "sdp",
        "candidate",
        "sdpMid",
        "sdpMLineIndex",
        "operation",
        "view",
        "region",
        "token",
        "userAgent",
        "protocol",
        "sdk",
        "version",
        "to",
        "message",
        "ticket",
        "audio",
        "video",
        "av",
        "webrtc",
        "offer",
        "answer",
        "removed-candidates",
        "pause",
        "play",
        "mix",
        "unmix",
        "get-region",
        "set-region",
        "update",
        "mic",
        "camera",
        "screen-cast",
        "s-fwd",
        "sub1",
        "t1",
        "room1-common",
        "common",
        "p1",
        "all",
        "1.2",
        "0",
        "1",
        "fail",
        "op",
        "path",
        "value",
        "replace",
        "add",
        "remove",
        "/info/inViews",
        "/info/layout",
        "/info/layout/template",
        "/info/layout/0/stream",
        "/info/layout/1/stream",
        "fluid",
    ];

    fn junk() -> BoxedStrategy<Value> {
        json_with(3, WORDS)
    }

    /// Mostly `typed`, sometimes any JSON.
    fn or_junk(typed: impl Strategy<Value = Value> + 'static) -> BoxedStrategy<Value> {
        prop_oneof![20 => typed, 1 => junk()].boxed()
    }

    fn word(words: &'static [&'static str]) -> BoxedStrategy<Value> {
        or_junk(prop::sample::select(words).prop_map(Value::from))
    }

    /// An object whose fields are each present or not.
    fn obj(fields: Vec<(&'static str, BoxedStrategy<Value>)>) -> BoxedStrategy<Value> {
        let fields: Vec<_> = fields.into_iter().map(|(k, s)| prop::option::weighted(0.85, s).prop_map(move |v| (k, v))).collect();
        or_junk(fields.prop_map(|fields| Value::Object(fields.into_iter().filter_map(|(k, v)| Some((k.to_string(), v?))).collect())))
    }

    fn tracks(with_from: bool) -> BoxedStrategy<Value> {
        let mut fields =
            vec![("type", word(&["audio", "video", "data"])), ("mid", word(&["0", "1", "fail"])), ("source", word(&["mic", "camera", "x"]))];
        if with_from {
            fields.push(("from", word(&["s-fwd", "room1-common", "nope"])));
        }
        or_junk(prop::collection::vec(obj(fields), 0..3).prop_map(Value::Array))
    }

    fn transport() -> BoxedStrategy<Value> {
        prop_oneof![Just(Value::Null), obj(vec![("type", word(&["webrtc", "quic"])), ("id", word(&["t1", "t2", "bad id!"]))])].boxed()
    }

    /// A request body shaped for `name`, with junk mixed in at every level.
    fn body(name: &'static str) -> BoxedStrategy<Value> {
        let av = || word(&["audio", "video", "av", "both"]);
        match name {
            "publish" => obj(vec![
                ("media", prop_oneof![Just(Value::Null), obj(vec![("tracks", tracks(false))])].boxed()),
                ("data", or_junk(any::<bool>().prop_map(Value::from))),
                ("attributes", or_junk(Just(json!({"k": "v"})))),
                ("transport", transport()),
            ]),
            "subscribe" => obj(vec![
                ("media", prop_oneof![Just(Value::Null), obj(vec![("tracks", tracks(true))])].boxed()),
                ("data", prop_oneof![Just(json!(false)), obj(vec![("from", word(&["s-fwd", "room1-common"]))])].boxed()),
                ("transport", transport()),
            ]),
            "soac" => {
                let candidate = obj(vec![
                    ("candidate", word(&["a=candidate:1 1 udp 1 10.0.0.1 9 typ host", "  ", "a="])),
                    ("sdpMid", word(&["0"])),
                    ("sdpMLineIndex", or_junk((0u64..70_000).prop_map(Value::from))),
                ]);
                let signaling = obj(vec![
                    ("type", word(&["offer", "answer", "candidate", "removed-candidates"])),
                    ("sdp", or_junk(text(20).prop_map(Value::from))),
                    ("candidate", candidate),
                ]);
                obj(vec![("id", word(&["t1", "t2"])), ("signaling", signaling)])
            }
            "unpublish" | "unsubscribe" => obj(vec![("id", word(&["s-fwd", "sub1", "room1-common"]))]),
            "stream-control" => obj(vec![
                ("id", word(&["s-fwd", "room1-common", "nope"])),
                ("operation", word(&["pause", "play", "mix", "unmix", "get-region", "set-region", "dance"])),
                (
                    "data",
                    prop_oneof![av(), word(&["common", "other"]), obj(vec![("view", word(&["common", "x"])), ("region", word(&["1", "2"]))])].boxed(),
                ),
            ]),
            "subscription-control" => {
                obj(vec![("id", word(&["sub1", "s-fwd"])), ("operation", word(&["pause", "play", "update", "dance"])), ("data", av())])
            }
            "text" => obj(vec![
                ("to", word(&["all", "p1", "nobody", ""])),
                ("message", or_junk(prop_oneof![text(20), Just("x".repeat(2048)), Just("é".repeat(2049))].prop_map(Value::from))),
            ]),
            "login" => obj(vec![
                ("token", word(&["", "bm90IGEgdG9rZW4="])),
                ("userAgent", obj(vec![("sdk", obj(vec![("type", word(&["JavaScript"])), ("version", word(&["5.1"]))]))])),
                ("protocol", word(&["1.0", "1.2", "2.0"])),
            ]),
            "relogin" => prop_oneof![text(20).prop_map(Value::from), obj(vec![("ticket", or_junk(text(20).prop_map(Value::from)))])].boxed(),
            _ => junk(),
        }
    }

    const NAMES: &[&str] = &[
        "publish",
        "unpublish",
        "subscribe",
        "unsubscribe",
        "soac",
        "stream-control",
        "subscription-control",
        "text",
        "login",
        "relogin",
        "refreshReconnectionTicket",
        "get-region",
        "dance",
    ];

    fn request() -> BoxedStrategy<(&'static str, Vec<Value>)> {
        // Mostly the requests with a body to parse.
        prop_oneof![6 => prop::sample::select(&NAMES[..10]), 1 => prop::sample::select(NAMES)]
            .prop_flat_map(|name| {
                let args = prop_oneof![
                    1 => Just(Vec::new()),
                    16 => body(name).prop_map(|b| vec![b]),
                    1 => prop::collection::vec(junk(), 0..3),
                ];
                (Just(name), args)
            })
            .boxed()
    }

    /// Runs a request as the session task would, from p1 (in the room) or, for login and
    /// relogin, from a fresh socket.
    fn run(f: &Fixture, name: &str, args: &[Value]) -> (Reply, bool) {
        static SOCKET: AtomicU64 = AtomicU64::new(0);
        let portal = &f.portal;
        f.rt.block_on(async {
            if MEDIA.contains(&name) {
                return (portal.media_request(ROOM, ME, name, args).await, false);
            }
            let id = format!("sock{}", SOCKET.fetch_add(1, Ordering::Relaxed));
            let (handle, _) = SocketHandle::for_test(&id, 64);
            let handle = ClientLink::from(handle);
            let mut replay = Vec::new();
            if name == "login" || name == "relogin" {
                let mut state = State::Fresh;
                let reply = if name == "login" {
                    login(portal, &handle, &mut state, args).await
                } else {
                    dispatch(portal, &handle, &mut state, name, args, &mut replay)
                };
                let joined = matches!(state, State::Joined { .. });
                return (reply, joined);
            }
            let mut state = State::Joined { room: ROOM.into(), participant: ME.into(), generation: 0 };
            (dispatch(portal, &handle, &mut state, name, args, &mut replay), false)
        })
    }

    /// Checks one answer against the sessions before and after.
    fn check(
        name: &str,
        reply: &Reply,
        before: &HashMap<tessera_core::SessionId, SessionKind>,
        after: &HashMap<tessera_core::SessionId, SessionKind>,
    ) -> Result<(), TestCaseError> {
        match reply {
            Err(e) => {
                prop_assert!(!e.trim().is_empty(), "{} answered an empty error", name);
                prop_assert_eq!(before, after, "refused {} changed the sessions: {}", name, e);
            }
            Ok(answer) => match name {
                "publish" | "subscribe" => {
                    let id = answer.as_ref().and_then(|a| a["id"].as_str()).unwrap_or_default();
                    let kind = if name == "publish" { SessionKind::Publication } else { SessionKind::Subscription };
                    prop_assert_eq!(after.get(id), Some(&kind), "{} answered {:?}", name, answer);
                    prop_assert_eq!(after.len(), before.len() + 1);
                }
                "unpublish" | "unsubscribe" => prop_assert_eq!(after.len() + 1, before.len()),
                _ => prop_assert_eq!(before, after, "{} changed the sessions", name),
            },
        }
        Ok(())
    }

    fn patch_ops() -> BoxedStrategy<Value> {
        let op = obj(vec![
            ("op", word(&["add", "remove", "replace", "move"])),
            (
                "path",
                word(&[
                    "/info/inViews",
                    "/info/layout",
                    "/info/layout/template",
                    "/info/layout/0/stream",
                    "/info/layout/7/stream",
                    "/info/layout//stream",
                    "/x",
                ]),
            ),
            ("value", prop_oneof![word(&["common", "other", "s-fwd", "fluid"]), Just(crate::wire::layout_json(&layout()))].boxed()),
        ]);
        or_junk(prop::collection::vec(op, 0..4).prop_map(Value::Array))
    }

    /// Runs `test` on cases of `strategy` against one portal (building it per case would
    /// cost more than the cases).
    fn run_cases<S: Strategy>(strategy: S, test: impl Fn(&Fixture, S::Value) -> Result<(), TestCaseError>) {
        let f = fixture();
        // More cases than elsewhere: they are spread over a dozen requests, and cheap.
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 1024, ..config() });
        if let Err(e) = runner.run(&strategy, |input| {
            reset(&f.portal);
            test(&f, input)
        }) {
            panic!("{e}");
        }
    }

    #[test]
    fn requests_never_panic_and_refusals_change_nothing() {
        let real_login = prop::option::weighted(0.2, (text(12), prop::sample::select(&["presenter", "viewer", "nobody"][..])));
        run_cases((request(), real_login), |f, ((name, mut args), real_login)| {
            // Sometimes log in for real: a fresh valid token in an otherwise random body,
            // or p1's own reconnection ticket.
            if let Some((user, role)) = real_login {
                match (name, args.first_mut()) {
                    ("login", Some(Value::Object(m))) => {
                        let portal = PortalAddress { host: "127.0.0.1:8080".into(), secure: false };
                        let (token, _) = f.tokens.issue(ROOM, &user, role, &portal, now_secs(), 60).unwrap();
                        m.insert("token".into(), token.into());
                    }
                    ("relogin", Some(arg)) => *arg = f.portal.ticket_for(ROOM, ME).unwrap().into(),
                    _ => {}
                }
            }
            let before = sessions(&f.portal);
            let (reply, joined) = run(f, name, &args);
            check(name, &reply, &before, &sessions(&f.portal))?;
            prop_assert_eq!(joined, (name == "login" || name == "relogin") && reply.is_ok(), "{} answered {:?}", name, reply);
            Ok(())
        });
    }

    #[test]
    fn stream_patches_never_panic() {
        run_cases((prop::sample::select(&["s-fwd", "s-fwd", "room1-common", "room1-common", "nope"][..]), patch_ops()), |f, (stream, ops)| {
            if let Err(e) = f.rt.block_on(f.portal.patch(ROOM, stream, &ops)) {
                prop_assert!(!e.to_string().trim().is_empty());
            }
            Ok(())
        });
    }
}
