//! Engine.IO v4 and v3 packet codec (pure functions).
//!
//! A packet is one type character followed by its data:
//! open `0{json}`, close `1`, ping `2`, pong `3`, message `4...`, upgrade `5`, noop `6`.
//! A websocket frame carries exactly one packet.
//!
//! - v4: long-polling payloads are packets joined by the record separator `\x1e`;
//!   binary messages travel in polling payloads as `b<base64>`; a binary websocket frame
//!   is a binary message.
//! - v3 (socket.io-client 2.x): long-polling payloads are `<length>:<packet>` records
//!   concatenated, the length counted in UTF-16 code units (JavaScript string length);
//!   binary messages travel in text as `b4<base64>`; a binary websocket frame starts with
//!   the packet type byte (`4`).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Serialize;

/// The record separator joining packets in a long-polling payload.
pub const SEPARATOR: char = '\x1e';

/// One Engine.IO packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// `0` + JSON handshake data (server → client).
    Open(String),
    /// `1`
    Close,
    /// `2` + optional data (`probe` during an upgrade).
    Ping(String),
    /// `3` + optional data.
    Pong(String),
    /// `4` + text data.
    Message(String),
    /// A binary message: `b<base64>` in polling, a binary frame on a websocket.
    Binary(Vec<u8>),
    /// `5`
    Upgrade,
    /// `6`
    Noop,
}

/// Why an Engine.IO packet could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("empty packet")]
    Empty,
    #[error("unknown packet type {0:?}")]
    UnknownType(char),
    #[error("invalid base64 in binary packet")]
    Base64,
    #[error("invalid record length in payload")]
    BadLength,
}

/// The Engine.IO protocol version of a session (the `EIO` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eio {
    /// Engine.IO 3 (socket.io-client 2.x, Socket.IO protocol 4): the client pings.
    V3,
    /// Engine.IO 4 (socket.io-client 3.x/4.x, Socket.IO protocol 5): the server pings.
    V4,
}

/// Largest record length accepted in a v3 payload (longer than any accepted body).
const MAX_V3_RECORD: usize = 1 << 40;

impl Eio {
    /// The version named by an `EIO` query value.
    pub fn from_query(value: &str) -> Option<Eio> {
        match value {
            "3" => Some(Eio::V3),
            "4" => Some(Eio::V4),
            _ => None,
        }
    }

    /// Encodes one packet in its text form for this version.
    pub fn encode_packet(self, p: &Packet) -> String {
        match (self, p) {
            (Eio::V3, Packet::Binary(bytes)) => format!("b4{}", BASE64.encode(bytes)),
            _ => p.encode(),
        }
    }

    /// Decodes one packet from its text form for this version. Never panics.
    pub fn decode_packet(self, s: &str) -> Result<Packet, EngineError> {
        match self {
            Eio::V4 => Packet::decode(s),
            Eio::V3 => match s.strip_prefix('b') {
                Some(rest) => match rest.strip_prefix('4') {
                    Some(data) => Ok(Packet::Binary(BASE64.decode(data).map_err(|_| EngineError::Base64)?)),
                    None => Err(EngineError::UnknownType('b')),
                },
                None => Packet::decode(s),
            },
        }
    }

    /// Decodes a binary websocket frame (v3 frames start with the packet type byte).
    pub fn decode_binary_frame(self, bytes: &[u8]) -> Result<Packet, EngineError> {
        match self {
            Eio::V4 => Ok(Packet::Binary(bytes.to_vec())),
            Eio::V3 => match bytes.split_first() {
                Some((4, data)) => Ok(Packet::Binary(data.to_vec())),
                Some((other, _)) => Err(EngineError::UnknownType(char::from(*other))),
                None => Err(EngineError::Empty),
            },
        }
    }

    /// The bytes of a binary websocket frame carrying `data`.
    pub fn binary_frame(self, data: &[u8]) -> Vec<u8> {
        match self {
            Eio::V4 => data.to_vec(),
            Eio::V3 => {
                let mut frame = Vec::with_capacity(data.len() + 1);
                frame.push(4);
                frame.extend_from_slice(data);
                frame
            }
        }
    }

    /// Joins packets into a long-polling payload.
    pub fn encode_payload(self, packets: &[Packet]) -> String {
        match self {
            Eio::V4 => encode_payload(packets),
            Eio::V3 => {
                if packets.is_empty() {
                    return "0:".to_owned();
                }
                let mut out = String::new();
                for p in packets {
                    let encoded = self.encode_packet(p);
                    out.push_str(&encoded.encode_utf16().count().to_string());
                    out.push(':');
                    out.push_str(&encoded);
                }
                out
            }
        }
    }

    /// Splits a long-polling payload into packets. Fails on the first bad record.
    pub fn decode_payload(self, s: &str) -> Result<Vec<Packet>, EngineError> {
        match self {
            Eio::V4 => decode_payload(s),
            Eio::V3 => decode_payload_v3(s),
        }
    }
}

/// Splits a v3 payload of `<length>:<packet>` records (engine.io-parser 2.x
/// `decodePayload`): empty records are skipped, anything malformed is an error.
fn decode_payload_v3(s: &str) -> Result<Vec<Packet>, EngineError> {
    if s.is_empty() {
        return Err(EngineError::Empty);
    }
    let mut packets = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let colon = rest.find(':').ok_or(EngineError::BadLength)?;
        let digits = &rest[..colon];
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(EngineError::BadLength);
        }
        let len = digits.parse::<usize>().ok().filter(|n| *n <= MAX_V3_RECORD).ok_or(EngineError::BadLength)?;
        let body = &rest[colon + 1..];
        // Walk `len` UTF-16 code units; a record must not end inside a surrogate pair.
        let mut units = 0;
        let mut end = 0;
        for c in body.chars() {
            if units >= len {
                break;
            }
            units += c.len_utf16();
            end += c.len_utf8();
        }
        if units != len {
            return Err(EngineError::BadLength);
        }
        if len > 0 {
            packets.push(Eio::V3.decode_packet(&body[..end])?);
        }
        rest = &body[end..];
    }
    Ok(packets)
}

impl Packet {
    /// Encodes the packet in its text form (binary messages as `b<base64>`).
    pub fn encode(&self) -> String {
        match self {
            Packet::Open(data) => format!("0{data}"),
            Packet::Close => "1".to_owned(),
            Packet::Ping(data) => format!("2{data}"),
            Packet::Pong(data) => format!("3{data}"),
            Packet::Message(data) => format!("4{data}"),
            Packet::Binary(bytes) => format!("b{}", BASE64.encode(bytes)),
            Packet::Upgrade => "5".to_owned(),
            Packet::Noop => "6".to_owned(),
        }
    }

    /// Decodes one packet from its text form. Never panics.
    pub fn decode(s: &str) -> Result<Packet, EngineError> {
        let mut chars = s.chars();
        let kind = chars.next().ok_or(EngineError::Empty)?;
        let data = chars.as_str();
        Ok(match kind {
            '0' => Packet::Open(data.to_owned()),
            '1' => Packet::Close,
            '2' => Packet::Ping(data.to_owned()),
            '3' => Packet::Pong(data.to_owned()),
            '4' => Packet::Message(data.to_owned()),
            '5' => Packet::Upgrade,
            '6' => Packet::Noop,
            'b' => Packet::Binary(BASE64.decode(data).map_err(|_| EngineError::Base64)?),
            other => return Err(EngineError::UnknownType(other)),
        })
    }

    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Packet::Open(_) => "open",
            Packet::Close => "close",
            Packet::Ping(_) => "ping",
            Packet::Pong(_) => "pong",
            Packet::Message(_) => "message",
            Packet::Binary(_) => "binary",
            Packet::Upgrade => "upgrade",
            Packet::Noop => "noop",
        }
    }
}

/// Joins packets into a long-polling payload.
pub fn encode_payload(packets: &[Packet]) -> String {
    let mut out = String::new();
    for (i, p) in packets.iter().enumerate() {
        if i > 0 {
            out.push(SEPARATOR);
        }
        out.push_str(&p.encode());
    }
    out
}

/// Splits a long-polling payload into packets. Fails on the first bad packet.
pub fn decode_payload(s: &str) -> Result<Vec<Packet>, EngineError> {
    s.split(SEPARATOR).map(Packet::decode).collect()
}

/// The JSON data of the open packet.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenInfo<'a> {
    pub sid: &'a str,
    pub upgrades: &'a [&'a str],
    pub ping_interval: u64,
    pub ping_timeout: u64,
    pub max_payload: usize,
}

impl OpenInfo<'_> {
    /// The open packet carrying this handshake data.
    pub fn packet(&self) -> Packet {
        // Serializing a struct of strings and integers cannot fail.
        Packet::Open(serde_json::to_string(self).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Frames below were produced by the npm package engine.io-parser 5.2.3
    // (tests/node/gen-frames.mjs), encodePacket(..., supportsBinary = false) and encodePayload.

    #[test]
    fn decodes_reference_packets() {
        let cases: &[(&str, Packet)] = &[
            ("1", Packet::Close),
            ("2", Packet::Ping(String::new())),
            ("2probe", Packet::Ping("probe".into())),
            ("3", Packet::Pong(String::new())),
            ("3probe", Packet::Pong("probe".into())),
            ("4hello é 🎉", Packet::Message("hello é 🎉".into())),
            ("5", Packet::Upgrade),
            ("6", Packet::Noop),
            ("bAQID/w==", Packet::Binary(vec![1, 2, 3, 255])),
        ];
        for (frame, packet) in cases {
            assert_eq!(&Packet::decode(frame).unwrap(), packet, "decode {frame:?}");
            assert_eq!(&packet.encode(), frame, "encode {packet:?}");
        }
    }

    #[test]
    fn open_packet_matches_reference_layout() {
        let reference = "0{\"sid\":\"abc\",\"upgrades\":[\"websocket\"],\"pingInterval\":25000,\"pingTimeout\":20000,\"maxPayload\":1000000}";
        let info = OpenInfo { sid: "abc", upgrades: &["websocket"], ping_interval: 25000, ping_timeout: 20000, max_payload: 1_000_000 };
        assert_eq!(info.packet().encode(), reference);
        assert_eq!(Packet::decode(reference).unwrap(), info.packet());
    }

    #[test]
    fn payload_round_trip() {
        let reference = "440\u{1e}442[\"echo\",\"a,b\"]\u{1e}2\u{1e}bAQID";
        let packets = vec![
            Packet::Message("40".into()),
            Packet::Message("42[\"echo\",\"a,b\"]".into()),
            Packet::Ping(String::new()),
            Packet::Binary(vec![1, 2, 3]),
        ];
        assert_eq!(decode_payload(reference).unwrap(), packets);
        assert_eq!(encode_payload(&packets), reference);
        // engine.io-parser decodePayload('4hello\x1e2\x1ebAQID')
        assert_eq!(
            decode_payload("4hello\u{1e}2\u{1e}bAQID").unwrap(),
            vec![Packet::Message("hello".into()), Packet::Ping(String::new()), Packet::Binary(vec![1, 2, 3])]
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(Packet::decode(""), Err(EngineError::Empty));
        assert_eq!(Packet::decode("x"), Err(EngineError::UnknownType('x')));
        assert_eq!(Packet::decode("é"), Err(EngineError::UnknownType('é')));
        assert_eq!(Packet::decode("b!!!"), Err(EngineError::Base64));
        assert_eq!(decode_payload(""), Err(EngineError::Empty));
        assert_eq!(decode_payload("4a\u{1e}\u{1e}4b"), Err(EngineError::Empty));
        assert_eq!(decode_payload("4a\u{1e}9"), Err(EngineError::UnknownType('9')));
        assert_eq!(decode_payload("garbage!!"), Err(EngineError::UnknownType('g')));
    }
}

#[cfg(test)]
mod v3_tests {
    use super::*;

    // Frames below were produced by engine.io-parser 2.2.1, the parser of socket.io-client
    // 2.x (tests/node/gen-frames.mjs, encodePayload(..., supportsBinary = false)).

    #[test]
    fn eio_versions_from_query() {
        assert_eq!(Eio::from_query("3"), Some(Eio::V3));
        assert_eq!(Eio::from_query("4"), Some(Eio::V4));
        for other in ["", "2", "5", "03", "4 ", "v4"] {
            assert_eq!(Eio::from_query(other), None, "{other:?}");
        }
    }

    #[test]
    fn v3_payload_matches_reference() {
        let reference = "3:44017:442[\"echo\",\"a,b\"]1:26:b4AQID";
        let packets = vec![
            Packet::Message("40".into()),
            Packet::Message("42[\"echo\",\"a,b\"]".into()),
            Packet::Ping(String::new()),
            Packet::Binary(vec![1, 2, 3]),
        ];
        assert_eq!(Eio::V3.encode_payload(&packets), reference);
        assert_eq!(Eio::V3.decode_payload(reference).unwrap(), packets);
        assert_eq!(Eio::V3.encode_payload(&[]), "0:");
        assert_eq!(Eio::V3.decode_payload("0:").unwrap(), vec![]);
        // Empty records are skipped, as engine.io-parser does.
        assert_eq!(Eio::V3.decode_payload("2:4a0:2:40").unwrap(), vec![Packet::Message("a".into()), Packet::Message("0".into())]);
        assert_eq!(Eio::V3.encode_packet(&Packet::Binary(vec![1, 2, 3, 255])), "b4AQID/w==");
        assert_eq!(Eio::V3.decode_packet("b4AQID/w==").unwrap(), Packet::Binary(vec![1, 2, 3, 255]));
        // The other packets are written as in v4.
        assert_eq!(Eio::V3.encode_payload(&[Packet::Close]), "1:1");
        assert_eq!(Eio::V3.encode_payload(&[Packet::Noop]), "1:6");
    }

    #[test]
    fn v3_lengths_count_utf16_code_units() {
        // "é" is one UTF-16 unit (2 UTF-8 bytes), "🎉" two (a surrogate pair; 4 bytes).
        let reference = "15:442[\"e\",\"é 🎉\"]6:2probe";
        let packets = vec![Packet::Message("42[\"e\",\"é 🎉\"]".into()), Packet::Ping("probe".into())];
        assert_eq!(Eio::V3.encode_payload(&packets), reference);
        assert_eq!(Eio::V3.decode_payload(reference).unwrap(), packets);
        assert_eq!(Eio::V3.decode_payload("3:4🎉").unwrap(), vec![Packet::Message("🎉".into())]);
        assert_eq!(Eio::V3.encode_payload(&[Packet::Message("🎉🎉".into())]), "5:4🎉🎉");
        // A length ending inside a surrogate pair is refused.
        assert_eq!(Eio::V3.decode_payload("2:4🎉"), Err(EngineError::BadLength));
        assert_eq!(Eio::V3.decode_payload("4:4🎉"), Err(EngineError::BadLength));
    }

    #[test]
    fn v3_binary_websocket_frames_carry_the_type_byte() {
        assert_eq!(Eio::V3.binary_frame(&[1, 2, 3, 255]), vec![4, 1, 2, 3, 255]);
        assert_eq!(Eio::V3.decode_binary_frame(&[4, 1, 2, 3, 255]).unwrap(), Packet::Binary(vec![1, 2, 3, 255]));
        assert_eq!(Eio::V3.decode_binary_frame(&[]), Err(EngineError::Empty));
        assert_eq!(Eio::V3.decode_binary_frame(&[2, 1]), Err(EngineError::UnknownType('\u{2}')));
        assert_eq!(Eio::V4.binary_frame(&[1, 2]), vec![1, 2]);
        assert_eq!(Eio::V4.decode_binary_frame(&[1, 2]).unwrap(), Packet::Binary(vec![1, 2]));
    }

    #[test]
    fn v3_malformed_payloads_are_errors_not_panics() {
        use EngineError::*;
        let cases: &[(&str, EngineError)] = &[
            ("", Empty),
            ("2:4a1", BadLength),
            ("x:4a", BadLength),
            (":4a", BadLength),
            ("-1:4", BadLength),
            ("+2:4a", BadLength),
            ("2 :4a", BadLength),
            ("4a", BadLength),
            ("3:4a", BadLength),
            ("99999999999999999999999999:4a", BadLength),
            ("18446744073709551615:4", BadLength),
            ("1:9", UnknownType('9')),
            ("2:b9", UnknownType('b')),
            ("3:b4!", Base64),
            ("2:é4", UnknownType('é')),
        ];
        for (payload, error) in cases {
            assert_eq!(Eio::V3.decode_payload(payload).as_ref(), Err(error), "{payload:?}");
        }
        // A v4 payload is not a v3 one, nor the other way round.
        assert!(Eio::V3.decode_payload("4hello\u{1e}2").is_err());
        assert!(Eio::V4.decode_payload("8:4hello").is_err());
    }
}

/// Property tests: decoding never panics, re-encodes to its input where the packet keeps
/// its data, and every packet (and payload) survives encode → decode.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn config() -> ProptestConfig {
        ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() }
    }

    fn text(max: usize) -> impl Strategy<Value = String> {
        prop::collection::vec(any::<char>(), 0..max).prop_map(String::from_iter)
    }

    /// Text without the payload separator (which no packet of a payload can carry).
    fn payload_text() -> impl Strategy<Value = String> {
        text(24).prop_map(|s| s.replace(SEPARATOR, ""))
    }

    fn packet() -> impl Strategy<Value = Packet> {
        prop_oneof![
            payload_text().prop_map(Packet::Open),
            Just(Packet::Close),
            payload_text().prop_map(Packet::Ping),
            payload_text().prop_map(Packet::Pong),
            payload_text().prop_map(Packet::Message),
            prop::collection::vec(any::<u8>(), 0..40).prop_map(Packet::Binary),
            Just(Packet::Upgrade),
            Just(Packet::Noop),
        ]
    }

    /// v3 packets: any data (the separator too: v3 records are length-prefixed).
    fn v3_packet() -> impl Strategy<Value = Packet> {
        prop_oneof![
            text(24).prop_map(Packet::Open),
            Just(Packet::Close),
            text(24).prop_map(Packet::Ping),
            text(24).prop_map(Packet::Pong),
            text(24).prop_map(Packet::Message),
            prop::collection::vec(any::<u8>(), 0..40).prop_map(Packet::Binary),
            Just(Packet::Upgrade),
            Just(Packet::Noop),
        ]
    }

    /// v3 payload-like strings: digits, colons, packet types, non-BMP characters.
    fn v3_wire() -> impl Strategy<Value = String> {
        prop_oneof![text(40), "[0-9:b4A-Za-z+/=é🎉\u{1e}]{0,40}", "([0-9]{1,2}:[0-6b][a🎉é4]{0,4}){0,5}"]
    }

    /// Strings over the characters that mean something to the codec, and any at all.
    fn wire() -> impl Strategy<Value = String> {
        prop_oneof![text(40), "[0-6b4\u{1e}A-Za-z0-9+/=!é]{0,40}"]
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn decode_never_panics_and_keeps_what_it_reads(s in wire()) {
            if let Ok(p) = Packet::decode(&s) {
                let encoded = p.encode();
                match p {
                    // These carry no data: anything after the type is ignored.
                    Packet::Close | Packet::Upgrade | Packet::Noop => prop_assert!(s.starts_with(&encoded)),
                    // The others keep their data byte for byte (base64 is canonical).
                    _ => prop_assert_eq!(&encoded, &s),
                }
            }
            if let Ok(packets) = decode_payload(&s) {
                prop_assert_eq!(packets.len(), s.split(SEPARATOR).count());
            }
        }

        #[test]
        fn packets_round_trip(p in packet()) {
            prop_assert_eq!(Packet::decode(&p.encode()), Ok(p));
        }

        #[test]
        fn payloads_round_trip(packets in prop::collection::vec(packet(), 1..6)) {
            prop_assert_eq!(decode_payload(&encode_payload(&packets)), Ok(packets));
        }

        #[test]
        fn v3_decode_never_panics_and_keeps_what_it_reads(s in v3_wire()) {
            if let Ok(packets) = Eio::V3.decode_payload(&s) {
                // Re-encoding gives the input back, minus empty records and ignored data.
                let again = Eio::V3.encode_payload(&packets);
                prop_assert_eq!(Eio::V3.decode_payload(&again), Ok(packets));
            }
        }

        #[test]
        fn v3_payloads_round_trip(packets in prop::collection::vec(v3_packet(), 0..6)) {
            let encoded = Eio::V3.encode_payload(&packets);
            prop_assert_eq!(Eio::V3.decode_payload(&encoded), Ok(packets.clone()));
            // Each record's length is the JavaScript string length of its packet.
            let mut rest = encoded.as_str();
            for p in &packets {
                let (len, tail) = rest.split_once(':').unwrap();
                let body = Eio::V3.encode_packet(p);
                prop_assert_eq!(len.parse::<usize>().unwrap(), body.encode_utf16().count());
                prop_assert!(tail.starts_with(&body));
                rest = &tail[body.len()..];
            }
        }

        #[test]
        fn v3_truncated_payloads_are_refused(packets in prop::collection::vec(v3_packet(), 1..4), cut in any::<prop::sample::Index>()) {
            let encoded = Eio::V3.encode_payload(&packets);
            let boundaries: Vec<usize> = (1..encoded.len()).filter(|i| encoded.is_char_boundary(*i)).collect();
            prop_assume!(!boundaries.is_empty());
            let truncated = &encoded[..*cut.get(&boundaries)];
            // Cutting a payload anywhere gives an error or a prefix of the packets, never a panic.
            if let Ok(prefix) = Eio::V3.decode_payload(truncated) {
                prop_assert!(prefix.len() < packets.len());
                prop_assert_eq!(&packets[..prefix.len()], &prefix[..]);
            }
        }

        #[test]
        fn websocket_frames_carry_any_text(data in text(40)) {
            // A websocket frame is one packet, so even the separator may appear in it.
            let p = Packet::Message(data);
            prop_assert_eq!(Packet::decode(&p.encode()), Ok(p));
        }
    }
}
