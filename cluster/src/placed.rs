//! What rooms' homes placed on this webrtc node, so that what a dead home placed ends here
//! too: its participants who never come back would otherwise keep their transports (and
//! upload to nobody) for as long as their clients keep the peer connections up.
//!
//! Every command that opens a session names its room and participant, and comes from the
//! room's home (header `Tessera-From`, or this node's own portal). Once a second the node
//! asks, for each room that another node placed participants in, the room's subject who
//! holds the room now: when another node does (the room was taken over), or
//! nobody has for [`ORPHANED_AFTER`], the participants the old home placed here leave, as
//! when a home says they left (`ParticipantLeft`). A participant the new home placed again
//! is its, and is left alone. A home restarted under the same id is taken as the same home.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_nats::Client;
use tessera_core::command::{AgentCommand, MediaNode, ParticipantLeft};
use tessera_core::typed_ids::{ParticipantId, RoomId};
use tracing::{debug, info};

use crate::ClusterNode;

/// How often the rooms' holders are asked.
const CHECK: Duration = Duration::from_secs(1);
/// A room nobody holds for this long lost its home (as long as a claim may go unrefreshed
/// before another node may take the room over: a home cut off from NATS for less keeps its
/// participants' media).
const ORPHANED_AFTER: Duration = Duration::from_secs(6);
/// Nothing is judged while this node's NATS link is down or came back less than this ago.
const RECONNECT_GRACE: Duration = Duration::from_secs(6);

/// Who placed each participant's sessions here, by room.
pub(crate) struct Placed {
    /// This node (whose own portal needs no watching: its rooms end with it).
    me: String,
    rooms: Mutex<HashMap<RoomId, PlacedRoom>>,
}

#[derive(Default)]
struct PlacedRoom {
    /// Each participant, and the node that last placed a session for it.
    by: HashMap<ParticipantId, String>,
    /// Since when nobody has held the room.
    unheld_since: Option<Instant>,
}

impl Placed {
    pub(crate) fn new(me: &str) -> Placed {
        Placed { me: me.to_string(), rooms: Mutex::default() }
    }

    /// Notes a command from node `from` (a participant leaving is forgotten).
    pub(crate) fn note(&self, command: &AgentCommand, from: &str) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        match command {
            AgentCommand::Publish(c) => {
                rooms.entry(c.at.room.clone()).or_default().by.insert(c.at.participant.clone(), from.to_string());
            }
            AgentCommand::Subscribe(c) => {
                rooms.entry(c.at.room.clone()).or_default().by.insert(c.at.participant.clone(), from.to_string());
            }
            AgentCommand::ParticipantLeft(c) => {
                if let Some(r) = rooms.get_mut(&c.room) {
                    r.by.remove(&c.participant);
                    if r.by.is_empty() {
                        rooms.remove(&c.room);
                    }
                }
            }
            _ => {}
        }
    }

    /// The rooms where another node placed participants.
    fn rooms(&self) -> Vec<RoomId> {
        let rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        rooms.iter().filter(|(_, r)| r.by.values().any(|by| *by != self.me)).map(|(id, _)| id.clone()).collect()
    }

    /// The participants of `room` whose home is gone, given who holds it now (`None`:
    /// nobody), forgotten here.
    fn orphans(&self, room: &RoomId, holder: Option<&str>, now: Instant) -> Vec<(ParticipantId, String)> {
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        let Some(r) = rooms.get_mut(room) else { return Vec::new() };
        let lost: Vec<ParticipantId> = match holder {
            Some(holder) => {
                r.unheld_since = None;
                r.by.iter().filter(|(_, by)| by.as_str() != holder).map(|(p, _)| p.clone()).collect()
            }
            None => {
                let since = *r.unheld_since.get_or_insert(now);
                if now.saturating_duration_since(since) < ORPHANED_AFTER {
                    return Vec::new();
                }
                r.by.keys().cloned().collect()
            }
        };
        let out: Vec<(ParticipantId, String)> = lost.into_iter().filter_map(|p| r.by.remove_entry(&p)).collect();
        if r.by.is_empty() {
            rooms.remove(room);
        }
        out
    }

    fn forgive(&self) {
        for r in self.rooms.lock().unwrap_or_else(|p| p.into_inner()).values_mut() {
            r.unheld_since = None;
        }
    }
}

/// Ends, on `media`, what homes that are gone had placed here (see the module doc).
pub(crate) fn sweep(placed: Arc<Placed>, node: Weak<ClusterNode>, client: Client, media: Arc<dyn MediaNode>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(node) = node.upgrade() else { return };
            if node.reconnected_within(RECONNECT_GRACE) {
                placed.forgive();
                continue;
            }
            for room in placed.rooms() {
                let Some(holder) = crate::homes::holder(&client, room.as_str()).await else { continue };
                // Asked again after the answer: our own link may have dropped meanwhile.
                if node.reconnected_within(RECONNECT_GRACE) {
                    break;
                }
                for (participant, home) in placed.orphans(&room, holder.as_deref(), Instant::now()) {
                    info!(room = %room, participant = %participant, home = %home, now = ?holder, "the home that placed a participant here is gone; its sessions end");
                    let left = AgentCommand::ParticipantLeft(ParticipantLeft { room: room.clone(), participant });
                    if let Err(e) = media.handle(left).await {
                        debug!(error = %e, "ending a lost home's participant failed");
                    }
                }
            }
        }
    });
}

/// This node's SFU as its own portal calls it: what it is asked is noted as placed by this
/// node.
pub(crate) struct Noted {
    pub(crate) inner: Arc<dyn MediaNode>,
    pub(crate) placed: Arc<Placed>,
}

#[async_trait::async_trait]
impl MediaNode for Noted {
    async fn handle(&self, command: AgentCommand) -> Result<tessera_core::command::AgentReply, tessera_core::agent::AgentError> {
        self.placed.note(&command, &self.placed.me);
        self.inner.handle(command).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_core::agent::{PublishSpec, SessionRef};

    fn publish(room: &str, participant: &str) -> AgentCommand {
        let at = SessionRef { room: room.into(), participant: participant.into(), transport: "t".into(), session: participant.into() };
        AgentCommand::Publish(PublishSpec { at, tracks: Vec::new(), data: false })
    }

    #[test]
    fn a_taken_over_room_loses_the_old_homes_participants_only() {
        let placed = Placed::new("bravo");
        placed.note(&publish("r", "ann"), "alpha");
        placed.note(&publish("r", "bob"), "alpha");
        // Bob seated again at bravo, which placed him here anew.
        placed.note(&publish("r", "bob"), "bravo");
        let now = Instant::now();
        let lost = placed.orphans(&"r".into(), Some("bravo"), now);
        assert_eq!(lost, [("ann".into(), "alpha".to_string())]);
        assert!(placed.orphans(&"r".into(), Some("bravo"), now).is_empty(), "told once");
        assert!(placed.rooms().is_empty(), "what this node's own portal placed is not watched");
    }

    #[test]
    fn a_room_nobody_holds_is_given_up_after_a_while() {
        let placed = Placed::new("bravo");
        placed.note(&publish("r", "ann"), "alpha");
        let t0 = Instant::now();
        assert!(placed.orphans(&"r".into(), None, t0).is_empty());
        assert!(placed.orphans(&"r".into(), None, t0 + ORPHANED_AFTER / 2).is_empty());
        // Held again meanwhile: the wait starts over.
        assert!(placed.orphans(&"r".into(), Some("alpha"), t0 + ORPHANED_AFTER / 2).is_empty());
        assert!(placed.orphans(&"r".into(), None, t0 + ORPHANED_AFTER).is_empty());
        assert_eq!(placed.orphans(&"r".into(), None, t0 + ORPHANED_AFTER * 2).len(), 1);
        assert!(placed.rooms().is_empty());
        placed.note(&publish("q", "cat"), "alpha");
        placed.note(&AgentCommand::ParticipantLeft(ParticipantLeft { room: "q".into(), participant: "cat".into() }), "alpha");
        assert!(placed.rooms().is_empty(), "a participant who left is forgotten");
    }
}
