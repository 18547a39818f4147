//! Which peer connection a datagram on a worker's shared socket belongs to.
//!
//! The server is ICE-lite, so every STUN packet it receives is a client's binding request,
//! and a binding request names the connection in its USERNAME (`<server ufrag>:<client
//! ufrag>`). Each connection has a server ufrag of its own, so the first part picks the
//! connection, and the packet's source address is learned for it. DTLS, SRTP and SRTCP
//! carry no such name: they are routed by source address alone (a NAT rebinding shows
//! up first as a consent check with a USERNAME, which moves the address).

use rtc::stun::attributes::ATTR_USERNAME;
use rtc::stun::message::{Message, is_stun_message};
use rtc::stun::textattrs::TextAttribute;

/// What a datagram is, for routing.
#[derive(Debug, PartialEq, Eq)]
pub enum Kind<'a> {
    /// A STUN message naming this server ufrag.
    Stun(&'a str),
    /// A STUN message without a usable USERNAME (a response, or garbage).
    StunAnonymous,
    /// Anything else (DTLS, SRTP, SRTCP): routed by address.
    Other,
}

/// Classifies a datagram; `scratch` holds the username it points into.
pub fn classify<'a>(datagram: &[u8], scratch: &'a mut String) -> Kind<'a> {
    if !is_stun_message(datagram) {
        return Kind::Other;
    }
    let mut m = Message { raw: datagram.to_vec(), ..Default::default() };
    if m.decode().is_err() {
        return Kind::StunAnonymous;
    }
    let Ok(name) = TextAttribute::get_from_as(&m, ATTR_USERNAME) else { return Kind::StunAnonymous };
    *scratch = name.text;
    match scratch.split_once(':') {
        Some((server, _)) if !server.is_empty() => Kind::Stun(server),
        _ => Kind::StunAnonymous,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::stun::message::{BINDING_REQUEST, Setter};

    fn binding_request(username: &str) -> Vec<u8> {
        let mut m = Message::new();
        let user = TextAttribute::new(ATTR_USERNAME, username.to_string());
        m.build(&[Box::new(BINDING_REQUEST), Box::new(user)]).unwrap();
        let _ = <TextAttribute as Setter>::add_to;
        m.raw
    }

    #[test]
    fn a_binding_request_names_its_connection() {
        let mut scratch = String::new();
        assert_eq!(classify(&binding_request("w0abcd:clientufrag"), &mut scratch), Kind::Stun("w0abcd"));
        assert_eq!(classify(&binding_request(":client"), &mut scratch), Kind::StunAnonymous);
        assert_eq!(classify(&binding_request("nocolon"), &mut scratch), Kind::StunAnonymous);
    }

    #[test]
    fn other_packets_are_routed_by_address() {
        let mut scratch = String::new();
        // A DTLS record (content type 22) and an RTP packet (version 2).
        assert_eq!(classify(&[22, 254, 253, 0, 0], &mut scratch), Kind::Other);
        assert_eq!(classify(&[0x80, 96, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1], &mut scratch), Kind::Other);
        assert_eq!(classify(&[], &mut scratch), Kind::Other);
        // STUN magic cookie but truncated.
        let mut bad = binding_request("w0abcd:x");
        bad.truncate(24);
        assert_ne!(classify(&bad, &mut scratch), Kind::Stun("w0abcd"));
    }
}
