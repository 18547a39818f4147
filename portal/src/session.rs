//! One task per socket: the Client-Portal state machine (not logged in → in a room →
//! ended), request dispatch with acks, flood control, and the reconnection grace period
//! when the socket drops.

use std::time::Instant;

use serde_json::{Value, json};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::conference::{Link, Participant, permission_of};
use crate::requests::{self, Login, Text};
use crate::socketio::{Incoming, Socket, SocketHandle};
use crate::{Portal, now_ms, now_secs};

/// Where a socket stands.
enum State {
    /// Connected, not logged in yet: only `login`/`relogin` are allowed.
    Fresh,
    /// Logged in as `participant` of `room`, owning the participant while `generation` matches.
    Joined { room: String, participant: String, generation: u64 },
    /// Logged out, dropped or failed login: every request is refused.
    Ended,
}

/// A token bucket: `rate` requests per second with a burst of `2 * rate`.
struct Flood {
    tokens: f64,
    rate: f64,
    last: Instant,
}

impl Flood {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Flood { tokens: rate * 2.0, rate, last: Instant::now() }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.rate * 2.0);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Answer to a request: `('ok', data?)` or `('error', reason)`.
type Reply = Result<Option<Value>, String>;

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
    let mut state = State::Fresh;
    let mut flood = Flood::new(portal.inner.settings.max_requests_per_sec);
    // Set once a flood closed the socket: events still queued are dropped unanswered.
    let mut flooded = false;
    let login_deadline = tokio::time::sleep(portal.inner.settings.login_timeout);
    tokio::pin!(login_deadline);
    debug!("socket connected");
    loop {
        let event = tokio::select! {
            ev = socket.events.recv() => ev,
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
                on_closed(&portal, &state, &reason);
                return;
            }
            Some(Incoming::Invalid { reason }) => {
                debug!(%reason, "invalid packet from client");
            }
            Some(Incoming::Event { .. }) if flooded => {}
            Some(Incoming::Event { name, args, ack: ack_id }) => {
                if !flood.allow() {
                    flooded = true;
                    warn!(request = %name, "request flood; disconnecting this client");
                    ack(&handle, ack_id, Err("Too many requests".into()));
                    handle.disconnect();
                    continue;
                }
                let mut replay = Vec::new();
                let reply = match &state {
                    State::Fresh if name == "login" => login(&portal, &handle, &mut state, &args).await,
                    State::Joined { room, participant, .. } if MEDIA.contains(&name.as_str()) => {
                        let (room, participant) = (room.clone(), participant.clone());
                        portal.media_request(&room, &participant, &name, &args).await
                    }
                    _ => dispatch(&portal, &handle, &mut state, &name, &args, &mut replay),
                };
                let close_after = matches!(state, State::Ended) && matches!(name.as_str(), "login" | "relogin");
                ack(&handle, ack_id, reply);
                // Notifications queued while the socket was gone, after the relogin ack.
                for (event, data) in replay {
                    if handle.emit(&event, vec![data]).is_err() {
                        break;
                    }
                }
                if close_after {
                    // OWT closes the socket after a failed login/relogin.
                    handle.disconnect();
                }
            }
        }
    }
}

fn dispatch(
    portal: &Portal,
    handle: &SocketHandle,
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
const MEDIA: [&str; 7] = ["publish", "unpublish", "stream-control", "subscribe", "unsubscribe", "subscription-control", "soac"];

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

async fn login(portal: &Portal, handle: &SocketHandle, state: &mut State, args: &[Value]) -> Reply {
    // A failed login ends the socket (OWT behaviour); success replaces this below.
    *state = State::Ended;
    let req: Login = requests::parse("login", args)?;
    req.check_client()?;
    let inner = &portal.inner;
    let claims = inner.tokens.verify(&req.token, now_secs()).map_err(|e| e.to_string())?;
    inner.ledger.consume(&claims, now_secs()).map_err(|e| e.to_string())?;
    let room = inner.store.get(&claims.room).ok_or_else(|| format!("Room not found: {}", claims.room))?;
    let role = room.role(&claims.role).ok_or("Invalid role")?;
    let permission = permission_of(role);
    let participant = handle.id().to_string();
    let info = tessera_core::ParticipantInfo {
        id: participant.clone(),
        role: claims.role.clone(),
        user: claims.user.clone(),
        permission,
    };
    {
        let mut conf = portal.lock();
        let r = conf.rooms.entry(room.id.clone()).or_default();
        if room.participant_limit >= 0 && r.participants.len() as i64 >= room.participant_limit {
            return Err("Room is full".into());
        }
        r.participants.push(Participant::new(info, handle.clone()));
        conf.where_is.insert(participant.clone(), room.id.clone());
        if room.notifying.participant_activities {
            let joined = json!({"action": "join", "data": {"id": participant, "user": claims.user, "role": claims.role}});
            conf.broadcast(&room.id, Some(&participant), "participant", &joined);
        }
    }
    info!(room = %room.id, participant = %participant, user = %claims.user, role = %claims.role, "participant joined");
    portal.ensure_mixing(&room).await;
    let ticket = portal.ticket_for(&participant)?;
    *state = State::Joined { room: room.id.clone(), participant: participant.clone(), generation: 0 };
    let mut result = json!({
        "id": participant,
        "user": claims.user,
        "role": claims.role,
        "permission": permission,
        "room": portal.room_snapshot(&room),
        "reconnectionTicket": ticket,
    });
    if !inner.settings.ice_servers.is_empty() {
        // Tessera extension: clients that read it configure their RTCPeerConnection with it.
        result["iceServers"] = json!(inner.settings.ice_servers);
    }
    Ok(Some(result))
}

fn relogin(
    portal: &Portal,
    handle: &SocketHandle,
    state: &mut State,
    args: &[Value],
    replay: &mut Vec<(String, Value)>,
) -> Reply {
    *state = State::Ended;
    // OWT clients send the ticket string itself; accept `{ticket}` too for clients that follow the doc.
    let ticket = match args.first() {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(m)) => m.get("ticket").and_then(Value::as_str).map(str::to_string).ok_or("relogin: missing ticket")?,
        _ => return Err("relogin: missing reconnection ticket".into()),
    };
    let ticket = portal.inner.tickets.verify(&ticket, now_ms()).map_err(|e| e.to_string())?;
    let participant = ticket.participant_id;
    let (room, generation, pending, old) = {
        let mut conf = portal.lock();
        let room = conf.where_is.get(&participant).cloned().ok_or("Client does NOT exist")?;
        let p = conf
            .rooms
            .get_mut(&room)
            .and_then(|r| r.participant_mut(&participant))
            .ok_or("Client does NOT exist")?;
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
    let new_ticket = portal.ticket_for(&participant)?;
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
        "refreshReconnectionTicket" => Ok(Some(Value::String(portal.ticket_for(participant)?))),
        "text" => {
            let (to, message) = requests::parse::<Text>("text", args)?.checked()?;
            let mut conf = portal.lock();
            if to == "all" {
                let data = json!({"from": participant, "to": "all", "message": message});
                conf.broadcast(room, Some(participant), "text", &data);
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
fn on_closed(portal: &Portal, state: &State, reason: &str) {
    let State::Joined { room, participant, generation } = state else {
        debug!(%reason, "socket closed");
        return;
    };
    {
        let mut conf = portal.lock();
        let Some(p) = conf.rooms.get_mut(room).and_then(|r| r.participant_mut(participant)) else { return };
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
    fn flood_allows_burst_then_refuses() {
        let mut f = Flood::new(5);
        let allowed = (0..20).filter(|_| f.allow()).count();
        assert_eq!(allowed, 10);
        f.last -= Duration::from_secs(1);
        assert!(f.allow());
    }
}
