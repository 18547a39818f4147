//! What rooms' homes placed on this node, so that what a dead home placed ends here too:
//! its participants who never come back would otherwise keep their transports (and upload
//! to nobody) for as long as their clients keep the peer connections up, and its views
//! would go on decoding and encoding for nobody.
//!
//! Every command that opens a session names its room and participant, a view's start its
//! room and label; they come from the room's home (header `Tessera-From`, or this node's own
//! portal). Once a second the node asks, for each room that another node placed something
//! in, the room's subject who holds the room now: when another node does at two checks in a
//! row (the room was taken over), or nobody has for [`ORPHANED_AFTER`], what the old home placed here ends,
//! as when a home says so (`ParticipantLeft`, `StopView`). What the new home placed again
//! (a participant seated again, a view it asked for anew) is its own and is left alone. A
//! home restarted under the same id is another run (header `Tessera-Run`): what its
//! previous run placed is lost as well, unless the new run places it again.
//!
//! A home that was only cut off from NATS for longer than [`ORPHANED_AFTER`] comes back
//! believing in what was ended here meanwhile (the events saying so went to nobody). What
//! the sweep ends is therefore kept for [`ENDED_KEPT`], by placer, numbered, and told to
//! that placer when it asks (`tessera.node.<id>.ended`, see `router.rs`): everything after
//! the number it last read, so an answer lost on the way is given again.
//!
//! Commands run concurrently, so a placement is noted both before its command runs (for the
//! sweep, which must not end what a new home is placing) and again after (unless someone
//! else placed it since): a participant's leaving noted between the two would otherwise
//! hide a session the later command still made.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_nats::Client;
use serde::{Deserialize, Serialize};
use tessera_core::agent::AgentError;
use tessera_core::command::{AgentCommand, AgentReply, MediaNode, MixCommand, MixError, MixNode, MixReply, ParticipantLeft, StopView};
use tessera_core::typed_ids::{ParticipantId, RoomId, ViewLabel};
use tracing::{debug, info};

use crate::ClusterNode;
use crate::rpc::Caller;

/// How often the rooms' holders are asked.
const CHECK: Duration = Duration::from_secs(1);
/// A room nobody holds for this long lost its home: past [`crate::homes::HOME_TTL`] its
/// home's claim has expired, and the room is anybody's to take (a home cut off from NATS
/// for less keeps its participants' media).
const ORPHANED_AFTER: Duration = Duration::from_secs(12);
/// Nothing is judged while this node's NATS link is down or came back less than this ago.
const RECONNECT_GRACE: Duration = Duration::from_secs(6);
/// How long what the sweep ended waits for its placer to ask (a home cut off from NATS asks
/// once it is back; one that never comes back never asks).
const ENDED_KEPT: Duration = Duration::from_secs(600);

/// Something a home placed here (as JSON: `{"participant": id}` or `{"view": label}`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) enum Placement {
    /// A participant's sessions (on the SFU).
    Participant(ParticipantId),
    /// A view (on the mixer).
    View(ViewLabel),
}

/// What the sweep ended in a room, as told to its placer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Ended {
    /// The room.
    pub(crate) room: RoomId,
    /// What ended there.
    pub(crate) what: Placement,
}

/// A placer's question: what of its placements has the sweep ended since the last answer
/// it read? (As JSON: `{"instance": n, "after": m}`, both 0 at first; the placer is the
/// request's caller.) A home of an earlier version asks `{}`, and is answered as it
/// expects: a list, each ending told once ([`EndedAnswer::Once`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct WhatEnded {
    /// The `instance` of that answer: a node started again numbers afresh.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) instance: Option<u64>,
    /// Its `upTo`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) after: Option<u64>,
}

impl WhatEnded {
    /// The first question to a node.
    pub(crate) fn first() -> WhatEnded {
        WhatEnded { instance: Some(0), after: Some(0) }
    }
}

/// The answer: what ended after the question's number, in order, and the number to ask
/// after next time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EndedSince {
    /// This run of the node.
    pub(crate) instance: u64,
    /// The last number given.
    pub(crate) up_to: u64,
    /// What ended.
    pub(crate) ended: Vec<Ended>,
}

impl EndedSince {
    /// The question that follows this answer.
    pub(crate) fn next(&self) -> WhatEnded {
        WhatEnded { instance: Some(self.instance), after: Some(self.up_to) }
    }
}

/// What a node answers: numbered, or (to a home of an earlier version, and from a node of
/// one) a plain list, each ending told once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum EndedAnswer {
    /// See [`EndedSince`].
    Since(EndedSince),
    /// What ended, forgotten once told.
    Once(Vec<Ended>),
}

impl EndedAnswer {
    /// The answer to `question` as a numbered one (a plain list leaves the question's
    /// numbers as they were).
    pub(crate) fn numbered(self, question: WhatEnded) -> EndedSince {
        match self {
            EndedAnswer::Since(since) => since,
            EndedAnswer::Once(ended) => EndedSince { instance: question.instance.unwrap_or(0), up_to: question.after.unwrap_or(0), ended },
        }
    }
}

/// Who placed each participant's sessions and each view here, by room.
pub(crate) struct Placed {
    /// This node (whose own portal needs no watching: its rooms end with it).
    me: String,
    rooms: Mutex<HashMap<RoomId, PlacedRoom>>,
    /// What the sweep ended, by whom it had been placed, when, and its number.
    ended: Mutex<Vec<(Caller, Ended, Instant, u64)>>,
    /// This run (the process's start time), so that placers tell its numbers from a
    /// previous run's.
    instance: u64,
    /// The last number given to an ending.
    numbered: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct PlacedRoom {
    /// Each placement, and the node that last asked for it.
    by: HashMap<Placement, Caller>,
    /// Since when nobody has held the room.
    unheld_since: Option<Instant>,
    /// Another run than a placer's that answered the last check: what that placer placed
    /// ends only when the next check names the same holder (a home cut off for a while
    /// may answer a ping or two before it sees it lost the room).
    suspect: Option<Caller>,
}

impl Placed {
    pub(crate) fn new(me: &str) -> Placed {
        let instance = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        Placed { me: me.to_string(), rooms: Mutex::default(), ended: Mutex::default(), instance, numbered: Default::default() }
    }

    /// Notes what `from` is placing; returns it, to be noted again once placed
    /// ([`Placed::noted_after`]).
    fn placed(&self, room: &RoomId, what: Placement, from: &Caller) -> Option<(RoomId, Placement)> {
        // This node's own portal's placements need no watching (its rooms end with it, and
        // a room it loses it ends itself), but one replaces what another home placed.
        if *from == self.own() {
            self.ended(room, &what, from);
            return None;
        }
        self.rooms.lock().unwrap_or_else(|p| p.into_inner()).entry(room.clone()).or_default().by.insert(what.clone(), from.clone());
        Some((room.clone(), what))
    }

    /// What an SFU command that opens something places: its room and what.
    fn placement_of(command: &AgentCommand) -> Option<(&RoomId, Placement)> {
        match command {
            AgentCommand::Publish(c) => Some((&c.at.room, Placement::Participant(c.at.participant.clone()))),
            AgentCommand::Subscribe(c) => Some((&c.at.room, Placement::Participant(c.at.participant.clone()))),
            _ => None,
        }
    }

    /// What a mixer command that opens something places.
    fn placement_of_mix(command: &MixCommand) -> Option<(&RoomId, Placement)> {
        match command {
            MixCommand::StartView(c) => Some((&c.room, Placement::View(c.view.label.as_str().into()))),
            _ => None,
        }
    }

    /// Notes again, once its command succeeded, what [`Placed::note`] said `from` was
    /// placing, unless it is noted already (by anyone: a newer home's placement is not
    /// taken back).
    pub(crate) fn noted_after(&self, placing: Option<(RoomId, Placement)>, from: &Caller) {
        let Some((room, what)) = placing else { return };
        self.rooms.lock().unwrap_or_else(|p| p.into_inner()).entry(room).or_default().by.entry(what).or_insert_with(|| from.clone());
    }

    /// What the sweep ended, without what waited past [`ENDED_KEPT`].
    fn ended_kept(&self) -> std::sync::MutexGuard<'_, Vec<(Caller, Ended, Instant, u64)>> {
        let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        ended.retain(|(_, _, at, _)| at.elapsed() < ENDED_KEPT);
        ended
    }

    /// Notes that the sweep ended `what`, which `by` had placed in `room` (to be told to `by`).
    fn record_ended(&self, room: &RoomId, what: Placement, by: Caller) {
        let mut ended = self.ended_kept();
        let number = self.numbered.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        ended.push((by, Ended { room: room.clone(), what }, Instant::now(), number));
    }

    /// What the sweep ended of `placer`'s placements after what `question` says it read
    /// (kept until [`ENDED_KEPT`], so an answer that was lost is given again). A caller that
    /// tells no run is told nothing: its runs cannot be told apart.
    pub(crate) fn ended_since(&self, placer: &Caller, question: WhatEnded) -> EndedSince {
        let ended = self.ended_kept();
        let up_to = self.numbered.load(std::sync::atomic::Ordering::Relaxed);
        let after = if question.instance == Some(self.instance) { question.after.unwrap_or(0) } else { 0 };
        let theirs = if placer.run.is_none() {
            Vec::new()
        } else {
            ended.iter().filter(|(by, _, _, n)| by == placer && *n > after).map(|(_, e, _, _)| e.clone()).collect()
        };
        EndedSince { instance: self.instance, up_to, ended: theirs }
    }

    /// The answer to `question` from `placer`: numbered, or, to a home of an earlier version
    /// (a question without numbers), what ended of its placements, forgotten here once told.
    pub(crate) fn answer(&self, placer: &Caller, question: WhatEnded) -> EndedAnswer {
        if question.after.is_some() {
            return EndedAnswer::Since(self.ended_since(placer, question));
        }
        if placer.run.is_none() {
            return EndedAnswer::Once(Vec::new());
        }
        let mut ended = self.ended_kept();
        let (theirs, others): (Vec<_>, Vec<_>) = ended.drain(..).partition(|(by, _, _, _)| by == placer);
        *ended = others;
        EndedAnswer::Once(theirs.into_iter().map(|(_, e, _, _)| e).collect())
    }

    /// Whether `what` is placed in `room` again (since [`Placed::orphans`] gave it up).
    fn placed_again(&self, room: &RoomId, what: &Placement) -> bool {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner()).get(room).is_some_and(|r| r.by.contains_key(what))
    }

    /// This node, as what its own portal places is noted.
    fn own(&self) -> Caller {
        Caller::node(&self.me)
    }

    /// `what` ended, as `from` said: forgotten unless another home placed it since (this
    /// node's own portal ends anything).
    fn ended(&self, room: &RoomId, what: &Placement, from: &Caller) {
        let own = *from == self.own();
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = rooms.get_mut(room) {
            if r.by.get(what).is_some_and(|by| own || !by.is_other_than(from)) {
                r.by.remove(what);
            }
            if r.by.is_empty() {
                rooms.remove(room);
            }
        }
    }

    /// Notes an SFU command from `from` before it runs (a participant leaving is
    /// forgotten); returns what it places, for [`Placed::noted_after`].
    pub(crate) fn note(&self, command: &AgentCommand, from: &Caller) -> Option<(RoomId, Placement)> {
        match (command, Self::placement_of(command)) {
            (_, Some((room, what))) => self.placed(room, what, from),
            (AgentCommand::ParticipantLeft(c), None) => {
                self.ended(&c.room, &Placement::Participant(c.participant.clone()), from);
                None
            }
            _ => None,
        }
    }

    /// Notes a mixer command from `from` before it runs (a view stopped is forgotten);
    /// returns what it places, for [`Placed::noted_after`].
    pub(crate) fn note_mix(&self, command: &MixCommand, from: &Caller) -> Option<(RoomId, Placement)> {
        match (command, Self::placement_of_mix(command)) {
            (_, Some((room, what))) => self.placed(room, what, from),
            (MixCommand::StopView(c), None) => {
                self.ended(&c.room, &Placement::View(c.view.clone()), from);
                None
            }
            _ => None,
        }
    }

    /// The rooms where another node placed something.
    fn rooms(&self) -> Vec<RoomId> {
        let rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        rooms.iter().filter(|(_, r)| r.by.values().any(|by| by.node != self.me)).map(|(id, _)| id.clone()).collect()
    }

    /// What was placed in `room` by a home that is gone, given the run that holds it now
    /// (`None`: nobody), forgotten here, each with who had placed it.
    fn orphans(&self, room: &RoomId, holder: Option<&Caller>, now: Instant) -> Vec<(Placement, Caller)> {
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        let Some(r) = rooms.get_mut(room) else { return Vec::new() };
        let lost: Vec<Placement> = match holder {
            Some(holder) => {
                r.unheld_since = None;
                let lost: Vec<Placement> = r.by.iter().filter(|(_, by)| by.is_other_than(holder)).map(|(p, _)| p.clone()).collect();
                if lost.is_empty() || r.suspect.as_ref() != Some(holder) {
                    r.suspect = (!lost.is_empty()).then(|| holder.clone());
                    return Vec::new();
                }
                r.suspect = None;
                lost
            }
            None => {
                r.suspect = None;
                let since = *r.unheld_since.get_or_insert(now);
                if now.saturating_duration_since(since) < ORPHANED_AFTER {
                    return Vec::new();
                }
                r.by.keys().cloned().collect()
            }
        };
        let out: Vec<(Placement, Caller)> = lost.into_iter().filter_map(|p| r.by.remove_entry(&p)).collect();
        if r.by.is_empty() {
            rooms.remove(room);
        }
        out
    }

    fn forgive(&self) {
        for r in self.rooms.lock().unwrap_or_else(|p| p.into_inner()).values_mut() {
            r.unheld_since = None;
            r.suspect = None;
        }
    }
}

/// This node's parts that a lost home's placements are ended on.
pub(crate) struct Parts {
    pub(crate) media: Option<Arc<dyn MediaNode>>,
    pub(crate) mixer: Option<Arc<dyn MixNode>>,
}

/// Ends what homes that are gone had placed on this node's `parts` (see the module doc).
pub(crate) fn sweep(placed: Arc<Placed>, node: Weak<ClusterNode>, client: Client, parts: Parts) {
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
            // All at once: a home that does not answer holds up no other room's check.
            let rooms = placed.rooms();
            let holders = futures_util::future::join_all(rooms.iter().map(|room| crate::homes::holder(&client, room.as_str()))).await;
            // Asked again after the answers: our own link may have dropped meanwhile.
            if node.reconnected_within(RECONNECT_GRACE) {
                placed.forgive();
                continue;
            }
            for (room, holder) in rooms.into_iter().zip(holders) {
                let Some(holder) = holder else { continue };
                for (what, by) in placed.orphans(&room, holder.as_ref(), Instant::now()) {
                    // The new home placed it again meanwhile: its, not the lost home's.
                    if placed.placed_again(&room, &what) {
                        continue;
                    }
                    let home = by.run.as_deref().unwrap_or(&by.node);
                    info!(room = %room, placed = ?what, home = %home, now = ?holder.as_ref().map(|h| h.run.as_deref().unwrap_or(&h.node)), "the home that placed this here is gone; it ends");
                    let failed = match (what.clone(), &parts.media, &parts.mixer) {
                        (Placement::Participant(participant), Some(media), _) => {
                            let left = AgentCommand::ParticipantLeft(ParticipantLeft { room: room.clone(), participant });
                            media.handle(left).await.err().map(|e| e.to_string())
                        }
                        (Placement::View(view), _, Some(mixer)) => {
                            mixer.handle(MixCommand::StopView(StopView { room: room.clone(), view })).await.err().map(|e| e.to_string())
                        }
                        _ => None,
                    };
                    match failed {
                        Some(e) => debug!(error = %e, "ending what a lost home placed failed"),
                        // To be told to its placer, should it come back (see the module doc).
                        None => placed.record_ended(&room, what, by),
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
    async fn handle(&self, command: AgentCommand) -> Result<AgentReply, AgentError> {
        // This node's own portal: nothing is kept of what it places, so nothing to note again.
        self.placed.note(&command, &self.placed.own());
        self.inner.handle(command).await
    }
}

/// This node's mixer as its own portal calls it (see [`Noted`]).
pub(crate) struct NotedMix {
    pub(crate) inner: Arc<dyn MixNode>,
    pub(crate) placed: Arc<Placed>,
}

#[async_trait::async_trait]
impl MixNode for NotedMix {
    async fn handle(&self, command: MixCommand) -> Result<MixReply, MixError> {
        self.placed.note_mix(&command, &self.placed.own());
        self.inner.handle(command).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_core::agent::{PublishSpec, SessionRef};

    fn publish(room: &str, participant: &str) -> AgentCommand {
        let at = SessionRef { room: room.into(), participant: participant.into(), transport: "t".into(), session: participant.into() };
        AgentCommand::Publish(PublishSpec { at, tracks: Vec::new(), data: false, accept: None })
    }

    /// Node `node`'s run `instance`.
    fn run(node: &str, instance: &str) -> Caller {
        Caller::run(node, instance)
    }

    /// What two checks in a row that find `holder` holding `room` give up (the first gives
    /// up nothing).
    fn twice(placed: &Placed, room: &str, holder: &str, now: Instant) -> Vec<(Placement, String)> {
        let holder = Caller::parse(holder);
        assert!(placed.orphans(&room.into(), Some(&holder), now).is_empty(), "given up at the first check");
        placed.orphans(&room.into(), Some(&holder), now).into_iter().map(|(p, by)| (p, by.run.unwrap_or(by.node))).collect()
    }

    #[test]
    fn a_taken_over_room_loses_the_old_homes_participants_only() {
        let placed = Placed::new("bravo");
        placed.note(&publish("r", "ann"), &run("alpha", "1"));
        placed.note(&publish("r", "bob"), &run("alpha", "1"));
        // Bob seated again at bravo, which placed him here anew.
        placed.note(&publish("r", "bob"), &placed.own());
        let now = Instant::now();
        let lost = twice(&placed, "r", "bravo/9", now);
        assert_eq!(lost, [(Placement::Participant("ann".into()), "alpha/1".to_string())]);
        assert!(twice(&placed, "r", "bravo/9", now).is_empty(), "told once");
        assert!(placed.rooms().is_empty(), "what this node's own portal placed is not watched");
    }

    #[test]
    fn a_home_restarted_under_its_id_is_another_home() {
        let placed = Placed::new("bravo");
        placed.note(&publish("r", "ann"), &run("alpha", "1"));
        placed.note(&publish("r", "bob"), &run("alpha", "1"));
        let now = Instant::now();
        assert!(twice(&placed, "r", "alpha/1", now).is_empty(), "the same run holds the room");
        // Alpha restarted and seated Bob again; Ann never came back.
        placed.note(&publish("r", "bob"), &run("alpha", "2"));
        assert_eq!(twice(&placed, "r", "alpha/2", now), [(Placement::Participant("ann".into()), "alpha/1".to_string())]);
        // An older node tells no run: its node id alone is compared.
        placed.note(&publish("r", "cat"), &Caller { node: "alpha".into(), run: None });
        assert!(twice(&placed, "r", "alpha/3", now).len() == 1, "bob's run is gone, cat's unknown");
        assert_eq!(placed.rooms(), ["r".into()] as [RoomId; 1]);
        assert!(twice(&placed, "r", "alpha", now).is_empty());
    }

    #[test]
    fn a_view_started_again_by_the_new_home_is_kept() {
        let placed = Placed::new("carl");
        let start = |room: &str| MixCommand::StartView(tessera_core::command::StartView { room: room.into(), view: Default::default() });
        placed.note_mix(&start("r"), &run("alpha", "1"));
        placed.note_mix(&start("s"), &run("alpha", "1"));
        placed.note_mix(&start("s"), &run("bravo", "1"));
        let now = Instant::now();
        let label = tessera_core::room::View::default().label;
        assert_eq!(twice(&placed, "r", "bravo/1", now), [(Placement::View(label.as_str().into()), "alpha/1".to_string())]);
        assert!(twice(&placed, "s", "bravo/1", now).is_empty(), "bravo's own view stays");
        let stop = MixCommand::StopView(StopView { room: "s".into(), view: label.as_str().into() });
        placed.note_mix(&stop, &run("bravo", "1"));
        assert!(placed.rooms().is_empty(), "a stopped view is forgotten");
    }

    #[test]
    fn only_its_placer_forgets_a_placement() {
        let placed = Placed::new("carl");
        placed.note(&publish("r", "ann"), &run("alpha", "1"));
        placed.note(&publish("r", "ann"), &run("bravo", "1"));
        // The old home's late word about Ann does not undo the new home's placement.
        let left = AgentCommand::ParticipantLeft(ParticipantLeft { room: "r".into(), participant: "ann".into() });
        placed.note(&left, &run("alpha", "1"));
        assert_eq!(placed.rooms(), ["r".into()] as [RoomId; 1]);
        placed.note(&left, &run("bravo", "1"));
        assert!(placed.rooms().is_empty());
    }

    #[test]
    fn one_answer_from_another_home_is_not_enough() {
        let placed = Placed::new("bravo");
        placed.note(&publish("r", "ann"), &run("alpha", "1"));
        let now = Instant::now();
        // A cut-off home that took the room over answers once, then the placer again.
        assert!(placed.orphans(&"r".into(), Some(&Caller::parse("carl/1")), now).is_empty());
        assert!(placed.orphans(&"r".into(), Some(&Caller::parse("alpha/1")), now).is_empty());
        assert!(placed.orphans(&"r".into(), Some(&Caller::parse("carl/1")), now).is_empty(), "not the same holder twice in a row");
        assert_eq!(placed.orphans(&"r".into(), Some(&Caller::parse("carl/1")), now).len(), 1);
    }

    #[test]
    fn a_placement_noted_again_after_its_command_outlives_a_leaving_noted_meanwhile() {
        let placed = Placed::new("carl");
        let alpha = run("alpha", "1");
        // Ann leaves and comes back at once; the two commands run side by side, and the
        // leaving is noted after the new publication was.
        let publication = publish("r", "ann");
        let placing = placed.note(&publication, &alpha);
        placed.note(&AgentCommand::ParticipantLeft(ParticipantLeft { room: "r".into(), participant: "ann".into() }), &alpha);
        assert!(placed.rooms().is_empty());
        placed.noted_after(placing.clone(), &alpha);
        assert_eq!(placed.rooms(), ["r".into()] as [RoomId; 1], "the session the publication made is watched");
        // Noting again takes back no newer home's placement.
        placed.note(&publication, &run("bravo", "1"));
        placed.noted_after(placing, &alpha);
        assert_eq!(twice(&placed, "r", "bravo/1", Instant::now()), [], "ann is bravo's");
    }

    #[test]
    fn what_the_sweep_ended_is_told_to_its_placer_until_it_has_read_it() {
        let placed = Placed::new("bravo");
        let (alpha, alpha2) = (run("alpha", "1"), run("alpha", "2"));
        placed.note(&publish("r", "ann"), &alpha);
        placed.note(&publish("q", "bob"), &alpha);
        let t0 = Instant::now();
        assert!(placed.orphans(&"r".into(), None, t0).is_empty());
        assert!(placed.orphans(&"q".into(), None, t0).is_empty());
        let sweep = |room: &str, at: Instant| {
            for (what, by) in placed.orphans(&room.into(), None, at) {
                placed.record_ended(&room.into(), what, by);
            }
        };
        // As the sweep does once it has ended them.
        sweep("r", t0 + ORPHANED_AFTER);
        sweep("q", t0 + ORPHANED_AFTER);
        // Bob is seated again by the same run before it asks: his old transports ended all
        // the same (the home keeps what it placed since).
        placed.note(&publish("q", "bob"), &alpha);
        let first = WhatEnded::first();
        assert!(placed.ended_since(&alpha2, first).ended.is_empty(), "another run is told nothing");
        assert!(placed.ended_since(&Caller::node("alpha"), first).ended.is_empty(), "a caller without a run is told nothing");
        let both = [
            Ended { room: "r".into(), what: Placement::Participant("ann".into()) },
            Ended { room: "q".into(), what: Placement::Participant("bob".into()) },
        ];
        let answer = placed.ended_since(&alpha, first);
        assert_eq!(answer.ended, both);
        // The answer was lost on the way: asked the same again, it is given again.
        assert_eq!(placed.ended_since(&alpha, first), answer);
        // Read: nothing more, until the sweep ends something else.
        assert!(placed.ended_since(&alpha, answer.next()).ended.is_empty(), "told until read");
        placed.note(&publish("s", "cy"), &alpha);
        assert!(placed.orphans(&"s".into(), None, t0).is_empty());
        sweep("s", t0 + ORPHANED_AFTER);
        let later = placed.ended_since(&alpha, answer.next());
        assert_eq!(later.ended, [Ended { room: "s".into(), what: Placement::Participant("cy".into()) }]);
        assert!(later.up_to > answer.up_to);
        // Numbers from another run of this node count for nothing.
        let stale = WhatEnded { instance: Some(answer.instance.wrapping_add(1)), after: Some(later.up_to) };
        assert_eq!(placed.ended_since(&alpha, stale).ended.len(), 3);
        let json = serde_json::to_string(&Ended { room: "r".into(), what: Placement::View("common".into()) }).unwrap();
        assert_eq!(json, r#"{"room":"r","what":{"view":"common"}}"#);
        let json = serde_json::to_value(later.next()).unwrap();
        assert_eq!(json, serde_json::json!({"instance": later.instance, "after": later.up_to}));
        // A home of an earlier version asks `{}` and reads a list, each ending told once.
        let old: WhatEnded = serde_json::from_str("{}").unwrap();
        let told = placed.answer(&alpha, old);
        assert_eq!(serde_json::to_value(&told).unwrap().as_array().map(Vec::len), Some(3));
        assert_eq!(placed.answer(&alpha, old), EndedAnswer::Once(Vec::new()), "told once");
        // A node of an earlier version answers a list: read as told, the numbers unchanged.
        let list = serde_json::to_string(&told).unwrap();
        let read: EndedAnswer = serde_json::from_str(&list).unwrap();
        let numbered = read.numbered(later.next());
        assert_eq!((numbered.ended.len(), numbered.next()), (3, later.next()));
        let since: EndedAnswer = serde_json::from_str(&serde_json::to_string(&EndedAnswer::Since(later.clone())).unwrap()).unwrap();
        assert_eq!(since, EndedAnswer::Since(later));
    }

    #[test]
    fn a_room_nobody_holds_is_given_up_after_a_while() {
        let placed = Placed::new("bravo");
        placed.note(&publish("r", "ann"), &run("alpha", "1"));
        let t0 = Instant::now();
        assert!(placed.orphans(&"r".into(), None, t0).is_empty());
        assert!(placed.orphans(&"r".into(), None, t0 + ORPHANED_AFTER / 2).is_empty());
        // Held again meanwhile: the wait starts over.
        assert!(twice(&placed, "r", "alpha/1", t0 + ORPHANED_AFTER / 2).is_empty());
        assert!(placed.orphans(&"r".into(), None, t0 + ORPHANED_AFTER).is_empty());
        assert_eq!(placed.orphans(&"r".into(), None, t0 + ORPHANED_AFTER * 2).len(), 1);
        assert!(placed.rooms().is_empty());
        placed.note(&publish("q", "cat"), &run("alpha", "1"));
        placed.note(&AgentCommand::ParticipantLeft(ParticipantLeft { room: "q".into(), participant: "cat".into() }), &run("alpha", "1"));
        assert!(placed.rooms().is_empty(), "a participant who left is forgotten");
    }
}
