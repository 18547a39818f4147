//! Media nodes over NATS: the webrtc-agent, mixer and recorder of one node driven by the
//! portal of another, with the same typed commands as in one process.
//!
//! A node serves its parts on `tessera.node.<id>.media`, `.mix` and `.recorder` (and, with
//! an SFU or a mixer, `.ended`: what it ended of a placer's placements, see `placed.rs`): a request
//! is the command as JSON (`core::command`), the reply the result as JSON (`{"Ok": reply}`
//! or `{"Err": error}`), the header `Tessera-From` names the calling portal node and
//! `Tessera-Run` its run (`<node>/<instance>`: a node restarted under its id is another run). What
//! a media node reports back ([`AgentEvent`]s: negotiation progress, streams ready or
//! ended) goes to every portal node that sent commands for the event's room, on
//! `tessera.node.<portal>.events` (or straight into this process's portal when it is the
//! caller). Only control travels here; media never waits on NATS.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{Client, HeaderMap};
use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tessera_core::agent::{AgentError, AgentEvent};
use tessera_core::command::{
    AgentCommand, AgentReply, GetStats, MediaNode, MixCommand, MixError, MixNode, MixReply, RecorderCommand, RecorderNode, RecorderReply,
    RecordingError,
};
use tessera_core::typed_ids::RoomId;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::ClusterNode;

/// The header naming the node a command comes from.
pub const FROM_HEADER: &str = "Tessera-From";
/// The header naming the run (`<node>/<instance>`) of the node a command comes from.
pub const RUN_HEADER: &str = "Tessera-Run";

/// Who sends a command: a node, and its run (`None` from a node too old to say it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The node id.
    pub node: String,
    /// `<node>/<instance>`: changed by a restart.
    pub run: Option<String>,
}

impl Caller {
    /// Node `node`, telling no run (what a node may be asked without a placement: a probe,
    /// a relay export; and this node's own portal).
    pub fn node(node: &str) -> Caller {
        Caller { node: node.to_string(), run: None }
    }

    /// Run `instance` of node `node`.
    pub fn run(node: &str, instance: &str) -> Caller {
        Caller { node: node.to_string(), run: Some(crate::homes::run_of(node, instance)) }
    }

    /// A run as `<node>/<instance>` names it, or a bare node id (from a node too old to
    /// tell its run).
    pub fn parse(run: &str) -> Caller {
        match run.rsplit_once('/') {
            Some((node, _)) => Caller { node: node.to_string(), run: Some(run.to_string()) },
            None => Caller::node(run),
        }
    }

    /// Whether `other` is another run than this one: another node, or the same node
    /// restarted (runs are compared only where both tell theirs).
    pub fn is_other_than(&self, other: &Caller) -> bool {
        self.node != other.node || self.run.as_deref().zip(other.run.as_deref()).is_some_and(|(a, b)| a != b)
    }
}
/// How long a command may take on the remote node (negotiation included).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a media node looks for portals that left, to stop routing events to them.
const FORGET_CHECK: Duration = Duration::from_secs(10);
/// How long a stats request or a liveness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The subject a node's part listens on.
pub fn subject(node: &str, part: &str) -> String {
    format!("tessera.node.{node}.{part}")
}

/// Sends `command` from node `from` to node `to`'s part. Refused at once while this node
/// is not connected to NATS (the client would queue the command and send it on
/// reconnection, after the caller was told it failed), and bounded as a whole: the outer
/// error is what happened on this side, the inner one NATS's answer.
async fn send<C: Serialize>(
    client: &Client,
    from: &Caller,
    to: &str,
    part: &str,
    command: &C,
    limit: Duration,
) -> Result<Result<async_nats::Message, async_nats::RequestError>, String> {
    crate::bucket::connected(client)?;
    let payload = serde_json::to_vec(command).map_err(|e| e.to_string())?;
    let mut headers = HeaderMap::new();
    headers.insert(FROM_HEADER, from.node.as_str());
    if let Some(run) = &from.run {
        headers.insert(RUN_HEADER, run.as_str());
    }
    let request = async_nats::Request::new().payload(payload.into()).headers(headers).timeout(Some(limit));
    tokio::time::timeout(limit, client.send_request(subject(to, part), request)).await.map_err(|_| format!("no answer within {} s", limit.as_secs()))
}

/// Sends a command to a node's part and decodes its result.
pub(crate) async fn call<C: Serialize, R: DeserializeOwned, E: DeserializeOwned>(
    client: &Client,
    from: &Caller,
    to: &str,
    part: &str,
    command: &C,
    limit: Duration,
) -> Result<Result<R, E>, String> {
    let reply = send(client, from, to, part, command, limit).await?.map_err(|e| e.to_string())?;
    serde_json::from_slice(&reply.payload).map_err(|e| format!("unreadable reply: {e}"))
}

/// Whether node `to` serves its `part` (`media`, `mix`, `recorder`): `Some(false)` when
/// NATS says nobody listens there (the node is gone), `Some(true)` when it answers (even
/// with an error), `None` when that cannot be told (NATS away, or no answer in time).
pub async fn responds(client: &Client, from: &str, to: &str, part: &str) -> Option<bool> {
    let from = &Caller::node(from);
    let answer = match part {
        "mix" => {
            // A view no room has: answered with "no such view", which is an answer.
            let probe = MixCommand::GetLayout(tessera_core::command::GetLayout { room: "-".into(), view: "-".into() });
            send(client, from, to, part, &probe, PROBE_TIMEOUT).await
        }
        "recorder" => {
            let probe = RecorderCommand::ListRecordings(tessera_core::command::ListRecordings { room: "-".into() });
            send(client, from, to, part, &probe, PROBE_TIMEOUT).await
        }
        _ => send(client, from, to, "media", &AgentCommand::GetStats(GetStats), PROBE_TIMEOUT).await,
    };
    match answer {
        Ok(Ok(_)) => Some(true),
        Ok(Err(e)) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => Some(false),
        _ => None,
    }
}

/// What node `to` ended of `from`'s placements while `from` was away ([`crate::placed`]):
/// `None` when that cannot be told now, and when nobody answers for a node that `serves`
/// the question (an SFU or mixer whose own link is down for a moment); nothing when nobody
/// answers for one that does not.
pub(crate) async fn what_ended(
    client: &Client,
    from: &Caller,
    to: &str,
    question: crate::placed::WhatEnded,
    serves: bool,
) -> Option<crate::placed::EndedSince> {
    match send(client, from, to, "ended", &question, PROBE_TIMEOUT).await {
        Ok(Ok(reply)) => match serde_json::from_slice::<Result<crate::placed::EndedAnswer, String>>(&reply.payload) {
            Ok(Ok(answer)) => Some(answer.numbered(question)),
            Ok(Err(e)) => {
                debug!(node = %to, error = %e, "a node could not say what it ended");
                None
            }
            Err(e) => {
                warn!(node = %to, error = %e, "an unreadable answer to what a node ended");
                None
            }
        },
        Ok(Err(e)) if e.kind() == async_nats::client::RequestErrorKind::NoResponders && !serves => Some(crate::placed::EndedSince::default()),
        _ => None,
    }
}

/// Declares a proxy for one kind of node: commands go over NATS to the node `to`.
macro_rules! remote {
    ($(#[$doc:meta])* $Name:ident: $Node:ident, $Command:ty, $Reply:ty, $Error:ident, $part:literal, $what:literal) => {
        $(#[$doc])*
        pub struct $Name {
            client: Client,
            from: Caller,
            to: String,
        }

        impl $Name {
            /// A proxy for node `to`'s part, called by `from`.
            pub fn new(client: Client, from: Caller, to: &str) -> Self {
                $Name { client, from, to: to.to_string() }
            }
        }

        #[async_trait::async_trait]
        impl $Node for $Name {
            async fn handle(&self, command: $Command) -> Result<$Reply, $Error> {
                // Stats are asked of every node at once: a hung one must not hold them up.
                let limit = if command.name() == "GetStats" { PROBE_TIMEOUT } else { CALL_TIMEOUT };
                call(&self.client, &self.from, &self.to, $part, &command, limit)
                    .await
                    .map_err(|e| $Error::Failed(format!(concat!($what, " node `{}` did not answer {}: {}"), self.to, command.name(), e)))?
            }
        }
    };
}

remote!(
    /// A webrtc node (SFU) of another process.
    RemoteMedia: MediaNode, AgentCommand, AgentReply, AgentError, "media", "webrtc"
);
remote!(
    /// A mixer of another process.
    RemoteMixer: MixNode, MixCommand, MixReply, MixError, "mix", "mixer"
);
remote!(
    /// A recorder of another process.
    RemoteRecorder: RecorderNode, RecorderCommand, RecorderReply, RecordingError, "recorder", "recorder"
);

/// Which portal nodes sent commands for which room, so events reach them.
#[derive(Default)]
pub struct EventRoutes {
    origins: Mutex<HashMap<RoomId, HashSet<String>>>,
}

impl EventRoutes {
    fn note(&self, room: &RoomId, from: &str) {
        let mut o = self.origins.lock().unwrap_or_else(|p| p.into_inner());
        if !o.get(room).is_some_and(|s| s.contains(from)) {
            o.entry(room.clone()).or_default().insert(from.to_string());
        }
    }

    fn of(&self, room: &RoomId) -> Vec<String> {
        self.origins.lock().unwrap_or_else(|p| p.into_inner()).get(room).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    /// Forgets portals in `gone` (no longer in the cluster), and rooms left with none.
    fn forget(&self, gone: &HashSet<String>) {
        self.origins.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, portals| {
            portals.retain(|p| !gone.contains(p));
            !portals.is_empty()
        });
    }

    fn portals(&self) -> HashSet<String> {
        self.origins.lock().unwrap_or_else(|p| p.into_inner()).values().flatten().cloned().collect()
    }
}

/// Serves one part on its subject: each request decoded, handled by `handle` (told the
/// caller's node id), and answered; a request that does not decode is answered with
/// `bad`'s error, never dropped silently.
pub(crate) async fn serve_part<C, R, E, F, Fut>(client: Client, subject: String, handle: F, bad: fn(String) -> E)
where
    C: DeserializeOwned + Send + 'static,
    R: Serialize + Send + 'static,
    E: Serialize + Send + 'static,
    F: Fn(C, Option<Caller>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<R, E>> + Send,
{
    let Some(mut requests) = subscribe_or_warn(&client, &subject, "cannot serve this node's part over NATS").await else { return };
    while let Some(msg) = requests.next().await {
        let Some(reply_to) = msg.reply.clone() else { continue };
        let from = msg.headers.as_ref().and_then(|h| {
            let node = h.get(FROM_HEADER)?.as_str().to_string();
            Some(Caller { node, run: h.get(RUN_HEADER).map(|v| v.as_str().to_string()) })
        });
        let (client, handle) = (client.clone(), handle.clone());
        // One task per request: a slow command (an SDP negotiation) must not hold up others.
        tokio::spawn(async move {
            let out: Result<R, E> = match serde_json::from_slice::<C>(&msg.payload) {
                Ok(command) => handle(command, from).await,
                Err(e) => Err(bad(format!("malformed command: {e}"))),
            };
            let bytes = serde_json::to_vec(&out).or_else(|e| {
                // The caller gets an error rather than waiting out its timeout.
                warn!(error = %e, "a reply could not be encoded");
                serde_json::to_vec(&Err::<R, E>(bad(format!("the reply could not be encoded: {e}"))))
            });
            match bytes {
                Ok(bytes) => {
                    if let Err(e) = client.publish(reply_to, bytes.into()).await {
                        debug!(error = %e, "a reply could not be sent");
                    }
                }
                Err(e) => warn!(error = %e, "an error reply could not be encoded either"),
            }
        });
    }
}

/// This node's parts as other nodes reach them.
pub struct Served {
    /// The SFU, if this node has the webrtc role.
    pub media: Option<Arc<dyn MediaNode>>,
    /// The mixer, if it has the mixer role.
    pub mixer: Option<Arc<dyn MixNode>>,
    /// The recorder, if it has the recorder role.
    pub recorder: Option<Arc<dyn RecorderNode>>,
}

/// Serves `parts` of `node` over NATS and delivers the events of its media nodes
/// (`events`) to the portals that asked for them: over NATS, or into `local` when the
/// portal is this node's own. Portals that left the cluster are forgotten. Returns the
/// parts as this node's own portal is to call them (its SFU's sessions and its mixer's
/// views noted as this node's, so that what a dead home placed here can be told apart and
/// ended: `placed.rs`).
pub fn serve(node: &Arc<ClusterNode>, parts: Served, events: Option<mpsc::Receiver<AgentEvent>>, local: Option<mpsc::Sender<AgentEvent>>) -> Served {
    let (client, me) = (node.client(), node.id());
    let me = me.as_str();
    let placed = Arc::new(crate::placed::Placed::new(me));
    let sweep_on = crate::placed::Parts { media: parts.media.clone(), mixer: parts.mixer.clone() };
    let sweep_on_any = sweep_on.media.is_some() || sweep_on.mixer.is_some();
    if sweep_on_any {
        crate::placed::sweep(placed.clone(), Arc::downgrade(node), client.clone(), sweep_on);
    }
    let own = Served {
        media: parts.media.clone().map(|inner| Arc::new(crate::placed::Noted { inner, placed: placed.clone() }) as Arc<dyn MediaNode>),
        mixer: parts.mixer.clone().map(|inner| Arc::new(crate::placed::NotedMix { inner, placed: placed.clone() }) as Arc<dyn MixNode>),
        recorder: parts.recorder.clone(),
    };
    let routes = Arc::new(EventRoutes::default());
    {
        let (routes, node) = (Arc::downgrade(&routes), Arc::downgrade(node));
        tokio::spawn(async move {
            // Missing from two lists in a row (a list read just after a NATS restart may
            // not hold every node yet).
            let mut missing_once = HashSet::new();
            loop {
                tokio::time::sleep(FORGET_CHECK).await;
                let (Some(routes), Some(node)) = (routes.upgrade(), node.upgrade()) else { return };
                let live: HashSet<String> = node.known_nodes().into_iter().map(|n| n.id).collect();
                let missing: HashSet<String> = routes.portals().into_iter().filter(|p| !live.contains(p)).collect();
                let gone: HashSet<String> = missing.intersection(&missing_once).cloned().collect();
                routes.forget(&gone);
                missing_once = missing;
            }
        });
    }
    if let Some(media) = parts.media {
        let (routes, placed) = (routes.clone(), placed.clone());
        let handle = move |c: AgentCommand, from: Option<Caller>| {
            let (media, routes, placed) = (media.clone(), routes.clone(), placed.clone());
            async move {
                let Some(from) = from.filter(|_| c.room().is_some()) else { return media.handle(c).await };
                if let Some(room) = c.room() {
                    routes.note(room, &from.node);
                }
                let placing = placed.note(&c, &from);
                let out = media.handle(c).await;
                if out.is_ok() {
                    placed.noted_after(placing, &from);
                }
                out
            }
        };
        tokio::spawn(serve_part(client.clone(), subject(me, "media"), handle, AgentError::Rejected));
    }
    if let Some(mixer) = parts.mixer {
        let (routes, placed) = (routes.clone(), placed.clone());
        let handle = move |c: MixCommand, from: Option<Caller>| {
            let (mixer, routes, placed) = (mixer.clone(), routes.clone(), placed.clone());
            async move {
                let Some(from) = from else { return mixer.handle(c).await };
                routes.note(c.room(), &from.node);
                let placing = placed.note_mix(&c, &from);
                let out = mixer.handle(c).await;
                if out.is_ok() {
                    placed.noted_after(placing, &from);
                }
                out
            }
        };
        tokio::spawn(serve_part(client.clone(), subject(me, "mix"), handle, MixError::Failed));
    }
    if sweep_on_any {
        // What the sweep ended, told to its placer (a home back from a NATS outage).
        let placed = placed.clone();
        let handle = move |question: crate::placed::WhatEnded, from: Option<Caller>| {
            let placed = placed.clone();
            async move { Ok::<_, String>(from.map_or(crate::placed::EndedAnswer::Once(Vec::new()), |from| placed.answer(&from, question))) }
        };
        tokio::spawn(serve_part(client.clone(), subject(me, "ended"), handle, std::convert::identity));
    }
    if let Some(recorder) = parts.recorder {
        let handle = move |c: RecorderCommand, _from: Option<Caller>| {
            let recorder = recorder.clone();
            async move { recorder.handle(c).await }
        };
        tokio::spawn(serve_part(client.clone(), subject(me, "recorder"), handle, RecordingError::Rejected));
    }
    if let Some(mut events) = events {
        let me = me.to_string();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let remote: Vec<String> = routes.of(event.room()).into_iter().filter(|to| *to != me).collect();
                let payload = (!remote.is_empty()).then(|| serde_json::to_vec(&event).unwrap_or_default());
                // This node's own portal first (it calls its parts directly, not over NATS,
                // so it is not among the origins; it ignores events of rooms and people it
                // does not hold): nothing of this node waits on NATS.
                if let Some(local) = &local {
                    let _ = local.send(event).await;
                }
                let Some(payload) = payload else { continue };
                // While NATS is away the client would queue events until it blocks; they
                // are stale by the time it is back, so they are dropped instead.
                if crate::bucket::connected(&client).is_err() {
                    debug!(portals = remote.len(), "NATS away: an event for other portals dropped");
                    continue;
                }
                for to in remote {
                    if let Err(e) = client.publish(subject(&to, "events"), payload.clone().into()).await {
                        debug!(to = %to, error = %e, "an event could not be sent");
                    }
                }
            }
        });
    }
    own
}

/// A subscription to `subject`, or `None` with `what` logged (the node goes on without it).
async fn subscribe_or_warn(client: &Client, subject: &str, what: &str) -> Option<async_nats::Subscriber> {
    match client.subscribe(subject.to_string()).await {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(subject = %subject, error = %e, "{what}");
            None
        }
    }
}

/// Receives the events media nodes send this portal node and hands them to `portal`.
pub fn receive_events(client: Client, me: &str, portal: mpsc::Sender<AgentEvent>) {
    let subject = subject(me, "events");
    tokio::spawn(async move {
        let Some(mut events) = subscribe_or_warn(&client, &subject, "cannot receive media events over NATS").await else { return };
        while let Some(msg) = events.next().await {
            match serde_json::from_slice::<AgentEvent>(&msg.payload) {
                Ok(event) => {
                    if portal.send(event).await.is_err() {
                        return;
                    }
                }
                Err(e) => warn!(error = %e, "an unreadable media event was dropped"),
            }
        }
    });
}
