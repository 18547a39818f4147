//! Socket.IO v5 packet codec (pure functions).
//!
//! Layout: `<type>[<attachments>-][/<nsp>,][<ack id>][<JSON payload>]`, where type is
//! CONNECT 0, DISCONNECT 1, EVENT 2, ACK 3, CONNECT_ERROR 4, BINARY_EVENT 5, BINARY_ACK 6.
//! Binary packets (5/6) are recognised but rejected with [`PacketError::Binary`].

use serde_json::Value;

/// The Socket.IO packet type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketType {
    Connect = 0,
    Disconnect = 1,
    Event = 2,
    Ack = 3,
    ConnectError = 4,
    BinaryEvent = 5,
    BinaryAck = 6,
}

impl PacketType {
    fn from_char(c: char) -> Option<PacketType> {
        Some(match c {
            '0' => PacketType::Connect,
            '1' => PacketType::Disconnect,
            '2' => PacketType::Event,
            '3' => PacketType::Ack,
            '4' => PacketType::ConnectError,
            '5' => PacketType::BinaryEvent,
            '6' => PacketType::BinaryAck,
            _ => return None,
        })
    }

    fn digit(self) -> char {
        match self {
            PacketType::Connect => '0',
            PacketType::Disconnect => '1',
            PacketType::Event => '2',
            PacketType::Ack => '3',
            PacketType::ConnectError => '4',
            PacketType::BinaryEvent => '5',
            PacketType::BinaryAck => '6',
        }
    }
}

/// One (non-binary) Socket.IO packet.
#[derive(Debug, Clone, PartialEq)]
pub struct Packet {
    pub kind: PacketType,
    /// The namespace, `/` by default.
    pub nsp: String,
    /// The acknowledgement id.
    pub id: Option<u64>,
    pub data: Option<Value>,
}

/// Why a Socket.IO packet could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("empty packet")]
    Empty,
    #[error("unknown packet type {0:?}")]
    UnknownType(char),
    #[error("invalid attachment count")]
    BadAttachments,
    #[error("binary packets are not supported ({attachments} attachment(s))")]
    Binary { kind: PacketType, attachments: usize },
    #[error("invalid ack id")]
    BadAckId,
    #[error("invalid JSON payload: {0}")]
    Json(String),
    #[error("invalid payload for {0:?} packet")]
    InvalidPayload(PacketType),
}

impl Packet {
    pub fn new(kind: PacketType, nsp: &str, id: Option<u64>, data: Option<Value>) -> Packet {
        Packet { kind, nsp: nsp.to_owned(), id, data }
    }

    /// EVENT `[event, ...args]` on `/`.
    pub fn event(event: &str, args: Vec<Value>) -> Packet {
        let mut array = Vec::with_capacity(args.len() + 1);
        array.push(Value::String(event.to_owned()));
        array.extend(args);
        Packet::new(PacketType::Event, "/", None, Some(Value::Array(array)))
    }

    /// ACK `id[...args]` on `/`.
    pub fn ack(id: u64, args: Vec<Value>) -> Packet {
        Packet::new(PacketType::Ack, "/", Some(id), Some(Value::Array(args)))
    }

    /// The server's answer to a successful CONNECT.
    pub fn connect_ok(nsp: &str, sid: &str) -> Packet {
        Packet::new(PacketType::Connect, nsp, None, Some(serde_json::json!({ "sid": sid })))
    }

    pub fn connect_error(nsp: &str, message: &str) -> Packet {
        Packet::new(PacketType::ConnectError, nsp, None, Some(serde_json::json!({ "message": message })))
    }

    pub fn disconnect(nsp: &str) -> Packet {
        Packet::new(PacketType::Disconnect, nsp, None, None)
    }

    /// Encodes the packet (text form; binary types get no attachment count).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        out.push(self.kind.digit());
        if self.nsp != "/" && !self.nsp.is_empty() {
            out.push_str(&self.nsp);
            out.push(',');
        }
        if let Some(id) = self.id {
            out.push_str(&id.to_string());
        }
        if let Some(data) = &self.data {
            out.push_str(&data.to_string());
        }
        out
    }

    /// Decodes a packet. Never panics; binary packets yield [`PacketError::Binary`].
    pub fn decode(s: &str) -> Result<Packet, PacketError> {
        let first = s.chars().next().ok_or(PacketError::Empty)?;
        let kind = PacketType::from_char(first).ok_or(PacketError::UnknownType(first))?;
        let mut rest = &s[first.len_utf8()..];

        if matches!(kind, PacketType::BinaryEvent | PacketType::BinaryAck) {
            let dash = rest.find('-').ok_or(PacketError::BadAttachments)?;
            let count = &rest[..dash];
            if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
                return Err(PacketError::BadAttachments);
            }
            let attachments = count.parse().map_err(|_| PacketError::BadAttachments)?;
            return Err(PacketError::Binary { kind, attachments });
        }

        let mut nsp = "/".to_owned();
        if rest.starts_with('/') {
            match rest.find(',') {
                Some(comma) => {
                    nsp = rest[..comma].to_owned();
                    rest = &rest[comma + 1..];
                }
                None => {
                    nsp = rest.to_owned();
                    rest = "";
                }
            }
        }

        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let id = if digits > 0 { Some(rest[..digits].parse::<u64>().map_err(|_| PacketError::BadAckId)?) } else { None };
        rest = &rest[digits..];

        let data = if rest.is_empty() { None } else { Some(serde_json::from_str::<Value>(rest).map_err(|e| PacketError::Json(e.to_string()))?) };

        let valid = match kind {
            PacketType::Connect => matches!(data, None | Some(Value::Object(_))),
            PacketType::Disconnect => data.is_none(),
            PacketType::ConnectError => matches!(data, Some(Value::Object(_) | Value::String(_))),
            PacketType::Event | PacketType::Ack => matches!(data, Some(Value::Array(_))),
            PacketType::BinaryEvent | PacketType::BinaryAck => false,
        };
        if !valid {
            return Err(PacketError::InvalidPayload(kind));
        }
        Ok(Packet { kind, nsp, id, data })
    }

    /// Splits an EVENT into (name, args, ack id). Errors describe why it is not a valid event.
    pub fn into_event(self) -> Result<(String, Vec<Value>, Option<u64>), String> {
        if self.kind != PacketType::Event {
            return Err(format!("not an event: {:?}", self.kind));
        }
        let Some(Value::Array(mut array)) = self.data else {
            return Err("event payload is not an array".to_owned());
        };
        if array.is_empty() {
            return Err("event without a name".to_owned());
        }
        match array.remove(0) {
            Value::String(name) => Ok((name, array, self.id)),
            other => Err(format!("event name is not a string: {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // Frames below were produced by the npm package socket.io-parser 4.2.7
    // (tests/node/gen-frames.mjs, `new Encoder().encode(packet)`).

    fn p(kind: PacketType, nsp: &str, id: Option<u64>, data: Option<Value>) -> Packet {
        Packet::new(kind, nsp, id, data)
    }

    #[test]
    fn reference_frames_round_trip() {
        use PacketType::*;
        let cases = vec![
            ("0", p(Connect, "/", None, None)),
            ("0{\"token\":\"abc\"}", p(Connect, "/", None, Some(json!({"token": "abc"})))),
            ("0/admin,", p(Connect, "/admin", None, None)),
            ("0{\"sid\":\"oSO0OpakMV_3jnilAAAA\"}", Packet::connect_ok("/", "oSO0OpakMV_3jnilAAAA")),
            ("1", Packet::disconnect("/")),
            ("1/admin,", Packet::disconnect("/admin")),
            ("2[\"hello\",1,{\"a\":\"b\"}]", Packet::event("hello", vec![json!(1), json!({"a": "b"})])),
            ("212[\"echo\",\"x\"]", p(Event, "/", Some(12), Some(json!(["echo", "x"])))),
            ("2/admin,13[\"echo\",\"x\"]", p(Event, "/admin", Some(13), Some(json!(["echo", "x"])))),
            ("2[\"msg\",\"é 🎉 \\\"q\\\"\"]", Packet::event("msg", vec![json!("é 🎉 \"q\"")])),
            ("312[\"ok\",{\"n\":1}]", Packet::ack(12, vec![json!("ok"), json!({"n": 1})])),
            ("30[]", Packet::ack(0, vec![])),
            ("4/admin,{\"message\":\"Invalid namespace\"}", Packet::connect_error("/admin", "Invalid namespace")),
        ];
        for (frame, packet) in cases {
            assert_eq!(Packet::decode(frame).unwrap(), packet, "decode {frame:?}");
            assert_eq!(packet.encode(), frame, "encode {packet:?}");
        }
    }

    #[test]
    fn binary_packets_are_rejected() {
        let cases = [
            ("51-[\"bin\",{\"_placeholder\":true,\"num\":0}]", PacketType::BinaryEvent, 1),
            ("51-7[\"bin\",{\"_placeholder\":true,\"num\":0}]", PacketType::BinaryEvent, 1),
            ("61-8[{\"_placeholder\":true,\"num\":0}]", PacketType::BinaryAck, 1),
        ];
        for (frame, kind, attachments) in cases {
            assert_eq!(Packet::decode(frame), Err(PacketError::Binary { kind, attachments }));
        }
        assert_eq!(Packet::decode("5-[]"), Err(PacketError::BadAttachments));
        assert_eq!(Packet::decode("5x-[]"), Err(PacketError::BadAttachments));
        assert_eq!(Packet::decode("5[]"), Err(PacketError::BadAttachments));
    }

    #[test]
    fn into_event() {
        let ev = Packet::decode("212[\"echo\",\"x\",2]").unwrap().into_event().unwrap();
        assert_eq!(ev, ("echo".to_owned(), vec![json!("x"), json!(2)], Some(12)));
        assert!(Packet::decode("2[1,2]").unwrap().into_event().is_err());
        assert!(Packet::decode("2[]").unwrap().into_event().is_err());
        assert!(Packet::decode("30[]").unwrap().into_event().is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        use PacketError::*;
        assert_eq!(Packet::decode(""), Err(Empty));
        assert_eq!(Packet::decode("9"), Err(UnknownType('9')));
        assert_eq!(Packet::decode("é"), Err(UnknownType('é')));
        assert!(matches!(Packet::decode("2[\"a\""), Err(Json(_))));
        assert!(matches!(Packet::decode("2/é,{"), Err(Json(_))));
        assert_eq!(Packet::decode("2{\"a\":1}"), Err(InvalidPayload(PacketType::Event)));
        assert_eq!(Packet::decode("2"), Err(InvalidPayload(PacketType::Event)));
        assert_eq!(Packet::decode("1{}"), Err(InvalidPayload(PacketType::Disconnect)));
        assert_eq!(Packet::decode("0[]"), Err(InvalidPayload(PacketType::Connect)));
        assert_eq!(Packet::decode("4"), Err(InvalidPayload(PacketType::ConnectError)));
        assert_eq!(Packet::decode("299999999999999999999999[]"), Err(BadAckId));
        let deep = format!("2{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(Packet::decode(&deep), Err(Json(_))));
        // Random garbage over the interesting characters never panics.
        use rand::{Rng as _, SeedableRng as _};
        let alphabet: Vec<char> = "0123456789/,-[]{}\"é🎉ab \u{1e}".chars().collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let len = rng.random_range(0..12);
            let s: String = (0..len).map(|_| alphabet[rng.random_range(0..alphabet.len())]).collect();
            let _ = Packet::decode(&s).map(|p| p.into_event());
            let _ = crate::socketio::engine::decode_payload(&s);
        }
        // namespace without a comma runs to the end, like socket.io-parser
        assert_eq!(Packet::decode("0/admin").unwrap(), p(PacketType::Connect, "/admin", None, None));
    }
}

/// Property tests: decoding never panics, whatever decodes re-encodes to the same packet,
/// and events/acks with any JSON arguments, namespace and id survive encode → decode.
#[cfg(test)]
pub(crate) mod proptests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn config() -> ProptestConfig {
        ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() }
    }

    /// Any string, control and non-BMP characters included.
    pub(crate) fn text(max: usize) -> impl Strategy<Value = String> + Clone {
        prop::collection::vec(any::<char>(), 0..max).prop_map(String::from_iter)
    }

    /// Any JSON value up to `depth` levels of arrays/objects, with `words` among its
    /// strings and keys (to hit the field names and values a parser looks for).
    pub(crate) fn json_with(depth: u32, words: &'static [&'static str]) -> BoxedStrategy<Value> {
        let word = prop_oneof![3 => prop::sample::select(words).prop_map(str::to_string), 1 => text(10)];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (0u64..70_000).prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            word.clone().prop_map(Value::from),
        ];
        leaf.prop_recursive(depth, 48, 5, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map(word.clone(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
        .boxed()
    }

    pub(crate) fn any_json() -> BoxedStrategy<Value> {
        json_with(3, &["", "a"])
    }

    /// A namespace as a client can send it: `/` and anything but a comma.
    fn nsp() -> impl Strategy<Value = String> {
        prop_oneof![Just("/".to_string()), text(12).prop_map(|s| format!("/{}", s.replace(',', "")))]
    }

    fn wire() -> impl Strategy<Value = String> {
        prop_oneof![text(40), "[0-6/,\\-\\[\\]{}\"a-c0-9 .:é\u{1e}]{0,40}", any_json().prop_map(|v| format!("2{v}"))]
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn decode_never_panics_and_reencodes_to_itself(s in wire()) {
            if let Ok(p) = Packet::decode(&s) {
                prop_assert_eq!(Packet::decode(&p.encode()), Ok(p.clone()), "re-encoded as {:?}", p.encode());
                if p.kind == PacketType::Event {
                    let _ = p.into_event();
                }
            }
        }

        #[test]
        fn events_round_trip(name in text(16), args in prop::collection::vec(any_json(), 0..4), nsp in nsp(), id in prop::option::of(any::<u64>())) {
            let mut p = Packet::event(&name, args.clone());
            p.nsp = nsp;
            p.id = id;
            let decoded = Packet::decode(&p.encode());
            prop_assert_eq!(&decoded, &Ok(p.clone()), "encoded as {:?}", p.encode());
            prop_assert_eq!(decoded.unwrap().into_event(), Ok((name, args, id)));
        }

        #[test]
        fn acks_round_trip(args in prop::collection::vec(any_json(), 0..4), nsp in nsp(), id in any::<u64>()) {
            let mut p = Packet::ack(id, args);
            p.nsp = nsp;
            prop_assert_eq!(Packet::decode(&p.encode()), Ok(p));
        }

        #[test]
        fn connect_packets_round_trip(nsp in nsp(), sid in text(20), message in text(20)) {
            for p in [Packet::connect_ok(&nsp, &sid), Packet::connect_error(&nsp, &message), Packet::disconnect(&nsp)] {
                prop_assert_eq!(Packet::decode(&p.encode()), Ok(p));
            }
        }
    }
}
