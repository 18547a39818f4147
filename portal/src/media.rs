//! Stream and subscription requests (`publish`, `unpublish`, `stream-control`,
//! `subscribe`, `unsubscribe`, `subscription-control`, `soac`): validated here
//! (permissions, ownership, limits, payload shapes), then handed to the media agent.
//! Also the handling of the agent's events (`progress`, stream ready/ended).
//!
//! Transport ids follow OWT 1.2: a request without `transport.id` opens a new transport
//! whose id is the new session's id; a request naming one of the participant's
//! transports adds the session to it (one RTCPeerConnection renegotiated per request).

use std::collections::HashSet;

use serde_json::{Value, json};
use tessera_core::agent::{
    AgentEvent, LayerChoice, MediaKind, Progress, PublishSpec, PublishTrack, SessionRef, Signaling, SubscribeSpec, SubscribeTrack, TrackSwitch,
    TransportRef,
};
use tessera_core::command::{EndSession, MediaNode, ParticipantLeft, SelectLayer, Signal, SwitchTracks};
use tessera_core::hooks::Hook;
use tessera_core::stream::{StreamInfo, StreamKind, TrackStatus};
use tracing::{debug, info, warn};

use crate::Portal;

/// Whether a session id is a publication or a subscription (for ownership checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionKind {
    Publication,
    Subscription,
}

type Reply = Result<Option<Value>, String>;

fn str_field<'a>(v: &'a Value, name: &str, request: &str) -> Result<&'a str, String> {
    v.get(name).and_then(Value::as_str).ok_or_else(|| format!("{request}: `{name}` must be a string"))
}

fn data<'a>(request: &str, args: &'a [Value]) -> Result<&'a Value, String> {
    match args.first() {
        Some(v @ Value::Object(_)) => Ok(v),
        Some(_) => Err(format!("{request}: invalid request data: expected an object")),
        None => Err(format!("{request}: missing request data")),
    }
}

/// What a subscriber's `from` names: a stream id, or one of its tracks' ids
/// (`<stream>-<kind>`, `<stream>-video-<rid>` for a simulcast layer; see `wire::track_json`).
/// Returns the stream and the layer's RID.
fn resolve_from<'a>(streams: &'a [StreamInfo], from: &str) -> Option<(&'a StreamInfo, Option<String>)> {
    if let Some(s) = streams.iter().find(|s| s.id.as_str() == from) {
        return Some((s, None));
    }
    streams.iter().find_map(|s| {
        let rest = from.strip_prefix(s.id.as_str())?.strip_prefix('-')?;
        if rest == "audio" || rest == "video" {
            return Some((s, None));
        }
        let rid = rest.strip_prefix("video-")?;
        s.tracks.iter().any(|t| t.rid.as_deref() == Some(rid)).then(|| (s, Some(rid.to_string())))
    })
}

/// `parameters.resolution` of a subscribe track or update, when given.
fn requested_resolution(parameters: Option<&Value>, at: &str) -> Result<Option<(u32, u32)>, String> {
    let Some(r) = parameters.filter(|p| !p.is_null()).and_then(|p| p.get("resolution")).filter(|r| !r.is_null()) else { return Ok(None) };
    let dim = |name: &str| r.get(name).and_then(Value::as_u64).and_then(|v| u32::try_from(v).ok()).filter(|v| *v > 0);
    match (dim("width"), dim("height")) {
        (Some(w), Some(h)) => Ok(Some((w, h))),
        _ => Err(format!("{at}.parameters.resolution must be {{width, height}} in pixels")),
    }
}

/// A subscription's `parameters.bitrate`: OWT's multiplier of the stream's bit rate
/// (`"x0.6"`), as thousandths; above 1 is the whole stream (the SFU does not transcode up).
fn requested_bitrate(parameters: Option<&Value>, at: &str) -> Result<Option<u32>, String> {
    let Some(b) = parameters.filter(|p| !p.is_null()).and_then(|p| p.get("bitrate")).filter(|b| !b.is_null()) else { return Ok(None) };
    let share = b.as_str().and_then(|s| s.strip_prefix('x')).and_then(|f| f.parse::<f64>().ok()).filter(|f| f.is_finite() && *f > 0.0);
    match share {
        // At least one thousandth: "x0.0001" is a share, not nothing.
        Some(f) => Ok(Some((f.min(1.0) * 1000.0).round().max(1.0) as u32)),
        None => Err(format!("{at}.parameters.bitrate must be a multiplier of the stream's bit rate, such as \"x0.6\"")),
    }
}

/// What a subscriber asks of a video's picture: a resolution, a bit rate multiplier.
type Wanted = (Option<(u32, u32)>, Option<u32>);

/// Reads a track's `parameters` (resolution and bitrate).
fn wanted(parameters: Option<&Value>, at: &str) -> Result<Wanted, String> {
    Ok((requested_resolution(parameters, at)?, requested_bitrate(parameters, at)?))
}

/// The layer a subscriber asks for: a RID (by track id), else the layer nearest a
/// resolution, else the one nearest a bit rate, else the server's pick; only a simulcast
/// video has layers (on others, the SFU does not transcode: parameters change nothing).
fn layer_choice(stream: &StreamInfo, kind: MediaKind, rid: Option<String>, (resolution, bitrate): Wanted) -> LayerChoice {
    if kind != MediaKind::Video || !stream.tracks.iter().any(|t| t.rid.is_some()) {
        return LayerChoice::Auto;
    }
    match (rid, resolution, bitrate) {
        (Some(rid), _, _) => LayerChoice::Rid(rid),
        (None, Some((width, height)), _) => LayerChoice::Resolution { width, height },
        (None, None, Some(permille)) => LayerChoice::Bitrate { permille },
        (None, None, None) => LayerChoice::Auto,
    }
}

fn kind_of(v: &Value, at: &str) -> Result<MediaKind, String> {
    match v.get("type").and_then(Value::as_str) {
        Some("audio") => Ok(MediaKind::Audio),
        Some("video") => Ok(MediaKind::Video),
        _ => Err(format!("{at}.type must be \"audio\" or \"video\"")),
    }
}

/// The transport a request names (`transport.id`), or none for a new one.
fn transport_of(request: &str, d: &Value) -> Result<Option<String>, String> {
    match d.get("transport") {
        None | Some(Value::Null) => Ok(None),
        Some(t) => {
            if let Some(ty) = t.get("type")
                && ty != "webrtc"
            {
                return Err(format!("{request}: transport.type must be \"webrtc\""));
            }
            match t.get("id") {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if tessera_core::ids::is_valid_id(s) => Ok(Some(s.clone())),
                Some(_) => Err(format!("{request}: transport.id must be an id string")),
            }
        }
    }
}

impl Portal {
    fn agent(&self, room: &str, request: &str) -> Result<std::sync::Arc<dyn MediaNode>, String> {
        self.inner.router.agent_for(&room.into()).ok_or_else(|| format!("{request}: no WebRTC agent is running on this server"))
    }

    /// Handles one stream/subscription request of a participant in `room`.
    pub(crate) async fn media_request(&self, room: &str, participant: &str, name: &str, args: &[Value]) -> Reply {
        if self.is_draining() && (name == "publish" || name == "subscribe") {
            return Err(format!("{name}: the server is draining: no new sessions"));
        }
        match name {
            "publish" => self.publish(room, participant, args).await,
            "unpublish" => self.end(room, participant, "unpublish", args, SessionKind::Publication).await,
            "subscribe" => self.subscribe(room, participant, args).await,
            "unsubscribe" => self.end(room, participant, "unsubscribe", args, SessionKind::Subscription).await,
            "soac" => self.soac(room, participant, args).await,
            "stream-control" => self.stream_control(room, participant, args).await,
            "subscription-control" => self.subscription_control(room, participant, args).await,
            _ => Err(format!("Unknown request: {name}")),
        }
    }

    async fn publish(&self, room: &str, participant: &str, args: &[Value]) -> Reply {
        let d = data("publish", args)?;
        let mut tracks = Vec::new();
        match d.get("media") {
            None | Some(Value::Null) => {}
            Some(media) => {
                let list = media.get("tracks").and_then(Value::as_array).ok_or("publish: request.media.tracks must be an array")?;
                for (i, t) in list.iter().enumerate() {
                    let at = format!("publish: request.media.tracks[{i}]");
                    let kind = kind_of(t, &at)?;
                    let mid = t.get("mid").and_then(Value::as_str).ok_or(format!("{at}.mid must be a string"))?;
                    let source = t.get("source").and_then(Value::as_str).unwrap_or(match kind {
                        MediaKind::Audio => "mic",
                        MediaKind::Video => "camera",
                    });
                    // OWT's protocol 1.2 sources, for either kind (its 1.0 schema split them).
                    const SOURCES: [&str; 5] = ["mic", "camera", "screen-cast", "raw-file", "encoded-file"];
                    if !SOURCES.contains(&source) {
                        return Err(format!("{at}.source `{source}` is not one of {}", SOURCES.join(", ")));
                    }
                    tracks.push(PublishTrack { kind, mid: mid.to_string(), source: source.to_string() });
                }
            }
        }
        let wants_data = d.get("data").and_then(Value::as_bool).unwrap_or(false);
        if tracks.is_empty() && !wants_data {
            return Err("publish: nothing to publish (no media tracks and no data)".into());
        }
        if tracks.iter().filter(|t| t.kind == MediaKind::Audio).count() > 1 || tracks.iter().filter(|t| t.kind == MediaKind::Video).count() > 1 {
            return Err("publish: at most one audio and one video track per publication".into());
        }
        let attributes = d.get("attributes").cloned().unwrap_or(json!({}));
        if !attributes.is_object() {
            return Err("publish: attributes must be an object".into());
        }
        let transport = transport_of("publish", d)?;
        let room_cfg = self.inner.store.get(room).ok_or("Room not found")?;
        let session = tessera_core::ids::session_id();
        let agent;
        let transport = {
            let mut conf = self.lock();
            let r = conf.rooms.get_mut(room).ok_or("Illegal request")?;
            let pending: usize = r.participants.iter().map(|p| p.pending_publications()).sum();
            let inputs = r.streams.iter().filter(|s| s.is_forward()).count() + pending;
            let p = r.participant_mut(participant).ok_or("Illegal request")?;
            permitted(p.info.permission.publish, tracks.iter().map(|t| t.kind))?;
            if room_cfg.input_limit >= 0 && inputs as i64 >= room_cfg.input_limit {
                return Err("Too many inputs".into());
            }
            // OWT's answers (spelling included, and after the two above, as OWT checks)
            // when the room accepts no codec of that kind.
            if tracks.iter().any(|t| t.kind == MediaKind::Audio) && room_cfg.media_in.audio.is_empty() {
                return Err("Audio is forbiden".into());
            }
            if tracks.iter().any(|t| t.kind == MediaKind::Video) && room_cfg.media_in.video.is_empty() {
                return Err("Video is forbiden".into());
            }
            agent = self.agent(room, "publish")?;
            let transport = p.open_session(transport, &session, SessionKind::Publication)?;
            p.kinds.insert(session.as_str().into(), tracks.iter().map(|t| t.kind).collect());
            p.attributes.insert(session.as_str().into(), attributes);
            transport
        };
        let at =
            SessionRef { room: room.into(), participant: participant.into(), transport: transport.as_str().into(), session: session.as_str().into() };
        if let Err(e) = agent.call(PublishSpec { at, tracks, data: wants_data, accept: Some(room_cfg.media_in.clone()) }).await {
            self.forget_session(room, participant, &session);
            return Err(e.to_string());
        }
        info!(room, participant, publication = %session, transport = %transport, "publication started");
        Ok(Some(json!({"id": session, "transportId": transport})))
    }

    async fn subscribe(&self, room: &str, participant: &str, args: &[Value]) -> Reply {
        let d = data("subscribe", args)?;
        let mut asked = Vec::new();
        if let Some(media) = d.get("media").filter(|m| !m.is_null()) {
            let list = media.get("tracks").and_then(Value::as_array).ok_or("subscribe: request.media.tracks must be an array")?;
            for (i, t) in list.iter().enumerate() {
                let at = format!("subscribe: request.media.tracks[{i}]");
                let kind = kind_of(t, &at)?;
                let mid = t.get("mid").and_then(Value::as_str).ok_or(format!("{at}.mid must be a string"))?;
                let from = t.get("from").and_then(Value::as_str).ok_or(format!("{at}.from must be a stream id"))?;
                let wanted = wanted(t.get("parameters"), &at)?;
                asked.push((kind, mid.to_string(), from.to_string(), wanted));
            }
        }
        let mut tracks = Vec::new();
        let data_from = match d.get("data") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => None,
            Some(v) => Some(str_field(v, "from", "subscribe: data")?.to_string()),
        };
        if asked.is_empty() && data_from.is_none() {
            return Err("subscribe: nothing to subscribe to (no media tracks and no data)".into());
        }
        let transport = transport_of("subscribe", d)?;
        let session = tessera_core::ids::session_id();
        let agent;
        let transport = {
            let mut conf = self.lock();
            let r = conf.rooms.get_mut(room).ok_or("Illegal request")?;
            for (kind, mid, from, wanted) in asked {
                let Some((stream, rid)) = resolve_from(&r.streams, &from) else {
                    return Err(format!("Stream does NOT exist: {from}"));
                };
                if !stream.has(kind) || (rid.is_some() && kind != MediaKind::Video) {
                    return Err(format!("Stream {} has no {} track {from}", stream.id, kind.as_str()));
                }
                let layer = layer_choice(stream, kind, rid, wanted);
                tracks.push(SubscribeTrack { kind, mid, from: stream.id.clone(), layer });
            }
            if let Some(from) = &data_from
                && !r.stream(from.as_str()).is_some_and(|s| s.data)
            {
                return Err(format!("Stream {from} has no data channel"));
            }
            let p = r.participant_mut(participant).ok_or("Illegal request")?;
            permitted(p.info.permission.subscribe, tracks.iter().map(|t| t.kind))?;
            agent = self.agent(room, "subscribe")?;
            let transport = p.open_session(transport, &session, SessionKind::Subscription)?;
            p.kinds.insert(session.as_str().into(), tracks.iter().map(|t| t.kind).collect());
            p.reads.insert(session.as_str().into(), tracks.iter().map(|t| (t.kind, t.from.clone())).collect());
            transport
        };
        let at =
            SessionRef { room: room.into(), participant: participant.into(), transport: transport.as_str().into(), session: session.as_str().into() };
        if let Err(e) = agent.call(SubscribeSpec { at, tracks, data_from: data_from.map(Into::into) }).await {
            self.forget_session(room, participant, &session);
            return Err(e.to_string());
        }
        info!(room, participant, subscription = %session, transport = %transport, "subscription started");
        Ok(Some(json!({"id": session, "transportId": transport})))
    }

    async fn soac(&self, room: &str, participant: &str, args: &[Value]) -> Reply {
        let d = data("soac", args)?;
        let transport = str_field(d, "id", "soac")?;
        let sig = d.get("signaling").filter(|s| s.is_object()).ok_or("soac: `signaling` must be an object")?;
        let signaling = match sig.get("type").and_then(Value::as_str) {
            Some("offer") => Signaling::Offer(str_field(sig, "sdp", "soac: signaling")?.to_string()),
            Some("candidate") => {
                let c = sig.get("candidate").ok_or("soac: signaling.candidate missing")?;
                let line = str_field(c, "candidate", "soac: signaling.candidate")?;
                // OWT clients prefix candidates with "a="; the agent wants the bare line.
                let line = line.trim().strip_prefix("a=").unwrap_or(line.trim());
                Signaling::Candidate {
                    candidate: line.to_string(),
                    sdp_mid: c.get("sdpMid").and_then(Value::as_str).map(str::to_string),
                    sdp_mline_index: c.get("sdpMLineIndex").and_then(Value::as_u64).and_then(|i| u16::try_from(i).ok()),
                }
            }
            Some("removed-candidates") => Signaling::RemovedCandidates,
            Some("answer") => return Err("soac: the server makes the answers; send an offer".into()),
            _ => return Err("soac: signaling.type must be offer, candidate or removed-candidates".into()),
        };
        {
            let conf = self.lock();
            let owns = conf.room(room).and_then(|r| r.participant(participant)).is_some_and(|p| p.transports.contains(transport));
            if !owns {
                return Err(format!("Transport does NOT exist: {transport}"));
            }
        }
        let agent = self.agent(room, "soac")?;
        let at = TransportRef { room: room.into(), participant: participant.into(), transport: transport.into() };
        agent.call(Signal { at, signaling }).await.map_err(|e| e.to_string())?;
        Ok(None)
    }

    async fn end(&self, room: &str, participant: &str, request: &str, args: &[Value], kind: SessionKind) -> Reply {
        let d = data(request, args)?;
        let id = str_field(d, "id", request)?.to_string();
        let owned = {
            let conf = self.lock();
            conf.room(room).and_then(|r| r.participant(participant)).and_then(|p| p.sessions.get(id.as_str())).is_some_and(|s| *s == kind)
        };
        if !owned {
            return Err(match kind {
                SessionKind::Publication => format!("Publication does NOT exist: {id}"),
                SessionKind::Subscription => format!("Subscription does NOT exist: {id}"),
            });
        }
        if let Some(agent) = self.inner.router.agent_for(&room.into()) {
            let end = EndSession { room: room.into(), participant: participant.into(), session: id.as_str().into() };
            if let Err(e) = agent.call(end).await {
                debug!(room, participant, session = %id, error = %e, "ending a session on the agent");
            }
        }
        self.forget_session(room, participant, &id);
        if kind == SessionKind::Publication {
            self.remove_stream(room, &id, "unpublished");
        }
        Ok(None)
    }

    async fn stream_control(&self, room: &str, participant: &str, args: &[Value]) -> Reply {
        let d = data("stream-control", args)?;
        let id = str_field(d, "id", "stream-control")?.to_string();
        let op = str_field(d, "operation", "stream-control")?;
        let (is_owner, exists, mixed) = {
            let conf = self.lock();
            let r = conf.room(room);
            let stream = r.and_then(|r| r.stream(&id));
            let owner = stream.and_then(|s| s.owner()).is_some_and(|o| o == participant);
            let admin = r.and_then(|r| r.participant(participant)).is_some_and(|p| p.info.role == "admin");
            (owner || admin, stream.is_some(), stream.is_some_and(|s| !s.is_forward()))
        };
        if !exists {
            return Err(format!("Stream does NOT exist: {id}"));
        }
        match op {
            "pause" | "play" => {
                if mixed {
                    return Err("Stream is Mixed".into());
                }
                if !is_owner {
                    return Err("unauthorized".into());
                }
                let switch = track_switch(d, op == "play", "stream-control")?;
                // The stream is its owner's, also when an admin acts: the owner's rights,
                // held tracks and session.
                let owner = {
                    let conf = self.lock();
                    conf.room(room).and_then(|r| r.stream(&id)).and_then(|s| s.owner()).map_or(participant.to_string(), ToString::to_string)
                };
                // Not beside a permission change: a play must not slip past a revocation.
                let _one = self.switch_lock(room).await;
                self.may_switch(room, &owner, &id, SessionKind::Publication, switch)?;
                let agent = self.agent(room, "stream-control")?;
                let command = SwitchTracks { room: room.into(), participant: owner.as_str().into(), session: id.as_str().into(), switch };
                agent.call(command).await.map_err(|e| e.to_string())?;
                self.switched(room, &owner, &id, SessionKind::Publication, switch);
                self.set_track_status(room, &id, switch);
                Ok(Some(json!("ok")))
            }
            "mix" | "unmix" | "set-region" if mixed => Err(format!("stream-control: `{op}` applies to forward streams")),
            "mix" | "unmix" | "get-region" | "set-region" => {
                if !is_owner {
                    return Err("unauthorized".into());
                }
                self.mix_control(room, &id, op, d.get("data")).await
            }
            other => Err(format!("stream-control: unknown operation `{other}`")),
        }
    }

    async fn subscription_control(&self, room: &str, participant: &str, args: &[Value]) -> Reply {
        let d = data("subscription-control", args)?;
        let id = str_field(d, "id", "subscription-control")?.to_string();
        let op = str_field(d, "operation", "subscription-control")?;
        let owned = {
            let conf = self.lock();
            conf.room(room)
                .and_then(|r| r.participant(participant))
                .and_then(|p| p.sessions.get(id.as_str()))
                .is_some_and(|s| *s == SessionKind::Subscription)
        };
        if !owned {
            return Err(format!("Subscription does NOT exist: {id}"));
        }
        match op {
            "pause" | "play" => {
                let switch = track_switch(d, op == "play", "subscription-control")?;
                let _one = self.switch_lock(room).await;
                self.may_switch(room, participant, &id, SessionKind::Subscription, switch)?;
                let agent = self.agent(room, "subscription-control")?;
                let command = SwitchTracks { room: room.into(), participant: participant.into(), session: id.as_str().into(), switch };
                agent.call(command).await.map_err(|e| e.to_string())?;
                self.switched(room, participant, &id, SessionKind::Subscription, switch);
                Ok(None)
            }
            "update" => self.update_subscription(room, participant, &id, d.get("data").unwrap_or(&Value::Null)).await,
            other => Err(format!("subscription-control: unknown operation `{other}`")),
        }
    }

    /// `subscription-control update`: another simulcast layer of the same stream (OWT:
    /// `video.from` naming a layer's track, or `video.parameters.resolution`). The source
    /// stream stays; nothing is transcoded.
    async fn update_subscription(&self, room: &str, participant: &str, id: &str, update: &Value) -> Reply {
        const REQUEST: &str = "subscription-control: update";
        if !update.is_object() {
            return Err(format!("{REQUEST}: `data` must be an object"));
        }
        let choice = {
            let conf = self.lock();
            let r = conf.room(room).ok_or("Illegal request")?;
            let reads = r.participant(participant).and_then(|p| p.reads.get(id)).cloned().unwrap_or_default();
            let read = |kind: MediaKind| reads.iter().find(|(k, _)| *k == kind).map(|(_, s)| s.clone());
            if let Some(audio) = update.get("audio").filter(|a| !a.is_null()) {
                let from = audio.get("from").and_then(Value::as_str);
                let current = read(MediaKind::Audio);
                if from.is_some_and(|f| resolve_from(&r.streams, f).is_none_or(|(s, _)| Some(&s.id) != current.as_ref())) {
                    return Err(format!("{REQUEST} cannot change the source stream of audio; subscribe again"));
                }
            }
            let Some(video) = update.get("video").filter(|v| !v.is_null()) else { return Ok(None) };
            let Some(current) = read(MediaKind::Video) else { return Err(format!("{REQUEST}: subscription {id} has no video")) };
            let Some(stream) = r.stream(current.as_str()) else { return Err(format!("Stream does NOT exist: {current}")) };
            let rid = match video.get("from").and_then(Value::as_str) {
                None => None,
                Some(from) => match resolve_from(&r.streams, from) {
                    Some((s, rid)) if s.id == current => rid,
                    Some(_) => return Err(format!("{REQUEST} cannot change the source stream ({from}); subscribe again")),
                    None => return Err(format!("Stream does NOT exist: {from}")),
                },
            };
            let (resolution, bitrate) = wanted(video.get("parameters"), REQUEST)?;
            let layered = stream.tracks.iter().any(|t| t.rid.is_some());
            if !layered && (rid.is_some() || resolution.is_some()) {
                return Err(format!("{REQUEST}: stream {current} has no simulcast layers to choose from (the SFU does not transcode)"));
            }
            if !layered {
                return Ok(None);
            }
            // Other parameters alone (frame rate, keyframe interval: not transcoded) leave
            // the layer as it is.
            if video.get("from").is_none() && resolution.is_none() && bitrate.is_none() {
                return Ok(None);
            }
            layer_choice(stream, MediaKind::Video, rid, (resolution, bitrate))
        };
        let agent = self.agent(room, "subscription-control")?;
        let command = SelectLayer { room: room.into(), participant: participant.into(), session: id.into(), layer: choice };
        agent.call(command).await.map_err(|e| e.to_string())?;
        Ok(None)
    }

    fn forget_session(&self, room: &str, participant: &str, session: &str) {
        let mut conf = self.lock();
        if let Some(p) = conf.rooms.get_mut(room).and_then(|r| r.participant_mut(participant)) {
            p.forget(session);
        }
    }

    /// Removes a stream from the room and tells everyone.
    pub(crate) fn remove_stream(&self, room: &str, stream: &str, reason: &str) {
        let notify = self.inner.store.get(room).map(|r| r.notifying.stream_change).unwrap_or(true);
        let mut conf = self.lock();
        let Some(r) = conf.rooms.get_mut(room) else { return };
        let Some(idx) = r.streams.iter().position(|s| s.id == stream) else { return };
        let removed = r.streams.remove(idx);
        info!(room, stream, reason, "stream removed");
        if notify {
            conf.broadcast(room, None, "stream", &json!({"id": stream, "status": "remove"}));
        }
        self.hook(|| Hook::StreamUnpublished { room: room.into(), stream: stream.into(), reason: reason.into() });
        drop(conf);
        let views: Vec<String> = match &removed.kind {
            StreamKind::Forward(f) => f.in_views.iter().map(ToString::to_string).collect(),
            StreamKind::Mixed(_) => Vec::new(),
        };
        if !views.is_empty() {
            let (portal, room, stream) = (self.clone(), room.to_string(), stream.to_string());
            tokio::spawn(async move { portal.unmix_everywhere(&room, &stream, views).await });
        }
    }

    pub(crate) fn set_track_status(&self, room: &str, stream: &str, switch: TrackSwitch) {
        let notify = self.inner.store.get(room).map(|r| r.notifying.stream_change).unwrap_or(true);
        let (status, wire) = if switch.active { (TrackStatus::Active, "active") } else { (TrackStatus::Inactive, "inactive") };
        let mut conf = self.lock();
        let Some(r) = conf.rooms.get_mut(room) else { return };
        let Some(s) = r.stream_mut(stream) else { return };
        let mut changed = Vec::new();
        for t in s.tracks.iter_mut().filter(|t| switch.covers(t.kind)) {
            t.status = status;
            changed.push(t.kind.as_str());
        }
        let status = wire;
        if notify {
            for kind in changed {
                let data = json!({"id": stream, "status": "update", "data": {"field": format!("{kind}.status"), "value": status}});
                conf.broadcast(room, None, "stream", &data);
            }
        }
    }

    /// Applies one event from the media agent.
    pub(crate) fn on_agent_event(&self, event: AgentEvent) {
        match event {
            AgentEvent::Progress { room, participant, transport, progress } => {
                self.lock().notify(room.as_str(), participant.as_str(), "progress", crate::wire::progress_json(&transport, &progress));
                if let Progress::SessionReady { session } = &progress {
                    // A subscription that was still connecting when a permission was revoked.
                    self.reapply_held(room.as_str(), participant.as_str(), session.as_str());
                }
            }
            AgentEvent::StreamReady { room, mut stream, transport } => {
                let (room, id) = (room.to_string(), stream.id.to_string());
                let Some(owner) = stream.owner().map(ToString::to_string) else { return };
                let notify = self.inner.store.get(&room).map(|r| r.notifying.stream_change).unwrap_or(true);
                let mut conf = self.lock();
                let Some(r) = conf.rooms.get_mut(room.as_str()) else { return };
                if r.stream(&id).is_some() {
                    return;
                }
                let Some(p) = r.participant_mut(&owner) else {
                    debug!(%room, stream = %id, "stream ready after its owner left; ignored");
                    return;
                };
                if !p.sessions.contains_key(id.as_str()) {
                    return;
                }
                p.ready.insert(id.as_str().into());
                // What the room controller owns: the publisher's attributes; views come with auto-mix.
                if let StreamKind::Forward(f) = &mut stream.kind {
                    f.attributes = p.attributes.get(id.as_str()).cloned().unwrap_or(json!({}));
                }
                // A publication that was still connecting when its right was revoked
                // starts paused, and is announced so.
                let rights = p.info.permission.publish;
                let mut held = Vec::new();
                for t in stream.tracks.iter_mut() {
                    if !rights.allows(t.kind) && t.status == TrackStatus::Active {
                        t.status = TrackStatus::Inactive;
                        p.held.insert((id.clone(), t.kind));
                        held.push(t.kind);
                    }
                }
                if !held.is_empty() {
                    let portal = self.clone();
                    let (room, owner, id) = (room.clone(), owner.clone(), id.clone());
                    tokio::spawn(async move { portal.pause_held(&room, &owner, &id, held).await });
                }
                let data = crate::wire::stream_json(&stream);
                r.streams.push(stream);
                info!(%room, stream = %id, owner = %owner, "stream added");
                let published = Hook::StreamPublished { room: room.clone(), stream: id.clone(), kind: "forward".into(), owner: Some(owner.clone()) };
                // The publisher first (OWT's order), with the stream already in the room.
                let ready = Progress::SessionReady { session: id.as_str().into() };
                conf.notify(&room, &owner, "progress", crate::wire::progress_json(&transport, &ready));
                if notify {
                    conf.broadcast(&room, None, "stream", &json!({"id": id, "status": "add", "data": data}));
                }
                self.hook(|| published);
                drop(conf);
                let portal = self.clone();
                tokio::spawn(async move { portal.auto_mix(&room, &id).await });
            }
            AgentEvent::StreamEnded { room, stream, reason } => {
                let owner = self.lock().room(room.as_str()).and_then(|r| r.stream(stream.as_str())).and_then(|s| s.owner().cloned());
                if let Some(owner) = owner {
                    self.forget_session(room.as_str(), owner.as_str(), stream.as_str());
                }
                self.remove_stream(room.as_str(), stream.as_str(), &reason);
            }
            AgentEvent::SubscriptionEnded { room, participant, transport, subscription, reason } => {
                debug!(%room, %participant, %subscription, reason = ?reason, "subscription ended by the agent");
                // Told only when the transport lives on (a closed transport was told as such).
                let known = {
                    let conf = self.lock();
                    conf.room(room.as_str())
                        .and_then(|r| r.participant(participant.as_str()))
                        .is_some_and(|p| p.sessions.contains_key(subscription.as_str()) && p.transports.contains(transport.as_str()))
                };
                self.forget_session(room.as_str(), participant.as_str(), subscription.as_str());
                // OWT's session error: the SDK ends that subscription (its stream's node is
                // gone, the relay from it broke) and the application may subscribe again.
                if known {
                    let data = json!({"id": transport, "sessionId": subscription, "status": "error", "data": reason});
                    self.lock().notify(room.as_str(), participant.as_str(), "progress", data);
                }
            }
            AgentEvent::PublicationFailed { room, participant, transport, publication, reason } => {
                debug!(%room, %participant, %publication, reason = ?reason, "publication refused by the agent");
                let known = {
                    let mut conf = self.lock();
                    let p = conf.rooms.get_mut(room.as_str()).and_then(|r| r.participant_mut(participant.as_str()));
                    match p {
                        Some(p)
                            if p.sessions.get(publication.as_str()) == Some(&SessionKind::Publication)
                                && !p.ready.contains(publication.as_str())
                                && p.transports.contains(transport.as_str()) =>
                        {
                            p.forget(publication.as_str()).is_some()
                        }
                        _ => false,
                    }
                };
                // OWT's session error: the SDK rejects the `publish()` that waits for it
                // (it does not read the `soac` answer) and the room's input is free again.
                if known {
                    let data = json!({"id": transport, "sessionId": publication, "status": "error", "data": reason});
                    self.lock().notify(room.as_str(), participant.as_str(), "progress", data);
                }
            }
            AgentEvent::TransportClosed { room, participant, transport, sessions, reason } => {
                debug!(%room, %participant, %transport, reason = ?reason, "transport closed by the agent");
                // Publications that never flowed stop counting against inputLimit here;
                // ready ones are removed by their StreamEnded.
                let mut conf = self.lock();
                if let Some(p) = conf.rooms.get_mut(room.as_str()).and_then(|r| r.participant_mut(participant.as_str())) {
                    for s in &sessions {
                        if !p.ready.contains(s.as_str()) {
                            p.forget(s.as_str());
                        }
                    }
                    p.transports.remove(transport.as_str());
                }
                drop(conf);
                self.inner.router.transport_closed(&room, &transport);
            }
            AgentEvent::StreamUpdated { room, stream, update } => self.stream_updated(room.as_str(), stream.as_str(), update),
            AgentEvent::MediaLost { room, reason, transports, views } => {
                let portal = self.clone();
                tokio::spawn(async move { portal.media_lost(room.as_str(), &reason, transports, views).await });
            }
        }
    }

    /// A node serving some of the room's media is gone: the sessions on the transports it
    /// had are over. Each of their participants is told its transport failed (`progress`
    /// with status `error`, as OWT reports a failed transport), the forward streams
    /// published there disappear (`stream` remove), and, when the node made the room's
    /// views, they start again on another node, so clients that publish and subscribe again
    /// get media from a live node. Sessions on other nodes go on.
    pub(crate) async fn media_lost(&self, room: &str, reason: &str, lost: Vec<tessera_core::agent::LostTransport>, views: bool) {
        let (streams, transports) = {
            let mut conf = self.lock();
            if views {
                conf.mixing.remove(room);
            }
            let Some(r) = conf.rooms.get_mut(room) else { return };
            let mut transports = Vec::new();
            let mut streams = Vec::new();
            for t in lost {
                let Some(p) = r.participant_mut(t.participant.as_str()) else { continue };
                if p.transports.remove(t.transport.as_str()) {
                    transports.push((t.participant.clone(), t.transport.clone()));
                }
                for s in &t.sessions {
                    if p.forget(s.as_str()) == Some(SessionKind::Publication) {
                        streams.push(s.to_string());
                    }
                }
            }
            (streams, transports)
        };
        warn!(room, reason, transports = transports.len(), streams = streams.len(), views, "a node serving the room's media is gone");
        for (participant, transport) in &transports {
            let data = json!({"id": transport, "status": "error", "data": reason});
            self.lock().notify(room, participant.as_str(), "progress", data);
        }
        for stream in streams {
            self.remove_stream(room, &stream, reason);
        }
        // Mixed streams keep their ids and stay listed; their views start again on another
        // node, unless the room emptied meanwhile.
        if views
            && let Some(cfg) = self.inner.store.get(room)
            && self.lock().rooms.contains_key(room)
        {
            self.ensure_mixing(&cfg).await;
            // The views start empty: the forward streams that live on (on other nodes)
            // go back into the views they were in.
            let inputs: Vec<(String, String)> = {
                let conf = self.lock();
                conf.room(room)
                    .map(|r| {
                        r.streams
                            .iter()
                            .filter_map(|s| match &s.kind {
                                StreamKind::Forward(f) => Some(f.in_views.iter().map(|v| (v.to_string(), s.id.to_string())).collect::<Vec<_>>()),
                                StreamKind::Mixed(_) => None,
                            })
                            .flatten()
                            .collect()
                    })
                    .unwrap_or_default()
            };
            for (label, stream) in inputs {
                if let Err(e) = self.mix_into(room, &label, &stream).await {
                    debug!(room, stream, view = %label, error = %e, "a stream could not go back into its restarted view");
                }
            }
        }
    }

    /// Everything a leaving participant published disappears; the agent frees its sessions.
    pub(crate) async fn media_cleanup(&self, room: &str, participant: &str, publications: HashSet<tessera_core::SessionId>) {
        if let Some(agent) = self.inner.router.agent_for(&room.into())
            && let Err(e) = agent.call(ParticipantLeft { room: room.into(), participant: participant.into() }).await
        {
            debug!(room, participant, error = %e, "the agent could not drop a leaving participant's sessions");
        }
        for p in publications {
            self.remove_stream(room, p.as_str(), "owner left");
        }
    }
}

/// Refuses kinds the role may not publish/subscribe (OWT's `unauthorized`).
fn permitted(allowed: tessera_core::room::AudioVideo, kinds: impl Iterator<Item = MediaKind>) -> Result<(), String> {
    match kinds.into_iter().all(|k| allowed.allows(k)) {
        true => Ok(()),
        false => Err("unauthorized".into()),
    }
}

fn track_switch(d: &Value, active: bool, request: &str) -> Result<TrackSwitch, String> {
    let (audio, video) = match d.get("data").and_then(Value::as_str) {
        Some("audio") => (true, false),
        Some("video") => (false, true),
        Some("av") => (true, true),
        _ => return Err(format!("{request}: data must be \"audio\", \"video\" or \"av\"")),
    };
    Ok(TrackSwitch { audio, video, active })
}
