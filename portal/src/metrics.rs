//! What the portal counts for `/metrics`: logins and relogins, and why refused ones were.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Why a login or relogin was refused, as a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    /// The server drains.
    Draining,
    /// Malformed request or unsupported client.
    BadRequest,
    /// Malformed token or reconnection ticket, or a wrong signature.
    Invalid,
    /// Token or ticket past its expiry.
    Expired,
    /// Token or ticket already used.
    Used,
    /// The token's room does not exist (any more).
    RoomNotFound,
    /// The token's role is not one of the room's.
    Role,
    /// The room is at its participant limit.
    RoomFull,
    /// The cluster's ledger could not be reached.
    Unavailable,
    /// The participant of a ticket is gone.
    UnknownParticipant,
    /// A server-side failure.
    Internal,
}

impl Refusal {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Draining => "draining",
            Refusal::BadRequest => "bad_request",
            Refusal::Invalid => "invalid",
            Refusal::Expired => "expired",
            Refusal::Used => "used",
            Refusal::RoomNotFound => "room_not_found",
            Refusal::Role => "role",
            Refusal::RoomFull => "room_full",
            Refusal::Unavailable => "unavailable",
            Refusal::UnknownParticipant => "unknown_participant",
            Refusal::Internal => "internal",
        }
    }
}

impl From<&tessera_core::token::TokenError> for Refusal {
    fn from(e: &tessera_core::token::TokenError) -> Self {
        use tessera_core::token::TokenError as E;
        match e {
            E::Malformed | E::BadSignature => Refusal::Invalid,
            E::Expired => Refusal::Expired,
            E::Replayed => Refusal::Used,
            E::Unavailable(_) => Refusal::Unavailable,
            E::Signing(_) => Refusal::Internal,
        }
    }
}

impl From<&tessera_core::ticket::TicketError> for Refusal {
    fn from(e: &tessera_core::ticket::TicketError) -> Self {
        use tessera_core::ticket::TicketError as E;
        match e {
            E::Malformed | E::BadSignature => Refusal::Invalid,
            E::Expired => Refusal::Expired,
            E::Used => Refusal::Used,
            E::Signing(_) => Refusal::Internal,
        }
    }
}

/// A refused login: why (for metrics) and what the client is told.
#[derive(Debug)]
pub(crate) struct Refused(pub Refusal, pub String);

impl Refused {
    pub(crate) fn new(why: Refusal, message: impl Into<String>) -> Refused {
        Refused(why, message.into())
    }
}

/// Which request a count is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LoginKind {
    /// `login` with a token.
    Login,
    /// `relogin` with a reconnection ticket.
    Relogin,
}

impl LoginKind {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            LoginKind::Login => "login",
            LoginKind::Relogin => "relogin",
        }
    }
}

/// Login counts since start; logins are rare next to media, so one mutex is plenty.
#[derive(Debug, Default)]
pub(crate) struct LoginCounts(Mutex<BTreeMap<(LoginKind, Option<Refusal>), u64>>);

impl LoginCounts {
    pub(crate) fn count(&self, kind: LoginKind, outcome: Option<Refusal>) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((kind, outcome)).or_default() += 1;
    }

    pub(crate) fn snapshot(&self) -> Vec<LoginCount> {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(&(kind, refused), &count)| LoginCount { kind, refused, count }).collect()
    }
}

/// Logins of one kind and outcome since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginCount {
    /// Login or relogin.
    pub kind: LoginKind,
    /// Why refused; `None`: accepted.
    pub refused: Option<Refusal>,
    /// How many.
    pub count: u64,
}

/// The portal's live counts and login totals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortalMetrics {
    /// Rooms with someone in them.
    pub rooms: usize,
    /// Participants in those rooms (reconnecting ones included).
    pub participants: usize,
    /// Participants whose socket is gone and may still relogin.
    pub reconnecting: usize,
    /// Published streams, forward and mixed.
    pub streams: usize,
    /// Participants' publications, announced or flowing.
    pub publications: usize,
    /// Subscriptions.
    pub subscriptions: usize,
    /// Login and relogin totals by outcome.
    pub logins: Vec<LoginCount>,
}
