//! What an app backend may want to hear about: the events Tessera sends to configured
//! webhook URLs (`[webhooks]`, docs/operator-guide.md, "Webhooks"). The parts that see an event (the portal,
//! the recorder) hand it to a [`HookSink`] and go on; delivery (signing, ordering,
//! retries) is the sink's business and never holds them up.

use serde::Serialize;

/// One event, as its JSON body shows it (`{"event": "participant_joined", ...}`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Hook {
    /// The first participant joined a room that had none.
    RoomStarted {
        /// Room id.
        room: String,
    },
    /// The last participant left.
    RoomEnded {
        /// Room id.
        room: String,
    },
    /// A participant logged in.
    ParticipantJoined {
        /// Room id.
        room: String,
        /// Participant id.
        participant: String,
        /// The user named in its token.
        user: String,
        /// Its role.
        role: String,
    },
    /// A participant left (logout, disconnection past its reconnection time, or dropped).
    ParticipantLeft {
        /// Room id.
        room: String,
        /// Participant id.
        participant: String,
        /// The user named in its token.
        user: String,
    },
    /// A stream appeared in a room (a publication flows, or a mixed view started).
    StreamPublished {
        /// Room id.
        room: String,
        /// Stream id.
        stream: String,
        /// `forward` or `mixed`.
        kind: String,
        /// The publishing participant (forward streams).
        #[serde(skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
    },
    /// A stream disappeared.
    StreamUnpublished {
        /// Room id.
        room: String,
        /// Stream id.
        stream: String,
        /// Why.
        reason: String,
    },
    /// A recording started.
    RecordingStarted {
        /// Room id.
        room: String,
        /// Recording id.
        recording: String,
        /// The file it writes, on the recorder's machine.
        file: String,
    },
    /// A recording ended: stopped, or failed (its source ended, a write failed).
    RecordingFinished {
        /// Room id.
        room: String,
        /// Recording id.
        recording: String,
        /// The file, on the recorder's machine.
        file: String,
        /// `stopped` or `failed`.
        state: String,
        /// Its length in seconds.
        duration: f64,
        /// Bytes written.
        size: u64,
        /// Why it ended.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

impl Hook {
    /// The room the event belongs to (events of one room are delivered in order).
    pub fn room(&self) -> &str {
        match self {
            Hook::RoomStarted { room }
            | Hook::RoomEnded { room }
            | Hook::ParticipantJoined { room, .. }
            | Hook::ParticipantLeft { room, .. }
            | Hook::StreamPublished { room, .. }
            | Hook::StreamUnpublished { room, .. }
            | Hook::RecordingStarted { room, .. }
            | Hook::RecordingFinished { room, .. } => room,
        }
    }
}

/// Where events go. `emit` must return at once.
pub trait HookSink: Send + Sync {
    /// Hands over one event.
    fn emit(&self, hook: Hook);
}
