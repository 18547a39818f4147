//! Engine.IO v4 packet codec (pure functions).
//!
//! A packet is one type character followed by its data:
//! open `0{json}`, close `1`, ping `2`, pong `3`, message `4...`, upgrade `5`, noop `6`.
//! HTTP long-polling payloads are packets joined by the record separator `\x1e`;
//! binary messages travel in polling payloads as `b<base64>`. A websocket frame
//! carries exactly one packet (a binary frame is a binary message).

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
        fn websocket_frames_carry_any_text(data in text(40)) {
            // A websocket frame is one packet, so even the separator may appear in it.
            let p = Packet::Message(data);
            prop_assert_eq!(Packet::decode(&p.encode()), Ok(p));
        }
    }
}
