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

use crate::conference::{ClientLink, permission_of};
use crate::metrics::{LoginKind, Refusal, Refused};
use crate::session::{Reply, State};
use crate::socketio::SocketHandle;
use crate::{Portal, now_ms, now_secs};

/// How long a front waits for a room's home to be found or taken over (a dead holder's
/// claim is taken over once stale, see `tessera_cluster::homes`).
const HOME_WAIT: Duration = Duration::from_secs(14);
/// How often a front checks that the homes of its sockets' rooms still answer.
const WATCH: Duration = Duration::from_secs(2);

/// A socket of this node whose room's home is another node.
pub(crate) struct Fronted {
    handle: SocketHandle,
    room: String,
    /// The home's incarnation ("" until the login is answered).
    home: String,
    /// Transports the client opened through the home, told as failed if the home is lost.
    transports: HashSet<String>,
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
    async fn watch_homes(&self) {
        let Some(homes) = self.homes().cloned() else { return };
        let mut tick = tokio::time::interval(WATCH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let rooms: HashSet<(String, String)> =
                self.fronted().values().filter(|f| !f.home.is_empty()).map(|f| (f.room.clone(), f.home.clone())).collect();
            for (room, home) in rooms {
                match homes.answering(&room).await {
                    Ok(Some(now)) if now == home => {}
                    // NATS away: the home may be fine; media flows on meanwhile.
                    Err(e) => debug!(room = ?room, error = %e, "could not check the room's home"),
                    Ok(now) => self.home_lost(&room, &home, now.as_deref()),
                }
            }
        }
    }

    fn home_lost(&self, room: &str, home: &str, now: Option<&str>) {
        let lost: Vec<Fronted> = {
            let mut fronted = self.fronted();
            let ids: Vec<String> = fronted.iter().filter(|(_, f)| f.room == room && f.home == home).map(|(id, _)| id.clone()).collect();
            ids.iter().filter_map(|id| fronted.remove(id)).collect()
        };
        warn!(room = ?room, home, now = ?now, sockets = lost.len(), "the room's home is gone; its participants here reconnect");
        let reason = "the server holding the room was lost";
        for f in lost {
            for t in &f.transports {
                let _ = f.handle.emit("progress", vec![json!({"id": t, "status": "error", "data": reason})]);
            }
            f.handle.drop_transport();
        }
    }
}

/// For a `login`/`relogin` on a fresh socket: the room to forward it to, when its home is
/// another node; `None` to handle it here (no cluster, this node is or becomes the home,
/// or the request names no room: then it fails here with the usual error).
pub(crate) async fn home_elsewhere(portal: &Portal, name: &str, args: &[Value]) -> Result<Option<String>, String> {
    let Some(homes) = portal.homes() else { return Ok(None) };
    let room = match name {
        "login" => {
            let token = args.first().and_then(|a| a.get("token")).and_then(Value::as_str);
            token.and_then(|t| portal.inner.admission.tokens.verify(t, now_secs()).ok()).map(|c| c.room)
        }
        _ => relogin_ticket(args).and_then(|t| portal.inner.admission.tickets.verify(&t, now_ms()).ok()).map(|t| t.seat.room),
    };
    let Some(room) = room.filter(|r| !r.is_empty()) else { return Ok(None) };
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

/// The ticket string of a `relogin` (OWT clients send it bare; `{ticket}` is accepted too).
pub(crate) fn relogin_ticket(args: &[Value]) -> Option<String> {
    match args.first() {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(m)) => m.get("ticket").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// Forwards one request of `handle` to the home of `room`, waiting for a home that died
/// to be replaced; when this node becomes the home meanwhile, a fresh socket's request is
/// handled here.
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
        let entry = Fronted { handle: handle.clone(), room: room.into(), home: String::new(), transports: HashSet::new() };
        portal.fronted().insert(handle.id().to_string(), entry);
    }
    let request = FrontRequest {
        client: ClientAddr { front: homes.node().to_string(), socket: handle.id().to_string() },
        session,
        name: name.into(),
        args: args.to_vec(),
    };
    let deadline = tokio::time::Instant::now() + HOME_WAIT;
    let answer = loop {
        let failed = match homes.claim(room).await {
            Ok(Home::Here) if fresh => {
                portal.fronted().remove(handle.id());
                *state = State::Fresh;
                let link = ClientLink::Socket(handle.clone());
                return crate::session::handle_request(portal, &link, state, name, args, replay).await;
            }
            Ok(Home::Here) => {
                // The home this socket's participant sat in is gone: resume by relogin.
                portal.fronted().remove(handle.id());
                handle.drop_transport();
                return Err("The server holding the room was lost; reconnect".into());
            }
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
            }
            warn!(room = ?room, request = ?name, error = %e, "a request could not reach the room's home");
            return Err(format!("Room unavailable, retry later: {e}"));
        }
    };
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
        FrontSession::Fresh | FrontSession::Ended => {
            portal.fronted().remove(handle.id());
            *state = if reply.session == FrontSession::Fresh { State::Fresh } else { State::Ended };
        }
    }
    reply.reply
}

/// A fronted socket closed: its home keeps the participant for relogin.
pub(crate) fn closed(portal: &Portal, handle: &SocketHandle, room: &str, state: &State, reason: String) {
    portal.fronted().remove(handle.id());
    let (Some(homes), State::Away { session, .. }) = (portal.homes(), state) else { return };
    let client = ClientAddr { front: homes.node().to_string(), socket: handle.id().to_string() };
    homes.closed(room, client, session.clone(), reason);
}

/// A `relogin` this node (the room's home) can only serve by seating the participant
/// again: the ticket is valid, the participant is not here, and the home that issued the
/// ticket is gone (this node took the room over from it, or it is no longer in the
/// cluster); a participant who left a live home is not brought back. `None`: the usual
/// relogin.
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

/// Seats a participant again from its ticket after its room's home was lost. Each
/// participant of a lost home is seated again once, cluster-wide (the ticket ledger
/// remembers it), so a copied ticket cannot bring it back after it left.
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
    let participant = ticket.participant_id;
    // One use per participant of the lost home, in the cluster's ledger of used tokens.
    let id = tessera_core::crypto::hmac_sha256_hex(b"tessera-reseat", format!("{}\n{}", seat.home, participant).as_bytes());
    let claims = TokenClaims {
        jti: format!("seat-{}", id.get(..40).unwrap_or(&id)),
        room: room.id.clone(),
        user: seat.user.clone(),
        role: seat.role.clone(),
        iat: now_secs(),
        exp: ticket.not_after / 1000 + 1,
        host: String::new(),
        secure: false,
    };
    portal.inner.admission.ledger.consume(&claims, now_secs()).await.map_err(|e| match e {
        TokenError::Replayed => {
            let used = tessera_core::ticket::TicketError::Used;
            Refused(Refusal::from(&used), used.to_string())
        }
        other => Refused(Refusal::from(&other), other.to_string()),
    })?;
    let info = ParticipantInfo { id: participant.clone(), role: seat.role.clone(), user: seat.user.clone(), permission: permission_of(role) };
    crate::session::seat(portal, &room, info, link)?;
    info!(room = %room.id, participant = %participant, lost_home = %seat.home, "participant seated again by relogin (its room's home was lost)");
    portal.ensure_mixing(&room).await;
    let next = portal.ticket_for(&room.id, &participant).map_err(|m| Refused(Refusal::Internal, m))?;
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
        let link = ClientLink::Remote { client: request.client, homes };
        let mut state = State::from_front(request.session);
        let mut replay = Vec::new();
        let reply = crate::session::handle_request(self, &link, &mut state, &request.name, &request.args, &mut replay).await;
        // A logout, drop or failed login ends the socket at the front too.
        FrontReply { reply, session: state.to_front(), replay, moved: false, home }
    }

    fn closed(&self, _room: &str, client: ClientAddr, session: FrontSession, reason: String) {
        debug!(front = %client.front, socket = %client.socket, "a socket of another front closed");
        crate::session::on_closed(self, &State::from_front(session), &reason);
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
        })
    }

    fn to_client(&self, socket: &str, message: ToClient) {
        let Some(handle) = self.fronted().get(socket).map(|f| f.handle.clone()) else {
            debug!(socket, "a notification for a socket that is gone was dropped");
            return;
        };
        match message {
            ToClient::Emit { event, args } => {
                let _ = handle.emit(&event, args);
            }
            ToClient::Disconnect => handle.disconnect(),
        }
    }
}
