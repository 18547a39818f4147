//! Which peer connection a datagram on a worker's shared socket belongs to.
//!
//! The server is ICE-lite, so the STUN packets it must route are clients' binding
//! requests, and a binding request names the connection in its USERNAME (`<server
//! ufrag>:<client ufrag>`). Each connection has a server ufrag of its own, so the first
//! part picks the connection. DTLS, SRTP and SRTCP carry no such name: they are routed by
//! source address. An address is learned only from a binding request signed with the
//! connection's password (checked by the worker before it moves any route), because the
//! ufrag travels in clear and anyone who saw it could otherwise redirect the connection.

use rtc::stun::attributes::ATTR_USERNAME;
use rtc::stun::message::{Message, is_stun_message};
use rtc::stun::textattrs::TextAttribute;

/// What a datagram is, for routing.
#[derive(Debug)]
pub enum Kind {
    /// A binding request naming this server ufrag; the decoded message, for the
    /// integrity check.
    BindingRequest {
        /// The server ufrag (before the `:`).
        ufrag: String,
        /// The decoded request.
        message: Box<Message>,
    },
    /// Any other STUN message, a request without a usable USERNAME, or garbage with the
    /// STUN cookie: routed by address like media.
    StunOther,
    /// Anything else (DTLS, SRTP, SRTCP): routed by address.
    Other,
}

/// Classifies a datagram. Only binding requests (type 0x0001) are decoded, so other
/// traffic costs no allocation.
pub fn classify(datagram: &[u8]) -> Kind {
    if !is_stun_message(datagram) {
        return Kind::Other;
    }
    if datagram.get(..2) != Some(&[0x00, 0x01][..]) {
        return Kind::StunOther;
    }
    let mut m = Message { raw: datagram.to_vec(), ..Default::default() };
    if m.decode().is_err() {
        return Kind::StunOther;
    }
    let Ok(name) = TextAttribute::get_from_as(&m, ATTR_USERNAME) else { return Kind::StunOther };
    match name.text.split_once(':') {
        Some((server, _)) if !server.is_empty() => Kind::BindingRequest { ufrag: server.to_string(), message: Box::new(m) },
        _ => Kind::StunOther,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::stun::message::{BINDING_REQUEST, BINDING_SUCCESS};

    fn stun(typ: rtc::stun::message::MessageType, username: &str) -> Vec<u8> {
        let mut m = Message::new();
        let user = TextAttribute::new(ATTR_USERNAME, username.to_string());
        m.build(&[Box::new(typ), Box::new(user)]).unwrap();
        m.raw
    }

    fn ufrag(k: Kind) -> Option<String> {
        match k {
            Kind::BindingRequest { ufrag, .. } => Some(ufrag),
            _ => None,
        }
    }

    #[test]
    fn a_binding_request_names_its_connection() {
        assert_eq!(ufrag(classify(&stun(BINDING_REQUEST, "w0abcd:clientufrag"))).as_deref(), Some("w0abcd"));
        assert_eq!(ufrag(classify(&stun(BINDING_REQUEST, ":client"))), None);
        assert_eq!(ufrag(classify(&stun(BINDING_REQUEST, "nocolon"))), None);
        // A response is not a request, whatever it carries.
        assert!(matches!(classify(&stun(BINDING_SUCCESS, "w0abcd:x")), Kind::StunOther));
    }

    #[test]
    fn other_packets_are_routed_by_address() {
        // A DTLS record (content type 22) and an RTP packet (version 2).
        assert!(matches!(classify(&[22, 254, 253, 0, 0]), Kind::Other));
        assert!(matches!(classify(&[0x80, 96, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1]), Kind::Other));
        assert!(matches!(classify(&[]), Kind::Other));
        // STUN magic cookie but truncated.
        let mut bad = stun(BINDING_REQUEST, "w0abcd:x");
        bad.truncate(24);
        assert!(ufrag(classify(&bad)).is_none());
    }
}
