//! Permission changes over REST (OWT `PATCH /v1/rooms/{room}/participants/{id}`) and
//! server-side mute of a forward stream (`PATCH .../streams/{id}` with
//! `/media/{audio,video}/status`). OWT only checks permissions at the next request; here a
//! revoked right also takes effect on what already flows, as users of LiveKit and Janus
//! expect: a participant no longer allowed to publish video has its published video paused
//! (everyone is told the track is inactive), one no longer allowed to subscribe to video
//! stops receiving it. Granting the right back resumes exactly what the revocation paused,
//! never what the participant paused itself. Sessions still connecting at the revocation
//! start paused when they become ready.

use std::sync::Arc;

use tessera_core::agent::{MediaKind, TrackSwitch};
use tessera_core::command::SwitchTracks;
use tessera_core::control::apply_permission_ops;
use tessera_core::stream::TrackStatus;
use tessera_core::{ControlError, ParticipantInfo};
use tracing::{info, warn};

use crate::Portal;
use crate::conference::Participant;
use crate::media::SessionKind;

const KINDS: [MediaKind; 2] = [MediaKind::Audio, MediaKind::Video];

/// Pause (`active` false) or resume one kind.
pub(crate) fn switch(kind: MediaKind, active: bool) -> TrackSwitch {
    TrackSwitch { audio: kind == MediaKind::Audio, video: kind == MediaKind::Video, active }
}

/// A pause or resume to send: (session, kind, publication?, resume?).
type Switch = (String, MediaKind, bool, bool);

impl Portal {
    /// The room's lock for switching tracks: a revocation, a grant and a participant's own
    /// play or pause in one room reach the agent in the order they were decided.
    pub(crate) async fn switch_lock(&self, room: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.inner.permission_changes.lock().unwrap_or_else(|p| p.into_inner());
            // Rooms nobody switches in any more (no guard out) are forgotten.
            locks.retain(|_, l| Arc::strong_count(l) > 1);
            locks.entry(room.to_string()).or_default().clone()
        };
        lock.lock_owned().await
    }

    pub(crate) async fn patch_participant(&self, room: &str, participant: &str, ops: &serde_json::Value) -> Result<ParticipantInfo, ControlError> {
        // One permission change at a time: a revocation and a grant in quick succession
        // must reach the agent in that order.
        let _one = self.switch_lock(room).await;
        let (switches, info, changed) = {
            let mut conf = self.lock();
            let r = conf.rooms.get_mut(room).ok_or_else(|| ControlError::ParticipantNotFound(participant.into()))?;
            // Forward streams of this participant with the tracks that flow.
            let flowing: Vec<(String, Vec<MediaKind>)> = r
                .streams
                .iter()
                .filter(|s| s.owner().is_some_and(|o| o.as_str() == participant))
                .map(|s| (s.id.to_string(), s.tracks.iter().filter(|t| t.status == TrackStatus::Active).map(|t| t.kind).collect()))
                .collect();
            let p = r.participant_mut(participant).ok_or_else(|| ControlError::ParticipantNotFound(participant.into()))?;
            let old = p.info.permission;
            let new = apply_permission_ops(old, ops)?;
            p.info.permission = new;
            let mut switches = Vec::new();
            for kind in KINDS {
                for (before, after, publication) in
                    [(old.publish, new.publish, true), (old.subscribe, new.subscribe, false)].map(|(b, a, p)| (b.allows(kind), a.allows(kind), p))
                {
                    if before && !after {
                        hold(p, kind, publication, &flowing, &mut switches);
                    } else if !before && after {
                        release(p, kind, publication, &mut switches);
                    }
                }
            }
            (switches, p.info.clone(), old != new)
        };
        if changed {
            info!(room, participant, permission = ?info.permission, "participant permission changed over REST");
        }
        for (session, kind, publication, resume) in switches {
            self.switch_session(room, participant, &session, switch(kind, resume), publication).await;
        }
        Ok(info)
    }

    /// Pauses or resumes tracks of one session on the agent; a publication's stream tells
    /// everyone. A session that ended meanwhile is skipped.
    pub(crate) async fn switch_session(&self, room: &str, participant: &str, session: &str, switch: TrackSwitch, publication: bool) {
        let Some(agent) = self.inner.router.agent_for(&room.into()) else { return };
        let command = SwitchTracks { room: room.into(), participant: participant.into(), session: session.into(), switch };
        if let Err(e) = agent.call(command).await {
            // A session still connecting is switched again when it becomes ready.
            warn!(room, participant, session, error = %e, "switching tracks for a permission change failed");
            return;
        }
        if publication {
            self.set_track_status(room, session, switch);
        }
    }

    /// A subscription that became ready: what a revocation holds of it is paused now (it
    /// may still have been connecting when the revocation came).
    pub(crate) fn reapply_held(&self, room: &str, participant: &str, session: &str) {
        let kinds: Vec<MediaKind> = {
            let conf = self.lock();
            let Some(p) = conf.room(room).and_then(|r| r.participant(participant)) else { return };
            if p.sessions.get(session) != Some(&SessionKind::Subscription) {
                return;
            }
            p.held.iter().filter(|(id, _)| id == session).map(|(_, k)| *k).collect()
        };
        if kinds.is_empty() {
            return;
        }
        let (portal, room, participant, session) = (self.clone(), room.to_string(), participant.to_string(), session.to_string());
        tokio::spawn(async move { portal.pause_held(&room, &participant, &session, kinds).await });
    }

    /// Pauses `kinds` of a session that became ready, those still held once it is this
    /// task's turn (a grant that came first has released them). A publication's stream was
    /// announced with them inactive already.
    pub(crate) async fn pause_held(&self, room: &str, participant: &str, session: &str, kinds: Vec<MediaKind>) {
        let _one = self.switch_lock(room).await;
        for kind in kinds {
            let held = {
                let conf = self.lock();
                conf.room(room).and_then(|r| r.participant(participant)).is_some_and(|p| p.held.contains(&(session.to_string(), kind)))
            };
            if held {
                self.switch_session(room, participant, session, switch(kind, false), false).await;
            }
        }
    }

    /// `PATCH .../streams/{id}` `/media/{audio,video}/status`: pauses or resumes a forward
    /// stream's track for every subscriber, as its publisher's `stream-control` would.
    pub(crate) async fn set_stream_status(&self, room: &str, stream: &str, kind: MediaKind, active: bool) -> Result<(), String> {
        let owner = {
            let conf = self.lock();
            let s = conf.room(room).and_then(|r| r.stream(stream)).ok_or_else(|| format!("Stream not found: {stream}"))?;
            if !s.has(kind) {
                return Err(format!("stream {stream} has no {} track", kind.as_str()));
            }
            s.owner().cloned().ok_or("`/media/*/status` applies to forward streams")?
        };
        let agent = self.inner.router.agent_for(&room.into()).ok_or("no WebRTC agent serves this room")?;
        let _one = self.switch_lock(room).await;
        let command = SwitchTracks { room: room.into(), participant: owner.clone(), session: stream.into(), switch: switch(kind, active) };
        agent.call(command).await.map_err(|e| e.to_string())?;
        // The server's mute is the owner's pause as far as a later grant is concerned.
        self.switched(room, owner.as_str(), stream, SessionKind::Publication, switch(kind, active));
        self.set_track_status(room, stream, switch(kind, active));
        Ok(())
    }

    /// Whether a participant's own play or pause of a session's tracks may go ahead
    /// (`owner`: the publication's owner, or the subscriber): a play of a kind the session
    /// carries but may no longer use is refused.
    pub(crate) fn may_switch(&self, room: &str, owner: &str, session: &str, kind: SessionKind, s: TrackSwitch) -> Result<(), String> {
        let conf = self.lock();
        let Some(p) = conf.room(room).and_then(|r| r.participant(owner)) else { return Ok(()) };
        let rights = match kind {
            SessionKind::Publication => p.info.permission.publish,
            SessionKind::Subscription => p.info.permission.subscribe,
        };
        let carried = p.kinds.get(session).map(Vec::as_slice).unwrap_or_default();
        if s.active && carried.iter().any(|k| s.covers(*k) && !rights.allows(*k)) {
            return Err("unauthorized".into());
        }
        Ok(())
    }

    /// Bookkeeping of a participant's own switch that took effect: a pause is its own from
    /// then on (a granted permission will not resume it), a play ends that.
    pub(crate) fn switched(&self, room: &str, owner: &str, session: &str, kind: SessionKind, s: TrackSwitch) {
        let mut conf = self.lock();
        let Some(p) = conf.rooms.get_mut(room).and_then(|r| r.participant_mut(owner)) else { return };
        let carried: Vec<MediaKind> = p.kinds.get(session).cloned().unwrap_or_default().into_iter().filter(|k| s.covers(*k)).collect();
        for k in carried {
            let entry = (session.to_string(), k);
            if s.active {
                p.paused.remove(&entry);
            } else {
                p.held.remove(&entry);
                if kind == SessionKind::Subscription {
                    p.paused.insert(entry);
                }
            }
        }
    }
}

/// A revoked right: the participant's sessions of that side that carry `kind` and flow
/// (not paused by the participant) are held and paused.
fn hold(p: &mut Participant, kind: MediaKind, publication: bool, flowing: &[(String, Vec<MediaKind>)], out: &mut Vec<Switch>) {
    let sessions: Vec<String> = if publication {
        // Publications by their streams' flowing tracks, and those still connecting.
        let mut ids: Vec<String> = flowing.iter().filter(|(_, kinds)| kinds.contains(&kind)).map(|(id, _)| id.clone()).collect();
        ids.extend(
            p.sessions
                .iter()
                .filter(|(id, k)| **k == SessionKind::Publication && !p.ready.contains(*id))
                .filter(|(id, _)| p.kinds.get(*id).is_some_and(|ks| ks.contains(&kind)))
                .map(|(id, _)| id.to_string()),
        );
        ids
    } else {
        p.sessions
            .iter()
            .filter(|(id, k)| **k == SessionKind::Subscription && p.kinds.get(*id).is_some_and(|ks| ks.contains(&kind)))
            .map(|(id, _)| id.to_string())
            .collect()
    };
    for id in sessions {
        // Every such session is paused (its own pause may not have reached the agent);
        // only what the participant did not pause itself is resumed by a grant.
        let own = p.paused.contains(&(id.clone(), kind));
        if !own {
            p.held.insert((id.clone(), kind));
        }
        // A publication still connecting has no stream to pause yet: the stream starts
        // paused when it becomes ready (it is held).
        if !publication || p.ready.contains(id.as_str()) {
            out.push((id, kind, publication, false));
        }
    }
}

/// A granted right: what the revocation held of that side is resumed.
fn release(p: &mut Participant, kind: MediaKind, publication: bool, out: &mut Vec<Switch>) {
    let side = if publication { SessionKind::Publication } else { SessionKind::Subscription };
    let held: Vec<String> =
        p.held.iter().filter(|(id, k)| *k == kind && p.sessions.get(id.as_str()) == Some(&side)).map(|(id, _)| id.clone()).collect();
    for id in held {
        p.held.remove(&(id.clone(), kind));
        out.push((id, kind, publication, true));
    }
}
