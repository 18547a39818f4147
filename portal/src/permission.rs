//! Permission changes over REST (OWT `PATCH /v1/rooms/{room}/participants/{id}`) and
//! server-side mute of a forward stream (`PATCH .../streams/{id}` with
//! `/media/{audio,video}/status`). OWT only checks permissions at the next request; here a
//! revoked right also takes effect on what already flows, as users of LiveKit and Janus
//! expect: a participant no longer allowed to publish video has its published video paused
//! (everyone is told the track is inactive), one no longer allowed to subscribe to video
//! stops receiving it. Granting the right back resumes exactly what the revocation paused,
//! never what the participant paused itself.

use tessera_core::agent::{MediaKind, TrackSwitch};
use tessera_core::command::SwitchTracks;
use tessera_core::control::apply_permission_ops;
use tessera_core::stream::TrackStatus;
use tessera_core::{ControlError, ParticipantInfo};
use tracing::{debug, info};

use crate::Portal;
use crate::media::SessionKind;

const KINDS: [MediaKind; 2] = [MediaKind::Audio, MediaKind::Video];

fn switch(kind: MediaKind, active: bool) -> TrackSwitch {
    TrackSwitch { audio: kind == MediaKind::Audio, video: kind == MediaKind::Video, active }
}

impl Portal {
    pub(crate) async fn patch_participant(&self, room: &str, participant: &str, ops: &serde_json::Value) -> Result<ParticipantInfo, ControlError> {
        // What to pause and resume, decided under the lock; done after it (the agent may be
        // another machine's).
        let mut pause: Vec<(String, MediaKind, SessionKind)> = Vec::new();
        let mut resume: Vec<(String, MediaKind, SessionKind)> = Vec::new();
        let (old, info) = {
            let mut conf = self.lock();
            let r = conf.rooms.get_mut(room).ok_or_else(|| ControlError::ParticipantNotFound(participant.into()))?;
            let flowing: Vec<(String, Vec<(MediaKind, TrackStatus)>)> = r
                .streams
                .iter()
                .filter(|s| s.owner().is_some_and(|o| o.as_str() == participant))
                .map(|s| (s.id.to_string(), s.tracks.iter().map(|t| (t.kind, t.status)).collect()))
                .collect();
            let p = r.participant_mut(participant).ok_or_else(|| ControlError::ParticipantNotFound(participant.into()))?;
            let old = p.info.permission;
            let new = apply_permission_ops(old, ops)?;
            p.info.permission = new;
            for kind in KINDS {
                let allowed = |a: tessera_core::room::AudioVideo| if kind == MediaKind::Audio { a.audio } else { a.video };
                for (rights_before, rights_after, sessions) in [
                    (allowed(old.publish), allowed(new.publish), SessionKind::Publication),
                    (allowed(old.subscribe), allowed(new.subscribe), SessionKind::Subscription),
                ] {
                    if rights_before && !rights_after {
                        let ids: Vec<String> = match sessions {
                            // Only tracks that flow: one the publisher paused stays its own.
                            SessionKind::Publication => flowing
                                .iter()
                                .filter(|(_, tracks)| tracks.iter().any(|&(k, s)| k == kind && s == TrackStatus::Active))
                                .map(|(id, _)| id.clone())
                                .collect(),
                            SessionKind::Subscription => {
                                p.sessions.iter().filter(|(_, k)| **k == SessionKind::Subscription).map(|(id, _)| id.to_string()).collect()
                            }
                        };
                        for id in ids {
                            p.held.insert((id.clone(), kind));
                            pause.push((id, kind, sessions));
                        }
                    } else if !rights_before && rights_after {
                        let held: Vec<String> = p
                            .held
                            .iter()
                            .filter(|(id, k)| *k == kind && p.sessions.get(id.as_str()) == Some(&sessions))
                            .map(|(id, _)| id.clone())
                            .collect();
                        for id in held {
                            p.held.remove(&(id.clone(), kind));
                            resume.push((id, kind, sessions));
                        }
                    }
                }
            }
            (old, p.info.clone())
        };
        if old != info.permission {
            info!(room, participant, permission = ?info.permission, "participant permission changed over REST");
        }
        for (id, kind, sessions, active) in
            pause.into_iter().map(|(i, k, s)| (i, k, s, false)).chain(resume.into_iter().map(|(i, k, s)| (i, k, s, true)))
        {
            self.switch_session(room, participant, &id, switch(kind, active), sessions == SessionKind::Publication).await;
        }
        Ok(info)
    }

    /// Pauses or resumes tracks of one session on the agent; a publication's stream tells
    /// everyone. A session that ended meanwhile is skipped.
    async fn switch_session(&self, room: &str, participant: &str, session: &str, switch: TrackSwitch, publication: bool) {
        let Some(agent) = self.inner.router.agent_for(&room.into()) else { return };
        let command = SwitchTracks { room: room.into(), participant: participant.into(), session: session.into(), switch };
        if let Err(e) = agent.call(command).await {
            debug!(room, participant, session, error = %e, "switching tracks after a permission change");
            return;
        }
        if publication {
            self.set_track_status(room, session, switch);
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
        let command = SwitchTracks { room: room.into(), participant: owner, session: stream.into(), switch: switch(kind, active) };
        agent.call(command).await.map_err(|e| e.to_string())?;
        self.set_track_status(room, stream, switch(kind, active));
        Ok(())
    }

    /// A participant's own pause of tracks the revocation holds: they stay paused when the
    /// right comes back. A play of a kind it may not use is refused.
    pub(crate) fn own_switch(&self, room: &str, participant: &str, session: &str, kind: SessionKind, s: TrackSwitch) -> Result<(), String> {
        let mut conf = self.lock();
        let Some(p) = conf.rooms.get_mut(room).and_then(|r| r.participant_mut(participant)) else { return Ok(()) };
        let rights = match kind {
            SessionKind::Publication => p.info.permission.publish,
            SessionKind::Subscription => p.info.permission.subscribe,
        };
        if s.active && ((s.audio && !rights.audio) || (s.video && !rights.video)) {
            return Err("unauthorized".into());
        }
        if !s.active {
            p.held.retain(|(id, k)| !(id == session && s.covers(*k)));
        }
        Ok(())
    }
}
