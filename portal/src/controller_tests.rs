//! The room controller against a fake media node: one behaviour per test, no network,
//! no WebRTC, time paused and passed in (tokio's test clock). The fake node records the
//! commands it receives and the tests play the node's side by handing the portal the
//! events a real node would send.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tessera_core::agent::{AgentError, AgentEvent, MediaKind, Progress};
use tessera_core::command::{
    AgentCommand, AgentReply, LocalRouter, MediaNode, MediaStats, MixCommand, MixError, MixNode, MixReply, StartView, StopView,
};
use tessera_core::stream::{ForwardInfo, LayoutEntry, MixedInfo, StreamInfo, StreamKind, TrackFormat, TrackInfo, TrackStatus};
use tessera_core::token::{PortalAddress, TokenAuthority};
use tessera_core::{Room, RoomStore, StreamId};

use crate::socketio::SocketHandle;
use crate::socketio::packet::Packet;
use crate::{Portal, now_secs};

const ROOM: &str = "room1";

/// A media node (SFU and mixer in one) that records what it is told and refuses
/// publications whose track mid is `refuse`.
#[derive(Default)]
struct FakeNode {
    agent: Mutex<Vec<AgentCommand>>,
    mixer: Mutex<Vec<MixCommand>>,
    /// Held by a test to keep `StartView` (which every login awaits) from answering.
    start_view: tokio::sync::Mutex<()>,
}

#[async_trait::async_trait]
impl MediaNode for FakeNode {
    async fn handle(&self, command: AgentCommand) -> Result<AgentReply, AgentError> {
        let reply = match &command {
            AgentCommand::Publish(p) if p.tracks.iter().any(|t| t.mid == "refuse") => Err(AgentError::Rejected("codec not supported".into())),
            AgentCommand::Publish(_) => Ok(AgentReply::Publish(())),
            AgentCommand::Subscribe(_) => Ok(AgentReply::Subscribe(())),
            AgentCommand::Signal(_) => Ok(AgentReply::Signal(())),
            AgentCommand::EndSession(_) => Ok(AgentReply::EndSession(())),
            AgentCommand::SwitchTracks(_) => Ok(AgentReply::SwitchTracks(())),
            AgentCommand::RequestKeyframe(_) => Ok(AgentReply::RequestKeyframe(())),
            AgentCommand::SelectLayer(_) => Ok(AgentReply::SelectLayer(())),
            AgentCommand::ParticipantLeft(_) => Ok(AgentReply::ParticipantLeft(())),
            AgentCommand::GetStats(_) => Ok(AgentReply::GetStats(MediaStats::default())),
        };
        self.agent.lock().unwrap().push(command);
        reply
    }
}

#[async_trait::async_trait]
impl MixNode for FakeNode {
    async fn handle(&self, command: MixCommand) -> Result<MixReply, MixError> {
        if matches!(command, MixCommand::StartView(_)) {
            let _ = self.start_view.lock().await;
        }
        let reply = match &command {
            MixCommand::StartView(StartView { room, view }) => MixReply::StartView(StreamInfo {
                id: StreamId::mixed(room, &view.label.as_str().into()),
                kind: StreamKind::Mixed(MixedInfo { label: view.label.as_str().into(), layout: Vec::new(), active_input: None }),
                tracks: vec![track(MediaKind::Audio), track(MediaKind::Video)],
                data: false,
            }),
            MixCommand::StopView(_) => MixReply::StopView(()),
            MixCommand::Mix(m) => MixReply::Mix(vec![LayoutEntry { stream: Some(m.stream.clone()), region: region() }]),
            MixCommand::Unmix(_) => MixReply::Unmix(Vec::new()),
            MixCommand::SetLayout(l) => MixReply::SetLayout(l.layout.clone()),
            MixCommand::SetTemplate(_) => MixReply::SetTemplate(Vec::new()),
            MixCommand::SetRegion(_) => MixReply::SetRegion(Vec::new()),
            MixCommand::GetLayout(_) => MixReply::GetLayout(Vec::new()),
        };
        self.mixer.lock().unwrap().push(command);
        Ok(reply)
    }
}

impl FakeNode {
    fn agent_commands(&self) -> Vec<AgentCommand> {
        self.agent.lock().unwrap().clone()
    }
    fn mixer_commands(&self) -> Vec<MixCommand> {
        self.mixer.lock().unwrap().clone()
    }
}

fn region() -> tessera_core::room::Region {
    serde_json::from_value(json!({"id": "1", "area": {"left": "0", "top": "0", "width": "1", "height": "1"}})).unwrap()
}

fn track(kind: MediaKind) -> TrackInfo {
    let format = match kind {
        MediaKind::Audio => {
            TrackFormat::Audio(tessera_core::room::AudioFormat { codec: "opus".into(), sample_rate: Some(48000), channel_num: Some(2) })
        }
        MediaKind::Video => TrackFormat::Video(tessera_core::room::VideoFormat { codec: "vp8".into(), profile: None }),
    };
    TrackInfo { kind, source: "camera".into(), mid: None, format, parameters: None, status: TrackStatus::Active, rid: None }
}

/// A portal on a fake node, with a room configured by `options`.
struct Controller {
    portal: Portal,
    node: Arc<FakeNode>,
    tokens: TokenAuthority,
    _dir: tempfile::TempDir,
}

/// A logged-in participant: its socket's outgoing frames and its session state.
struct Client {
    id: String,
    handle: crate::conference::ClientLink,
    out: crate::socketio::OutRx,
    state: crate::session::State,
    login: Value,
}

fn controller(options: Value) -> Controller {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RoomStore::open(dir.path().join("rooms.db")).unwrap());
    store.create(Room::from_options(ROOM.into(), "Room".into(), options).unwrap()).unwrap();
    let tokens = TokenAuthority::new(b"controller-test-service-key");
    let node = Arc::new(FakeNode::default());
    let router = LocalRouter { agent: Some(node.clone()), mixer: Some(node.clone()), recorder: None };
    let portal = Portal::new(Default::default(), store, crate::Admission::local(tokens.clone()), Arc::new(router), None);
    Controller { portal, node, tokens, _dir: dir }
}

impl Controller {
    /// Logs in as the session loop does: the login, then its answer.
    async fn try_join(&self, user: &str, role: &str) -> (Client, Result<Option<Value>, String>) {
        let (client, reply) = self.login_unanswered(user, role).await;
        if let crate::session::State::Joined { room, participant, .. } = &client.state {
            self.portal.login_answered(room, participant);
        }
        (client, reply)
    }

    /// The login request alone, before the socket sends its answer.
    async fn login_unanswered(&self, user: &str, role: &str) -> (Client, Result<Option<Value>, String>) {
        static SOCKET: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = format!("sock{}", SOCKET.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let (handle, out) = SocketHandle::for_test(&id, usize::MAX);
        let handle = crate::conference::ClientLink::from(handle);
        let address = PortalAddress { host: "127.0.0.1:8080".into(), secure: false };
        let (token, _) = self.tokens.issue(ROOM, user, role, &address, now_secs(), 60).unwrap();
        let args = [json!({"token": token, "userAgent": {"sdk": {"type": "JavaScript", "version": "5.1"}}, "protocol": "1.2"})];
        let mut state = crate::session::State::Fresh;
        let reply = crate::session::login(&self.portal, &handle, &mut state, &args).await;
        let login = reply.clone().ok().flatten().unwrap_or(Value::Null);
        (Client { id, handle, out, state, login }, reply)
    }

    async fn join(&self, user: &str, role: &str) -> Client {
        let (client, reply) = self.try_join(user, role).await;
        reply.unwrap();
        client
    }

    async fn request(&self, c: &mut Client, name: &str, args: Value) -> Result<Option<Value>, String> {
        let args = [args];
        if crate::session::MEDIA.contains(&name) {
            return self.portal.media_request(ROOM, &c.id, name, &args).await;
        }
        let mut replay = Vec::new();
        crate::session::dispatch(&self.portal, &c.handle, &mut c.state, name, &args, &mut replay)
    }

    /// Publishes camera audio+video; the publication id.
    async fn publish(&self, c: &mut Client) -> String {
        let media = json!({"tracks": [{"type": "audio", "mid": "0", "source": "mic"}, {"type": "video", "mid": "1", "source": "camera"}]});
        let reply = self.request(c, "publish", json!({"media": media, "attributes": {"label": c.id}})).await.unwrap().unwrap();
        reply["id"].as_str().unwrap().to_string()
    }

    /// The node reports a publication's first media: it becomes a forward stream.
    async fn stream_ready(&self, owner: &Client, publication: &str) {
        let stream = StreamInfo {
            id: publication.into(),
            kind: StreamKind::Forward(ForwardInfo { owner: owner.id.as_str().into(), in_views: Vec::new(), attributes: json!({}) }),
            tracks: vec![track(MediaKind::Audio), track(MediaKind::Video)],
            data: false,
        };
        // OWT 1.2: a publication without a named transport has one named after it.
        self.event(AgentEvent::StreamReady { room: ROOM.into(), stream, transport: publication.into() }).await;
    }

    /// Hands the portal one event from the node and lets the work it starts finish.
    async fn event(&self, e: AgentEvent) {
        self.portal.on_agent_event(e);
        settle().await;
    }
}

/// Lets spawned tasks run (test time is paused, so sleeping costs nothing).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// The notifications a client received since the last call, as (event, data).
fn received(c: &mut Client) -> Vec<(String, Value)> {
    let mut events = Vec::new();
    while let Ok(frame) = c.out.try_recv() {
        let Ok(p) = Packet::decode(&frame) else { continue };
        if let Some(Value::Array(items)) = p.data
            && let Some(Value::String(name)) = items.first()
        {
            events.push((name.clone(), items.get(1).cloned().unwrap_or(Value::Null)));
        }
    }
    events
}

fn stream_events(events: &[(String, Value)]) -> Vec<&Value> {
    events.iter().filter(|(n, _)| n == "stream").map(|(_, d)| d).collect()
}

#[tokio::test(start_paused = true)]
async fn a_join_is_announced_and_the_newcomer_sees_the_room() {
    let c = controller(json!({}));
    let mut alice = c.join("alice", "presenter").await;
    let bob = c.join("bob", "viewer").await;
    let joins: Vec<_> = received(&mut alice).into_iter().filter(|(n, _)| n == "participant").collect();
    assert_eq!(joins.len(), 1, "{joins:?}");
    assert_eq!(joins[0].1["action"], "join");
    assert_eq!(joins[0].1["data"]["id"], bob.id.as_str());
    assert_eq!(joins[0].1["data"]["user"], "bob");
    let people: Vec<&str> = bob.login["room"]["participants"].as_array().unwrap().iter().map(|p| p["user"].as_str().unwrap()).collect();
    assert_eq!(people, ["alice", "bob"]);
    let streams = bob.login["room"]["streams"].as_array().unwrap();
    assert_eq!(streams.len(), 1, "the mixed stream, once: {streams:?}");
    assert_eq!(streams[0]["id"], "room1-common");
    assert_eq!(streams[0]["type"], "mixed");
    assert_eq!(bob.login["permission"]["publish"]["video"], false, "a viewer may not publish");
}

/// While a login waits (on the mixer here; the ledger or another node in a cluster),
/// the room goes on. Every event reaches the newcomer once: in the login result's
/// snapshot or as a notification after the answer, never before it.
#[tokio::test(start_paused = true)]
async fn what_happens_during_a_login_reaches_the_newcomer_once_and_after_its_answer() {
    let c = controller(json!({}));
    let mut alice = c.join("alice", "presenter").await;
    let early = c.publish(&mut alice).await;
    let gate = c.node.start_view.lock().await;
    let login = c.login_unanswered("bob", "viewer");
    let meanwhile = async {
        // Bob is seated (alice hears of him) and his login waits on the mixer.
        let bob_id = loop {
            settle().await;
            let joined = received(&mut alice).into_iter().find(|(n, d)| n == "participant" && d["data"]["user"] == "bob");
            if let Some((_, d)) = joined {
                break d["data"]["id"].clone();
            }
        };
        c.stream_ready(&alice, &early).await;
        // A text to the newcomer is no part of the snapshot: it must not be lost.
        c.request(&mut alice, "text", json!({"to": bob_id, "message": "welcome"})).await.unwrap();
        drop(gate);
    };
    let ((mut bob, reply), ()) = tokio::join!(login, meanwhile);
    reply.unwrap();
    let in_snapshot = bob.login["room"]["streams"].as_array().unwrap().iter().any(|s| s["id"] == early.as_str());
    assert!(in_snapshot, "{}", bob.login);
    // Not also as a notification (before the fix, a `stream add` reached bob before the
    // login answer, for a stream the answer listed too).
    assert_eq!(received(&mut bob), vec![], "nothing before the answer");
    // After the snapshot, before the answer: held back, then sent once.
    let late = c.publish(&mut alice).await;
    c.stream_ready(&alice, &late).await;
    assert_eq!(received(&mut bob), vec![], "nothing before the answer");
    let crate::session::State::Joined { room, participant, .. } = &bob.state else { panic!("bob is not in") };
    c.portal.login_answered(room, participant);
    let after = received(&mut bob);
    let texts: Vec<&Value> = after.iter().filter(|(n, _)| n == "text").map(|(_, d)| &d["message"]).collect();
    assert_eq!(texts, [&json!("welcome")], "{after:?}");
    let adds: Vec<Value> = stream_events(&after).into_iter().filter(|d| d["status"] == "add").map(|d| d["id"].clone()).collect();
    assert_eq!(adds, vec![json!(late)]);
}

/// OWT's protocol 1.2 sources: any of its five for either kind (its 1.0 schema split them
/// per kind; its 1.2 one, which its portal and JS SDK speak, does not); anything else is
/// refused with the list.
#[tokio::test(start_paused = true)]
async fn a_track_source_is_one_of_owts_five() {
    let c = controller(json!({}));
    let mut alice = c.join("alice", "presenter").await;
    let publish = |kind: &str, source: &str| json!({"media": {"tracks": [{"type": kind, "mid": "0", "source": source}]}});
    for source in ["file", "mixed", "webcam"] {
        let refused = c.request(&mut alice, "publish", publish("audio", source)).await.unwrap_err();
        assert_eq!(
            refused,
            format!("publish: request.media.tracks[0].source `{source}` is not one of mic, camera, screen-cast, raw-file, encoded-file")
        );
    }
    for (kind, source) in [("audio", "camera"), ("video", "mic"), ("audio", "screen-cast"), ("video", "encoded-file")] {
        c.request(&mut alice, "publish", publish(kind, source)).await.unwrap();
    }
}

/// Views added or removed over REST while the room is live start or stop at once, and
/// those present are told (`stream add` / `stream remove`), as for any stream.
#[tokio::test(start_paused = true)]
async fn views_changed_over_rest_start_and_stop_in_a_live_room() {
    let c = controller(json!({}));
    let mut alice = c.join("alice", "presenter").await;
    received(&mut alice);
    async fn update(c: &Controller, views: Value) -> Room {
        let room = c.portal.inner.store.get(ROOM).unwrap().updated(json!({"views": views})).unwrap();
        c.portal.inner.store.update(room).await.unwrap()
    }
    let room = update(&c, json!([{"label": "common"}, {"label": "gallery"}])).await;
    c.portal.views_changed(&room).await;
    let events = received(&mut alice);
    let stream = stream_events(&events);
    assert_eq!(stream.len(), 1, "{events:?}");
    assert_eq!((stream[0]["id"].as_str(), stream[0]["status"].as_str()), (Some("room1-gallery"), Some("add")));
    assert_eq!(stream[0]["data"]["type"], "mixed");
    assert!(c.node.mixer_commands().iter().any(|m| matches!(m, MixCommand::StartView(v) if v.view.label == "gallery")));
    // A newcomer sees both views in its login result, and no add.
    let mut bob = c.join("bob", "viewer").await;
    let listed: Vec<&str> = bob.login["room"]["streams"].as_array().unwrap().iter().filter_map(|s| s["id"].as_str()).collect();
    assert_eq!(listed, ["room1-common", "room1-gallery"]);
    assert!(stream_events(&received(&mut bob)).is_empty());

    let room = update(&c, json!([{"label": "gallery"}])).await;
    c.portal.views_changed(&room).await;
    let events = received(&mut bob);
    let stream = stream_events(&events);
    assert_eq!(stream.len(), 1, "{events:?}");
    assert_eq!((stream[0]["id"].as_str(), stream[0]["status"].as_str()), (Some("room1-common"), Some("remove")));
    assert!(c.node.mixer_commands().iter().any(|m| matches!(m, MixCommand::StopView(v) if v.view == "common")));
    assert!(c.portal.lock().room(ROOM).unwrap().stream("room1-common").is_none());
}

/// A room that had no view (none configured) starts one added over REST, and those present
/// are told.
#[tokio::test(start_paused = true)]
async fn a_view_added_to_a_live_room_without_views_starts() {
    let c = controller(json!({"views": []}));
    let mut alice = c.join("alice", "presenter").await;
    assert_eq!(alice.login["room"]["streams"], json!([]));
    received(&mut alice);
    let room = c.portal.inner.store.get(ROOM).unwrap().updated(json!({"views": [{"label": "common"}]})).unwrap();
    let room = c.portal.inner.store.update(room).await.unwrap();
    c.portal.views_changed(&room).await;
    let adds: Vec<Value> = stream_events(&received(&mut alice)).into_iter().filter(|d| d["status"] == "add").map(|d| d["id"].clone()).collect();
    assert_eq!(adds, [json!("room1-common")]);
}

/// A view removed over REST while a login is still starting it (the mixer answers late)
/// is stopped when the mixer answers, not listed, and does not run on.
#[tokio::test(start_paused = true)]
async fn a_view_removed_while_a_login_starts_it_does_not_come_back() {
    let c = controller(json!({}));
    let gate = c.node.start_view.lock().await;
    let login = c.login_unanswered("alice", "presenter");
    let meanwhile = async {
        // Alice's login waits on the mixer; the room's one view is removed meanwhile.
        while c.portal.lock().room(ROOM).is_none() {
            settle().await;
        }
        settle().await;
        let room = c.portal.inner.store.get(ROOM).unwrap().updated(json!({"views": []})).unwrap();
        let room = c.portal.inner.store.update(room).await.unwrap();
        c.portal.views_changed(&room).await;
        drop(gate);
    };
    let ((alice, reply), ()) = tokio::join!(login, meanwhile);
    reply.unwrap();
    assert_eq!(alice.login["room"]["streams"], json!([]), "{}", alice.login);
    let last = c.node.mixer_commands().into_iter().rev().find(|m| matches!(m, MixCommand::StartView(_) | MixCommand::StopView(_)));
    assert!(matches!(last, Some(MixCommand::StopView(ref v)) if v.view == "common"), "{last:?}");
    assert!(c.portal.lock().mixing.get(ROOM).is_none_or(|v| v.is_empty()));
}

#[tokio::test(start_paused = true)]
async fn a_ready_publication_becomes_a_stream_everyone_sees_and_is_mixed() {
    let c = controller(json!({}));
    let mut alice = c.join("alice", "presenter").await;
    let mut bob = c.join("bob", "viewer").await;
    let id = c.publish(&mut alice).await;
    let published = c.node.agent_commands();
    let Some(AgentCommand::Publish(spec)) = published.last() else { panic!("{published:?}") };
    assert_eq!((spec.at.room.as_str(), spec.at.participant.as_str(), spec.at.session.as_str()), (ROOM, alice.id.as_str(), id.as_str()));
    assert_eq!(spec.at.transport.as_str(), id, "a publish without transport id opens a transport named after it");
    assert_eq!(spec.tracks.len(), 2);
    assert!(stream_events(&received(&mut bob)).is_empty(), "not a stream before media flows");

    received(&mut alice);
    c.stream_ready(&alice, &id).await;
    // The publisher hears `ready` on its transport, then `stream add` like everyone (OWT's
    // order); the room had the stream by then (one event from the node does both).
    let theirs: Vec<(String, Value)> =
        received(&mut alice).into_iter().filter(|(n, d)| n == "progress" || (n == "stream" && d["status"] == "add")).collect();
    assert_eq!(theirs.len(), 2, "{theirs:?}");
    assert_eq!(theirs[0], ("progress".to_string(), json!({"id": id, "sessionId": id, "status": "ready"})));
    assert_eq!((theirs[1].1["status"].as_str(), theirs[1].1["id"].as_str()), (Some("add"), Some(id.as_str())));
    let events = received(&mut bob);
    assert!(!events.iter().any(|(n, _)| n == "progress"), "only the publisher is told ready: {events:?}");
    let added: Vec<_> = stream_events(&events).into_iter().filter(|e| e["status"] == "add").collect();
    assert_eq!(added.len(), 1, "{events:?}");
    assert_eq!(added[0]["status"], "add");
    assert_eq!(added[0]["data"]["id"], id.as_str());
    assert_eq!(added[0]["data"]["info"]["attributes"]["label"], alice.id.as_str(), "the publisher's attributes, kept by the controller");
    assert_eq!(added[0]["data"]["info"]["owner"], alice.id.as_str());
    let mixed: Vec<_> = c.node.mixer_commands().into_iter().filter_map(|m| if let MixCommand::Mix(m) = m { Some(m) } else { None }).collect();
    assert_eq!(mixed.len(), 1, "autoMix puts the stream into the room's one view");
    assert_eq!((mixed[0].view.as_str(), mixed[0].stream.as_str()), ("common", id.as_str()));
    let update = stream_events(&events).into_iter().find(|e| e["status"] == "update").cloned();
    assert_eq!(update.as_ref().map(|u| u["id"].clone()), Some(json!("room1-common")), "the view's layout change is announced: {events:?}");
}

#[tokio::test(start_paused = true)]
async fn permissions_are_checked_before_the_node_hears_anything() {
    let c = controller(json!({}));
    let mut bob = c.join("bob", "viewer").await;
    let media = json!({"tracks": [{"type": "video", "mid": "1"}]});
    assert_eq!(c.request(&mut bob, "publish", json!({"media": media})).await, Err("unauthorized".into()));
    assert!(c.node.agent_commands().is_empty(), "{:?}", c.node.agent_commands());
}

#[tokio::test(start_paused = true)]
async fn pending_publications_count_against_the_input_limit_until_their_transport_closes() {
    let c = controller(json!({"inputLimit": 1}));
    let mut alice = c.join("alice", "presenter").await;
    let first = c.publish(&mut alice).await;
    let media = json!({"tracks": [{"type": "video", "mid": "1"}]});
    assert_eq!(c.request(&mut alice, "publish", json!({"media": media})).await, Err("Too many inputs".into()));
    // The transport fails before any media: the node says so, and the place frees up.
    let closed = AgentEvent::TransportClosed {
        room: ROOM.into(),
        participant: alice.id.as_str().into(),
        transport: first.as_str().into(),
        sessions: vec![first.as_str().into()],
        reason: "ICE failed".into(),
    };
    c.event(closed).await;
    c.publish(&mut alice).await;
    let reply = c.request(&mut alice, "unpublish", json!({"id": first})).await;
    assert_eq!(reply, Err(format!("Publication does NOT exist: {first}")), "the failed publication is gone");
}

#[tokio::test(start_paused = true)]
async fn a_refusal_by_the_node_reaches_the_client_and_leaves_nothing_behind() {
    let c = controller(json!({"inputLimit": 1}));
    let mut alice = c.join("alice", "presenter").await;
    let media = json!({"tracks": [{"type": "video", "mid": "refuse"}]});
    assert_eq!(c.request(&mut alice, "publish", json!({"media": media})).await, Err("codec not supported".into()));
    // Not counted as pending: the room's single input is still free.
    c.publish(&mut alice).await;
}

#[tokio::test(start_paused = true)]
async fn a_publication_whose_offer_the_node_refused_ends_with_a_session_error() {
    let c = controller(json!({"inputLimit": 1}));
    let mut alice = c.join("alice", "presenter").await;
    let id = c.publish(&mut alice).await;
    let Some(AgentCommand::Publish(spec)) = c.node.agent_commands().last().cloned() else { panic!() };
    received(&mut alice);
    let who = alice.id.clone();
    let failed = |publication: &str| AgentEvent::PublicationFailed {
        room: ROOM.into(),
        participant: who.as_str().into(),
        transport: spec.at.transport.clone(),
        publication: publication.into(),
        reason: "no codec".into(),
    };
    c.event(failed(&id)).await;
    let got = received(&mut alice);
    assert_eq!(got, [("progress".to_string(), json!({"id": spec.at.transport, "sessionId": id, "status": "error", "data": "no codec"}))]);
    assert_eq!(c.request(&mut alice, "unpublish", json!({"id": id})).await, Err(format!("Publication does NOT exist: {id}")));
    // The room's one input is free again; a stream that flows is not ended by such an event.
    let second = c.publish(&mut alice).await;
    c.stream_ready(&alice, &second).await;
    received(&mut alice);
    c.event(failed(&second)).await;
    assert!(received(&mut alice).is_empty());
    assert_eq!(c.request(&mut alice, "unpublish", json!({"id": second})).await, Ok(None));
}

#[tokio::test(start_paused = true)]
async fn subscriptions_need_an_existing_stream_and_end_when_the_node_says_so() {
    let c = controller(json!({}));
    let mut alice = c.join("alice", "presenter").await;
    let mut bob = c.join("bob", "viewer").await;
    let ask = |from: &str| json!({"media": {"tracks": [{"type": "video", "mid": "0", "from": from}]}});
    assert_eq!(c.request(&mut bob, "subscribe", ask("ghost")).await, Err("Stream does NOT exist: ghost".into()));
    let id = c.publish(&mut alice).await;
    assert_eq!(c.request(&mut bob, "subscribe", ask(&id)).await, Err(format!("Stream does NOT exist: {id}")), "not before it flows");
    c.stream_ready(&alice, &id).await;
    let sub = c.request(&mut bob, "subscribe", ask(&id)).await.unwrap().unwrap();
    let sub = sub["id"].as_str().unwrap().to_string();
    let Some(AgentCommand::Subscribe(spec)) = c.node.agent_commands().last().cloned() else { panic!() };
    assert_eq!(spec.tracks[0].from.as_str(), id);
    assert_eq!(spec.at.participant.as_str(), bob.id);
    received(&mut bob);
    let ended = AgentEvent::SubscriptionEnded {
        room: ROOM.into(),
        participant: bob.id.as_str().into(),
        transport: spec.at.transport.clone(),
        subscription: sub.as_str().into(),
        reason: "gone".into(),
    };
    c.event(ended).await;
    // Its transport lives on: the subscriber hears of the session's end, as OWT says it.
    let got = received(&mut bob);
    assert!(
        got.iter().any(|(n, d)| n == "progress" && *d == json!({"id": spec.at.transport, "sessionId": sub, "status": "error", "data": "gone"})),
        "{got:?}"
    );
    assert_eq!(c.request(&mut bob, "unsubscribe", json!({"id": sub})).await, Err(format!("Subscription does NOT exist: {sub}")));
}

#[tokio::test(start_paused = true)]
async fn progress_reaches_only_the_transport_owner() {
    let c = controller(json!({}));
    let mut alice = c.join("alice", "presenter").await;
    let mut bob = c.join("bob", "viewer").await;
    let id = c.publish(&mut alice).await;
    received(&mut alice);
    received(&mut bob);
    let answer = Progress::Answer { sdp: "v=0\r\n".into() };
    c.event(AgentEvent::Progress { room: ROOM.into(), participant: alice.id.as_str().into(), transport: id.as_str().into(), progress: answer }).await;
    let got = received(&mut alice);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "progress");
    assert_eq!(got[0].1, json!({"id": id, "status": "soac", "data": {"type": "answer", "sdp": "v=0\r\n"}}));
    assert!(received(&mut bob).is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_leaving_publisher_takes_its_streams_and_the_empty_room_stops_its_views() {
    let c = controller(json!({}));
    let mut alice = c.join("alice", "presenter").await;
    let mut bob = c.join("bob", "viewer").await;
    let id = c.publish(&mut alice).await;
    c.stream_ready(&alice, &id).await;
    received(&mut bob);
    c.request(&mut alice, "logout", Value::Null).await.unwrap();
    settle().await;
    let events = received(&mut bob);
    assert!(events.iter().any(|(n, d)| n == "participant" && d["action"] == "leave" && d["data"] == alice.id.as_str()), "{events:?}");
    assert!(stream_events(&events).iter().any(|d| d["status"] == "remove" && d["id"] == id.as_str()), "{events:?}");
    let left = c.node.agent_commands().into_iter().any(|cmd| matches!(cmd, AgentCommand::ParticipantLeft(p) if p.participant.as_str() == alice.id));
    assert!(left, "the node is told to drop the participant's sessions");
    let unmixed = c.node.mixer_commands().into_iter().any(|m| matches!(m, MixCommand::Unmix(u) if u.stream.as_str() == id));
    assert!(unmixed, "the stream leaves its view");

    c.request(&mut bob, "logout", Value::Null).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stops: Vec<StopView> =
        c.node.mixer_commands().into_iter().filter_map(|m| if let MixCommand::StopView(s) = m { Some(s) } else { None }).collect();
    assert_eq!(stops, vec![StopView { room: ROOM.into(), view: "common".into() }], "each started view stopped once");
    assert_eq!(c.portal.participant_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_room_that_fills_up_refuses_the_next_login_and_keeps_the_token_usable() {
    let c = controller(json!({"participantLimit": 1}));
    let _alice = c.join("alice", "presenter").await;
    let (_, refused) = c.try_join("bob", "viewer").await;
    assert_eq!(refused, Err("Room is full".into()));
    assert_eq!(c.portal.participant_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_participant_returning_within_the_grace_period_keeps_the_views_running() {
    let c = controller(json!({}));
    let mut alice = c.join("alice", "presenter").await;
    c.request(&mut alice, "logout", Value::Null).await.unwrap();
    // Back within the 2 s the controller waits before stopping an empty room's views.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _again = c.join("alice", "presenter").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stopped = c.node.mixer_commands().into_iter().any(|m| matches!(m, MixCommand::StopView(_)));
    assert!(!stopped, "the room came back to life; its view must keep running");
}
