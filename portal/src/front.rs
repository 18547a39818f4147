//! The portal in a cluster: a *front* for sockets whose room's home is another node, and
//! the *home* of the rooms this node holds, for other fronts' sockets.
//!
//! A socket's `login`/`relogin` names its room (the token's, or the room signed into the
//! reconnection ticket). When the room's home is this node (or no node holds it and this
//! one claims it) the socket is served here as on a single node. Otherwise every request
//! of the socket is forwarded to the home, which answers the ack and sends the
//! participant's notifications back; a socket that closes is reported to the home, which
//! keeps the participant for relogin as usual. A front that finds its sockets' home gone
//! tells each socket that its transports failed and drops the socket's transport, so the
//! client reconnects and resumes with `relogin` at the room's new home, which seats it
//! again from the ticket (once). See docs/cluster.md, "Room homes".

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tessera_core::home::{
    ClientAddr, ControlAnswer, ControlRequest, FrontReply, FrontRequest, FrontSession, Home, HomeError, HomeService, Homes, ToClient,
};
use tessera_core::ticket::Ticket;
use tessera_core::token::{TokenClaims, TokenError};
use tessera_core::{ControlError, ParticipantInfo};
use tracing::{debug, info, warn};

use crate::conference::{ClientLink, Link, permission_of};
use crate::metrics::{LoginKind, Refusal, Refused};
use crate::session::{Reply, State};
use crate::socketio::SocketHandle;
use crate::{Portal, now_ms, now_secs};

/// How long a front waits for a room's home to be found or taken over (a dead holder's
/// claim is taken over once stale, see `tessera_cluster::homes`).
const HOME_WAIT: Duration = Duration::from_secs(14);
/// How often a front checks that the homes of its sockets' rooms still answer.
const WATCH: Duration = Duration::from_secs(2);
/// Checks in a row a front must be missing from the node list before its sockets count as
/// closed (its entry expires 10 s after its last report; a NATS restart empties the list
/// for a moment).
const FRONT_MISSES: u32 = 5;
/// How long a home remembers sockets reported closed before their login arrived.
const CLOSED_EARLY_KEPT: Duration = Duration::from_secs(60);

/// A socket of this node whose room's home is another node.
pub(crate) struct Fronted {
    handle: SocketHandle,
    room: String,
    /// The home's incarnation ("" until the login is answered).
    home: String,
    /// Transports the client opened through the home, told as failed if the home is lost.
    transports: HashSet<String>,
    /// How many of the home's notifications reached the socket (they are numbered from 0).
    delivered: u64,
    /// The home was found lost: the socket is being dropped.
    lost: bool,
    /// Notifications that came while the socket's login or relogin was in flight: sent
    /// after its answer (and the replay), as on a single node.
    held_back: Option<Vec<(u64, String, Vec<Value>)>>,
}

impl Portal {
    /// Makes this portal one of a cluster's: rooms are held by their homes. Once, before
    /// the first socket connects.
    pub fn set_homes(&self, homes: Arc<dyn Homes>) {
        if self.inner.homes.set(homes).is_ok() {
            let portal = self.clone();
            tokio::spawn(async move { portal.watch_homes().await });
        }
    }

    /// The cluster's room homes, if this portal is in one.
    pub(crate) fn homes(&self) -> Option<&Arc<dyn Homes>> {
        self.inner.homes.get()
    }

    fn fronted(&self) -> std::sync::MutexGuard<'_, HashMap<String, Fronted>> {
        self.inner.fronted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every [`WATCH`]: a room whose home stopped answering (or is another node's run
    /// now) loses its sockets here: each is told its transports failed, and its transport
    /// is dropped so the client resumes at the room's new home.
    ///
    /// As a home, it also lets go of the participants of fronts that left the cluster (a
    /// front that died cannot report its sockets closed): missing from the node list
    /// [`FRONT_MISSES`] checks in a row, their participants wait for relogin as if their
    /// sockets had closed.
    async fn watch_homes(&self) {
        let Some(homes) = self.homes().cloned() else { return };
        let mut tick = tokio::time::interval(WATCH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Rooms whose home did not answer at the last check: lost at the second miss, so a
        // home reconnecting to NATS at that moment does not cost its participants anything.
        let mut suspects: HashSet<(String, String)> = HashSet::new();
        let mut missing_fronts: HashMap<String, u32> = HashMap::new();
        loop {
            tick.tick().await;
            let rooms: HashSet<(String, String)> =
                self.fronted().values().filter(|f| !f.home.is_empty() && !f.lost).map(|f| (f.room.clone(), f.home.clone())).collect();
            suspects.retain(|r| rooms.contains(r));
            for (room, home) in rooms {
                match homes.answering(&room).await {
                    Ok(Some(now)) if now == home => {
                        suspects.remove(&(room, home));
                    }
                    // NATS away: the home may be fine; media flows on meanwhile.
                    Err(e) => debug!(room = ?room, error = %e, "could not check the room's home"),
                    Ok(now) => {
                        let key = (room.clone(), home.clone());
                        if suspects.remove(&key) {
                            self.home_lost(&room, &home, now.as_deref());
                        } else {
                            suspects.insert(key);
                        }
                    }
                }
            }
            self.check_fronts(homes.as_ref(), &mut missing_fronts);
        }
    }

    /// The home side of [`Portal::watch_homes`]: participants whose front left.
    fn check_fronts(&self, homes: &dyn Homes, missing: &mut HashMap<String, u32>) {
        // A front's run is what must live: one restarted under the same id lost its sockets.
        let live = |client: &ClientAddr| if client.run.is_empty() { homes.node_listed(&client.front) } else { homes.is_live(&client.run) };
        let mut fronts: HashMap<String, bool> = HashMap::new();
        let mut gone: Vec<(String, String, u64)> = Vec::new();
        {
            let conf = self.lock();
            for (room, r) in &conf.rooms {
                for p in &r.participants {
                    if let Link::Connected(ClientLink::Remote { client, .. }) = &p.link {
                        let key = format!("{}|{}", client.front, client.run);
                        let alive = *fronts.entry(key.clone()).or_insert_with(|| live(client));
                        if !alive && missing.get(&key).is_some_and(|n| *n + 1 >= FRONT_MISSES) {
                            gone.push((room.to_string(), p.info.id.clone(), p.generation));
                        }
                    }
                }
            }
        }
        missing.retain(|f, _| fronts.contains_key(f));
        for (front, alive) in fronts {
            if alive {
                missing.remove(&front);
            } else {
                *missing.entry(front).or_default() += 1;
            }
        }
        for (room, participant, generation) in gone {
            info!(room = ?room, participant = ?participant, "the portal node holding this participant's socket left the cluster");
            {
                let mut conf = self.lock();
                if let Some(p) = conf.rooms.get_mut(room.as_str()).and_then(|r| r.participant_mut(&participant))
                    && p.generation == generation
                    && matches!(p.link, Link::Connected(ClientLink::Remote { .. }))
                {
                    p.link = Link::Waiting(Default::default());
                }
            }
            crate::session::on_closed(self, &State::Joined { room, participant, generation }, "its portal node left the cluster");
        }
    }

    fn home_lost(&self, room: &str, home: &str, now: Option<&str>) {
        let mut fronted = self.fronted();
        let mut sockets = 0;
        // Kept (marked lost) until their sockets close, which reports what they got.
        for f in fronted.values_mut().filter(|f| f.room == room && f.home == home && !f.lost) {
            f.lost = true;
            sockets += 1;
            tell_transports_failed(&f.handle, f.transports.iter().map(String::as_str));
            f.handle.drop_transport();
        }
        drop(fronted);
        warn!(room = ?room, home, now = ?now, sockets, "the room's home is gone; its participants here reconnect");
    }

    /// This node held `room` and another node took it over: the participants here are
    /// void. Its own sockets are told their transports failed and reconnect (their relogin
    /// finds the new home); other fronts notice the new home by themselves.
    pub(crate) fn lose_room(&self, room: &str) {
        let state = {
            let mut conf = self.lock();
            conf.mixing.remove(room);
            let state = conf.rooms.remove(room);
            if let Some(r) = &state {
                for p in &r.participants {
                    conf.where_is.remove(p.info.id.as_str());
                }
            }
            state
        };
        let Some(state) = state else { return };
        warn!(room = ?room, participants = state.participants.len(), "another node took this room over; its participants here reconnect to it");
        for p in &state.participants {
            if let Link::Connected(ClientLink::Socket(h)) = &p.link {
                tell_transports_failed(h, p.transports.iter().map(|t| t.as_str()));
                h.drop_transport();
            }
        }
        // Only the sessions this node placed: the participants may already sit at the new
        // home under the same ids, with new sessions on the same webrtc nodes.
        let portal = self.clone();
        let room = room.to_string();
        tokio::spawn(async move {
            if let Some(agent) = portal.inner.router.agent_for(&room.as_str().into()) {
                for p in &state.participants {
                    for session in p.sessions.keys() {
                        let end = tessera_core::command::EndSession {
                            room: room.as_str().into(),
                            participant: p.info.id.as_str().into(),
                            session: session.clone(),
                        };
                        if let Err(e) = agent.call(end).await {
                            debug!(room = ?room, error = %e, "ending a session of a room taken over");
                        }
                    }
                }
            }
            portal.inner.router.release(&room.as_str().into());
        });
    }
}

/// Tells a socket that the transports it opened through its room's lost home failed.
fn tell_transports_failed<'a>(handle: &SocketHandle, transports: impl IntoIterator<Item = &'a str>) {
    let reason = "the server holding the room was lost";
    for t in transports {
        let _ = handle.emit("progress", vec![json!({"id": t, "status": "error", "data": reason})]);
    }
}

/// For a `login`/`relogin` on a fresh socket: the room to forward it to, when its home is
/// another node; `None` to handle it here (no cluster, this node is or becomes the home,
/// or the request names no room: then it fails here with the usual error).
pub(crate) async fn home_elsewhere(portal: &Portal, name: &str, args: &[Value]) -> Result<Option<String>, String> {
    let Some(homes) = portal.homes() else { return Ok(None) };
    // A draining portal takes no new participants (refused here, as on a single node) and
    // claims no room for them.
    if name == "login" && portal.is_draining() {
        return Ok(None);
    }
    let Some(room) = login_room(portal, name, args) else { return Ok(None) };
    let deadline = tokio::time::Instant::now() + HOME_WAIT;
    loop {
        match homes.claim(&room).await {
            Ok(Home::Here) => return Ok(None),
            Ok(Home::There(_)) => return Ok(Some(room)),
            Err(HomeError::Unreachable { .. }) if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(500)).await,
            Err(e) => {
                portal.inner.logins.count(if name == "login" { LoginKind::Login } else { LoginKind::Relogin }, Some(Refusal::Unavailable));
                return Err(format!("Login unavailable, retry later: {e}"));
            }
        }
    }
}

/// The room a `login` (its token's) or `relogin` (its ticket's seat) names, if valid.
fn login_room(portal: &Portal, name: &str, args: &[Value]) -> Option<String> {
    let room = match name {
        "login" => {
            let token = args.first().and_then(|a| a.get("token")).and_then(Value::as_str);
            token.and_then(|t| portal.inner.admission.tokens.verify(t, now_secs()).ok()).map(|c| c.room)
        }
        _ => relogin_ticket(args).and_then(|t| portal.inner.admission.tickets.verify(&t, now_ms()).ok()).map(|t| t.seat.room),
    };
    room.filter(|r| !r.is_empty())
}

/// After a `login`/`relogin` that failed: the room it named goes back if this node holds
/// it and nobody sits in it (checked under the room lock, as in `room_emptied`).
pub(crate) fn release_unused(portal: &Portal, name: &str, args: &[Value]) {
    let Some(homes) = portal.homes() else { return };
    let Some(room) = login_room(portal, name, args) else { return };
    let conf = portal.lock();
    if homes.is_home(&room)
        && !conf.rooms.contains_key(room.as_str())
        && !conf.mixing.contains_key(room.as_str())
        && !conf.seating.contains_key(room.as_str())
    {
        homes.release(&room);
    }
}

/// The ticket string of a `relogin` (OWT clients send it bare; `{ticket}` is accepted too).
pub(crate) fn relogin_ticket(args: &[Value]) -> Option<String> {
    match args.first() {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(m)) => m.get("ticket").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// Forwards one request of `handle` to the home of `room`. A fresh socket's login or
/// relogin waits for a home that died to be replaced, and is handled here when this node
/// becomes the home meanwhile; a logged-in socket whose home is gone is told its
/// transports failed and reconnects (`State::Lost`).
pub(crate) async fn forward(
    portal: &Portal,
    handle: &SocketHandle,
    state: &mut State,
    room: &str,
    name: &str,
    args: &[Value],
    replay: &mut Vec<(String, Value)>,
) -> Reply {
    let Some(homes) = portal.homes().cloned() else { return Err("Room unavailable".into()) };
    let session = match &*state {
        State::Away { session, .. } => session.clone(),
        _ => FrontSession::Fresh,
    };
    let fresh = session == FrontSession::Fresh;
    if fresh {
        // Before the request goes: notifications the home sends right after seating the
        // participant may arrive before its answer.
        let entry = Fronted {
            handle: handle.clone(),
            room: room.into(),
            home: String::new(),
            transports: HashSet::new(),
            delivered: 0,
            lost: false,
            held_back: Some(Vec::new()),
        };
        portal.fronted().insert(handle.id().to_string(), entry);
    }
    let client = ClientAddr { front: homes.node().to_string(), socket: handle.id().to_string(), run: homes.incarnation() };
    let request = FrontRequest { client: client.clone(), session, name: name.into(), args: args.to_vec() };
    let deadline = tokio::time::Instant::now() + HOME_WAIT;
    let answer = loop {
        // A logged-in socket's home is looked up, never claimed: a room nobody holds any
        // more lost its state with its home.
        let home = if fresh { homes.claim(room).await } else { homes.holder(room).await.map(|h| h.unwrap_or(Home::Here)) };
        let failed = match home {
            Ok(Home::Here) if fresh => {
                portal.fronted().remove(handle.id());
                *state = State::Fresh;
                let link = ClientLink::Socket(handle.clone());
                return crate::session::handle_request(portal, &link, state, name, args, replay).await;
            }
            Ok(Home::Here) => return lost(portal, handle, state),
            Ok(Home::There(_)) => match homes.forward(room, request.clone()).await {
                Ok(reply) if reply.moved => None,
                Ok(reply) => break Ok(reply),
                Err(e) => Some(e),
            },
            Err(e) => Some(e),
        };
        match failed {
            Some(HomeError::Unreachable { .. }) | None if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Some(e) => break Err(e),
            None => break Err(HomeError::Unavailable("the room keeps moving between servers".into())),
        }
    };
    let reply: FrontReply = match answer {
        Ok(reply) => reply,
        Err(e) => {
            if fresh {
                portal.fronted().remove(handle.id());
                *state = State::Ended;
                // The home may have seated the participant before the answer was lost.
                homes.closed(room, client, 0, "its login's answer was lost".into());
            }
            warn!(room = ?room, request = ?name, error = %e, "a request could not reach the room's home");
            return Err(format!("Room unavailable, retry later: {e}"));
        }
    };
    // Another run answered for the home this socket's participant sat in.
    let known = portal.fronted().get(handle.id()).map(|f| f.home.clone()).unwrap_or_default();
    if !fresh && !known.is_empty() && known != reply.home {
        return lost(portal, handle, state);
    }
    replay.extend(reply.replay);
    match reply.session {
        FrontSession::Joined { .. } => {
            if fresh {
                handle.authenticated();
            }
            let mut fronted = portal.fronted();
            if let Some(f) = fronted.get_mut(handle.id()) {
                f.home = reply.home.clone();
                if let Ok(Some(data)) = &reply.reply
                    && let Some(t) = data.get("transportId").and_then(Value::as_str)
                    && matches!(name, "publish" | "subscribe")
                {
                    f.transports.insert(t.to_string());
                }
            }
            *state = State::Away { room: room.into(), session: reply.session };
        }
        // The home no longer has this socket's participant (it timed out there, or was
        // seated again elsewhere): the client reconnects and finds out by relogin.
        FrontSession::Ended if !fresh && name != "logout" => {
            let _ = lost(portal, handle, state);
        }
        FrontSession::Fresh | FrontSession::Ended => {
            portal.fronted().remove(handle.id());
            *state = if reply.session == FrontSession::Fresh { State::Fresh } else { State::Ended };
        }
    }
    reply.reply
}

/// After a fronted socket's login/relogin was answered (and its replay sent): the
/// notifications held back meanwhile go out, in order.
pub(crate) fn release_held_back(portal: &Portal, handle: &SocketHandle) {
    let mut fronted = portal.fronted();
    let Some(f) = fronted.get_mut(handle.id()) else { return };
    for (seq, event, args) in f.held_back.take().unwrap_or_default() {
        deliver(f, seq, event, args);
    }
}

/// One numbered notification to a fronted socket, unless it was seen already; a gap
/// means one was lost on the way (the home's outbox overflowed): like a local socket's
/// overflow, the client reconnects and gets the rest replayed.
fn deliver(f: &mut Fronted, seq: u64, event: String, args: Vec<Value>) {
    if seq < f.delivered || f.lost {
        return;
    }
    if seq > f.delivered {
        warn!(socket = %f.handle.id(), expected = f.delivered, got = seq, "a notification from the room's home was lost; the client reconnects");
        f.lost = true;
        f.handle.drop_transport();
        return;
    }
    if f.handle.emit(&event, args).is_ok() {
        f.delivered += 1;
    }
}

/// The home of a logged-in socket is gone: its transports are told failed, and the socket
/// is dropped after this request's answer, so the client resumes at the new home.
fn lost(portal: &Portal, handle: &SocketHandle, state: &mut State) -> Reply {
    if let Some(f) = portal.fronted().get_mut(handle.id())
        && !f.lost
    {
        f.lost = true;
        tell_transports_failed(&f.handle, f.transports.iter().map(String::as_str));
    }
    *state = State::Lost;
    Err("The server holding the room was lost; reconnect".into())
}

/// A socket closed: if its room's home is another node, that home keeps the participant
/// for relogin, with the notifications that did not reach the socket.
pub(crate) fn closed(portal: &Portal, handle: &SocketHandle, reason: String) {
    let Some(f) = portal.fronted().remove(handle.id()) else { return };
    let Some(homes) = portal.homes() else { return };
    if f.home.is_empty() {
        return;
    }
    let client = ClientAddr { front: homes.node().to_string(), socket: handle.id().to_string(), run: homes.incarnation() };
    homes.closed(&f.room, client, f.delivered, reason);
}

/// A `relogin` this node (the room's home) can only serve by seating the participant
/// again: the ticket is valid, the participant is not here, and the home that issued the
/// ticket is gone (this node took the room over from it, or it is no longer in the
/// cluster). `None`: the usual relogin. A participant who left a home (logout, dropped,
/// reconnection timeout) spent its chance then (see [`spend_reseat`]).
pub(crate) fn reseat_ticket(portal: &Portal, args: &[Value]) -> Option<Ticket> {
    let homes = portal.homes()?;
    let ticket = portal.inner.admission.tickets.verify(&relogin_ticket(args)?, now_ms()).ok()?;
    let seat = &ticket.seat;
    if seat.room.is_empty() || seat.home == homes.incarnation() || !homes.is_home(&seat.room) {
        return None;
    }
    if homes.predecessor(&seat.room).as_deref() != Some(seat.home.as_str()) && homes.is_live(&seat.home) {
        return None;
    }
    let known = portal.lock().where_is.contains_key(ticket.participant_id.as_str());
    (!known).then_some(ticket)
}

/// The ledger entry that lets a participant of home `home` be seated again once.
fn reseat_claims(home: &str, participant: &str, room: &str, exp: u64) -> TokenClaims {
    let id = tessera_core::crypto::hmac_sha256_hex(b"tessera-reseat", format!("{home}\n{participant}").as_bytes());
    TokenClaims {
        jti: format!("seat-{}", id.get(..40).unwrap_or(&id)),
        room: room.into(),
        user: String::new(),
        role: String::new(),
        iat: now_secs(),
        exp,
        host: String::new(),
        secure: false,
    }
}

/// A participant left this home: its tickets must not seat it again elsewhere if this
/// node dies later, so its one chance is spent now (in the background; the ledger is
/// NATS's).
pub(crate) fn spend_reseat(portal: &Portal, room: &str, participant: &str) {
    let Some(homes) = portal.homes() else { return };
    let lifetime = portal.inner.settings.ticket_lifetime.as_secs();
    let claims = reseat_claims(&homes.incarnation(), participant, room, now_secs() + lifetime + 1);
    let ledger = portal.inner.admission.ledger.clone();
    tokio::spawn(async move {
        if let Err(e) = ledger.consume(&claims, now_secs()).await
            && !matches!(e, TokenError::Replayed)
        {
            debug!(error = %e, "a leaving participant's tickets could not be voided in the ledger");
        }
    });
}

/// Seats a participant again from its ticket after its room's home was lost: same id,
/// user, role and the permission it had. Each participant of a lost home is seated again
/// once, cluster-wide (the ledger of used tokens remembers it).
pub(crate) async fn reseat(portal: &Portal, link: &ClientLink, state: &mut State, ticket: Ticket) -> Reply {
    let result = try_reseat(portal, link, state, ticket).await;
    portal.inner.logins.count(LoginKind::Relogin, result.as_ref().err().map(|r| r.0));
    result.map_err(|Refused(_, message)| message)
}

async fn try_reseat(portal: &Portal, link: &ClientLink, state: &mut State, ticket: Ticket) -> Result<Option<Value>, Refused> {
    *state = State::Ended;
    let seat = ticket.seat;
    let room = portal.inner.store.get(&seat.room).ok_or_else(|| Refused(Refusal::RoomNotFound, format!("Room not found: {}", seat.room)))?;
    let role = room.role(&seat.role).ok_or(Refused::new(Refusal::Role, "Invalid role"))?;
    let _seating = crate::session::Seating::new(portal, &room.id);
    let participant = ticket.participant_id;
    let claims = reseat_claims(&seat.home, &participant, &room.id, ticket.not_after / 1000 + 1);
    let spent = portal.inner.admission.ledger.consume(&claims, now_secs()).await.map_err(|e| match e {
        TokenError::Replayed => {
            let used = tessera_core::ticket::TicketError::Used;
            Refused(Refusal::from(&used), used.to_string())
        }
        other => Refused(Refusal::from(&other), other.to_string()),
    })?;
    // What the lost home had placed for this participant on the webrtc nodes that live on
    // ends first, so a session it opens again is not caught by that cleanup.
    let nodes = portal.inner.router.media_nodes();
    let left = tessera_core::command::ParticipantLeft { room: room.id.as_str().into(), participant: participant.as_str().into() };
    let calls = futures_util::future::join_all(nodes.iter().map(|n| n.call(left.clone())));
    if tokio::time::timeout(Duration::from_secs(3), calls).await.is_err() {
        debug!(room = %room.id, participant = %participant, "not every webrtc node confirmed the lost home's sessions ended");
    }
    let permission = seat.permission.unwrap_or_else(|| permission_of(role));
    let info = ParticipantInfo { id: participant.clone(), role: seat.role.clone(), user: seat.user.clone(), permission };
    if let Err(refused) = crate::session::seat(portal, &room, info, link) {
        // Given back: the client may retry (the room was full, or moving).
        portal.inner.admission.ledger.release(&claims, spent).await;
        return Err(refused);
    }
    info!(room = %room.id, participant = %participant, lost_home = %seat.home, "participant seated again by relogin (its room's home was lost)");
    portal.ensure_mixing(&room).await;
    let next = portal.ticket_for_seated(&room.id, &participant, "relogin failed after seating").map_err(|m| Refused(Refusal::Internal, m))?;
    link.authenticated();
    *state = State::Joined { room: room.id.clone(), participant, generation: 0 };
    Ok(Some(Value::String(next)))
}

/// Where a management request about `room` is answered: `None` here (this node holds
/// the room, or nobody does and this node's empty view is the answer).
pub(crate) async fn control_elsewhere(portal: &Portal, room: &str, request: ControlRequest) -> Option<Result<ControlAnswer, ControlError>> {
    let homes = portal.homes()?;
    match homes.holder(room).await {
        Ok(Some(Home::There(_))) => Some(homes.control(room, request).await.map_err(Into::into)),
        Ok(_) => None,
        Err(e) => Some(Err(ControlError::Unavailable(e.to_string()))),
    }
}

/// An answer of the wrong kind from a home (a bug or a version mismatch).
pub(crate) fn unexpected(answer: ControlAnswer) -> ControlError {
    ControlError::Failed(format!("unexpected answer from the room's home: {answer:?}"))
}

#[async_trait::async_trait]
impl HomeService for Portal {
    async fn request(&self, room: &str, request: FrontRequest) -> FrontReply {
        let Some(homes) = self.homes().cloned() else {
            return FrontReply { reply: Err("Room unavailable".into()), session: request.session, replay: vec![], moved: true, home: String::new() };
        };
        let home = homes.incarnation();
        if !homes.is_home(room) {
            return FrontReply { reply: Err("Room moved".into()), session: request.session, replay: vec![], moved: true, home };
        }
        // A logged-in socket's session must be this run's participant on that very socket
        // (not one seated again since on another, nor one of a home this node replaced).
        if let FrontSession::Joined { room: r, participant, generation } = &request.session {
            let conf = self.lock();
            let p = conf.room(r).and_then(|r| r.participant(participant));
            let current = p.is_some_and(|p| {
                p.generation == *generation && matches!(&p.link, Link::Connected(ClientLink::Remote { client, .. }) if *client == request.client)
            });
            if !current {
                return FrontReply { reply: Err("Client does NOT exist".into()), session: FrontSession::Ended, replay: vec![], moved: false, home };
            }
        }
        let fresh = request.session == FrontSession::Fresh;
        let link = ClientLink::Remote { client: request.client, homes: homes.clone(), sent: Default::default() };
        let mut state = State::from_front(request.session);
        let mut replay = Vec::new();
        let reply = crate::session::handle_request(self, &link, &mut state, &request.name, &request.args, &mut replay).await;
        if let (State::Joined { room, participant, .. }, "login" | "relogin") = (&state, request.name.as_str()) {
            // The front holds notifications back until it has answered the login.
            self.login_answered(room, participant);
        }
        // Released while the login ran (it emptied meanwhile): the front finds the home again.
        let moved = fresh && !matches!(state, State::Joined { .. }) && !homes.is_home(room);
        // A logout, drop or failed login ends the socket at the front too.
        FrontReply { reply, session: state.to_front(), replay, moved, home }
    }

    fn closed(&self, room: &str, client: ClientAddr, delivered: u64, reason: String) {
        // The participant on that socket, if it still is: what it did not get waits for
        // its relogin, before anything sent from now on.
        let found = {
            let mut conf = self.lock();
            let found = conf.rooms.get_mut(room).and_then(|r| {
                let p =
                    r.participants.iter_mut().find(|p| matches!(&p.link, Link::Connected(ClientLink::Remote { client: c, .. }) if *c == client))?;
                let pending = match &p.link {
                    Link::Connected(ClientLink::Remote { sent, .. }) => sent.lock().unwrap_or_else(|e| e.into_inner()).undelivered(delivered),
                    _ => Default::default(),
                };
                p.link = Link::Waiting(pending);
                Some((p.info.id.clone(), p.generation))
            });
            if found.is_none() {
                // Its login may still be on its way here (the front gave up waiting): it
                // must not seat a participant whose socket is gone. Under the room lock,
                // which `seat` holds while it checks.
                let mut early = self.inner.closed_early.lock().unwrap_or_else(|p| p.into_inner());
                early.retain(|_, at| at.elapsed() < CLOSED_EARLY_KEPT);
                early.insert(client.clone(), std::time::Instant::now());
            }
            found
        };
        let Some((participant, generation)) = found else {
            debug!(front = %client.front, socket = %client.socket, "a closed socket of another front held no participant here");
            return;
        };
        crate::session::on_closed(self, &State::Joined { room: room.to_string(), participant, generation }, &reason);
    }

    async fn control(&self, room: &str, request: ControlRequest) -> Result<ControlAnswer, ControlError> {
        Ok(match request {
            ControlRequest::Participants => ControlAnswer::Participants(self.lock().participant_infos(room)),
            ControlRequest::DropParticipant { participant } => {
                self.local_drop_participant(room, &participant)?;
                ControlAnswer::Done
            }
            ControlRequest::Streams => ControlAnswer::Json(Value::Array(self.local_streams(room))),
            ControlRequest::DeleteStream { stream } => {
                self.local_delete_stream(room, &stream).await?;
                ControlAnswer::Done
            }
            ControlRequest::PatchStream { stream, ops } => ControlAnswer::Json(self.patch(room, &stream, &ops).await?),
            ControlRequest::PatchParticipant { participant, ops } => {
                ControlAnswer::Participant(Portal::patch_participant(self, room, &participant, &ops).await?)
            }
            ControlRequest::RoomDeleted => {
                self.drop_room(room, "room deleted");
                ControlAnswer::Done
            }
            ControlRequest::RoomUpdated { room } => {
                self.views_changed(&room).await;
                ControlAnswer::Done
            }
        })
    }

    fn to_client(&self, socket: &str, message: ToClient) {
        let mut fronted = self.fronted();
        let Some(f) = fronted.get_mut(socket) else {
            // Its home hears of the close and queues what the socket did not get.
            debug!(socket, "a notification for a socket that is gone was dropped");
            return;
        };
        match message {
            ToClient::Emit { seq, event, args } => match &mut f.held_back {
                Some(held) => held.push((seq, event, args)),
                None => deliver(f, seq, event, args),
            },
            ToClient::Disconnect => f.handle.disconnect(),
        }
    }

    fn room_lost(&self, room: &str) {
        self.lose_room(room);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conference::SentLog;

    fn fronted() -> (Fronted, crate::socketio::OutRx) {
        let (handle, rx) = SocketHandle::for_test("s1", 16);
        (Fronted { handle, room: "r".into(), home: "n1/a".into(), transports: HashSet::new(), delivered: 0, lost: false, held_back: None }, rx)
    }

    /// Numbered notifications reach the socket once and in order; a gap (one lost on the
    /// way) makes the socket reconnect instead of going on without it.
    #[test]
    fn numbered_notifications_once_in_order_and_a_gap_drops_the_socket() {
        let (mut f, mut rx) = fronted();
        deliver(&mut f, 0, "text".into(), vec![json!({"message": "a"})]);
        deliver(&mut f, 0, "text".into(), vec![json!({"message": "a"})]);
        deliver(&mut f, 1, "text".into(), vec![json!({"message": "b"})]);
        assert_eq!(f.delivered, 2);
        let sent: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert!(sent[0].contains("\"a\"") && sent[1].contains("\"b\""), "{sent:?}");
        deliver(&mut f, 3, "text".into(), vec![json!({"message": "d"})]);
        assert!(f.lost && f.handle.is_closed(), "a gap drops the socket");
        assert_eq!(f.delivered, 2, "what the home must replay starts at 2");
        assert!(rx.try_recv().is_err());
    }

    /// What a home sent but the front did not deliver is what the relogin replays.
    #[test]
    fn undelivered_notifications_are_the_ones_after_the_count() {
        let mut log = SentLog::default();
        for (i, m) in ["a", "b", "c"].iter().enumerate() {
            log.record(i as u64, "text", &[json!(m)]);
        }
        let rest: Vec<Value> = log.undelivered(1).into_iter().map(|(_, d)| d).collect();
        assert_eq!(rest, vec![json!("b"), json!("c")]);
        assert!(log.undelivered(3).is_empty());
    }
}
