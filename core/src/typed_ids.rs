//! Typed identifiers: a room id cannot be passed where a stream id is expected, and a
//! function taking four ids says which is which. Each is a string on the wire
//! (`#[serde(transparent)]`), so the OWT JSON and the REST paths are unchanged.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                $name(s)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name(s.to_string())
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

string_id!(
    /// A room (24 hex digits, or the operator's name for the default room).
    RoomId
);
string_id!(
    /// A participant: the Socket.IO socket id of its login.
    ParticipantId
);
string_id!(
    /// A stream of a room: a publication's id (forward) or `<room>-<view label>` (mixed).
    StreamId
);
string_id!(
    /// A publication or subscription (OWT's session id, 32 hex digits).
    SessionId
);
string_id!(
    /// A transport (one peer connection), named after its first session unless the client names it.
    TransportId
);
string_id!(
    /// A view of a room (its mixed stream is `<room>-<label>`).
    ViewLabel
);

impl StreamId {
    /// The mixed stream of `view` in `room`.
    pub fn mixed(room: &RoomId, view: &ViewLabel) -> StreamId {
        StreamId(format!("{room}-{view}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_plain_strings_on_the_wire() {
        let r = RoomId::from("r1");
        assert_eq!(serde_json::to_string(&r).unwrap(), "\"r1\"");
        let back: RoomId = serde_json::from_str("\"r1\"").unwrap();
        assert_eq!(back, r);
        assert_eq!(StreamId::mixed(&r, &ViewLabel::from("common")).as_str(), "r1-common");
        let mut m = std::collections::HashMap::new();
        m.insert(ParticipantId::from("p"), 1);
        assert_eq!(m.get("p"), Some(&1), "maps keyed by an id are searchable by &str");
    }
}
