//! Light receive-only peers for load generation, on webrtc-rs's sans-I/O core `rtc`.
//!
//! A load generator on the same machine as the server must receive more cheaply than the
//! server forwards, or it measures itself. A light peer runs ICE, DTLS and SRTCP in full
//! (the server cannot tell it from a browser's receive side, apart from sending no RTCP
//! feedback of its own) but, unless it `decrypts`, reads each media packet's RTP header in
//! clear — SRTP encrypts only the payload — and never decrypts it: sequence numbers give
//! loss and order, arrival times give rates. A few decrypting peers among them read the
//! payloads' send-time markers for latency. A peer with `feedback` receives in full (it
//! decrypts) and answers as a browser's receive side does: transport-wide congestion
//! control feedback (TWCC) and receiver reports, so the server's bandwidth estimation
//! works for it. One task per peer, one socket each, on the caller's runtime.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::arrival::{Stamped, record_arrivals, try_recv_stamped};
use anyhow::{Context, anyhow};
use bytes::{Bytes, BytesMut};
use rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::{Registry, Slot};
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::interceptor_registry::{configure_rtcp_reports, configure_twcc_receiver_only};
use rtc::peer_connection::configuration::media_engine::MediaEngine;
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::transport::{CandidateConfig, CandidateHostConfig, RTCIceCandidate};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use rtc::sansio::Protocol;
use rtc::shared::marshal::{MarshalSize, Unmarshal};
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use serde_json::json;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;

use crate::peer::{Received, now_us, offer_session, session_ready};
use crate::signaling::Signaling;

/// Bytes SRTP appends to every packet with `AES128_CM_HMAC_SHA1_80` (the profile offered).
const SRTP_TAG: usize = 10;

/// A light peer before it starts receiving: its connection and socket.
pub struct LightPeer {
    pc: RTCPeerConnection,
    socket: UdpSocket,
    local: SocketAddr,
    decrypts: bool,
    video_only: bool,
}

/// How a light peer receives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LightOptions {
    /// Decrypt payloads (to read markers).
    pub decrypts: bool,
    /// Send TWCC feedback and receiver reports, as browsers do (the peer then decrypts).
    pub feedback: bool,
    /// Receive video only (a stream without audio).
    pub video_only: bool,
}

/// A running light peer; it stops when dropped.
pub struct LightSubscriber {
    /// The server's subscription id.
    pub id: String,
    /// Every media packet received, in arrival order (payloads empty unless it decrypts).
    pub received: Arc<Mutex<Vec<Received>>>,
    /// Whether payloads are decrypted (and markers can be read).
    pub decrypts: bool,
    _stop: oneshot::Sender<()>,
}

impl LightPeer {
    /// A peer with its socket and host candidate on `ip` (a loopback-range address),
    /// offering only the SRTP profile every server has.
    pub async fn new(ip: &str, decrypts: bool) -> anyhow::Result<LightPeer> {
        LightPeer::with_options(ip, LightOptions { decrypts, ..LightOptions::default() }).await
    }

    /// [`LightPeer::new`] with more choices.
    pub async fn with_options(ip: &str, options: LightOptions) -> anyhow::Result<LightPeer> {
        let socket = UdpSocket::bind(format!("{ip}:0")).await?;
        let local = socket.local_addr()?;
        if options.feedback {
            // Arrival times as the kernel saw them: a load generator's peer may read its
            // socket late, which would squeeze the arrivals its feedback reports.
            record_arrivals(&socket)?;
        }
        let mut media = MediaEngine::default();
        media.register_default_codecs()?;
        let registry =
            if options.feedback { configure_rtcp_reports(configure_twcc_receiver_only(Registry::new(), &mut media)?) } else { Registry::new() };
        // A peer that decrypts can tell a keyframe, and asks for one as a browser does when
        // none comes (`crate::loss`): a server whose join-time request the publisher ignored
        // (libwebrtc takes one per 300 ms) must not leave it without a picture for that.
        let registry =
            if options.decrypts || options.feedback { registry.with(Slot::from(14_100), crate::loss::KeyframeOnLoss::default()) } else { registry };
        let settings = SettingEngineBuilder::new()
            .with_multicast_dns_mode(MulticastDnsMode::Disabled)
            .with_srtp_protection_profiles(vec![SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80])
            .build();
        let pc = RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(media)
            .with_setting_engine(settings)
            .with_interceptor_registry(registry)
            .build(Instant::now())?;
        Ok(LightPeer { pc, socket, local, decrypts: options.decrypts || options.feedback, video_only: options.video_only })
    }

    fn add_host_candidate(&mut self) -> anyhow::Result<()> {
        let candidate = CandidateHostConfig {
            base_config: CandidateConfig {
                network: "udp".to_owned(),
                address: self.local.ip().to_string(),
                port: self.local.port(),
                component: 1,
                ..Default::default()
            },
            ..Default::default()
        }
        .new_candidate_host()?;
        self.pc.add_local_candidate(RTCIceCandidate::from(&candidate).to_json()?)?;
        Ok(())
    }

    /// Offers recvonly audio and video, or video alone (servers that answer, like
    /// Tessera): returns the offer SDP and the (kind, mid) of each m-line.
    pub fn offer_recvonly(&mut self) -> anyhow::Result<(String, Vec<(&'static str, String)>)> {
        let mut ids = Vec::new();
        let kinds: &[(RtpCodecKind, &'static str)] =
            if self.video_only { &[(RtpCodecKind::Video, "video")] } else { &[(RtpCodecKind::Audio, "audio"), (RtpCodecKind::Video, "video")] };
        for &(kind, name) in kinds {
            let init = RTCRtpTransceiverInit { direction: RTCRtpTransceiverDirection::Recvonly, streams: vec![], send_encodings: vec![] };
            ids.push((name, self.pc.add_transceiver_from_kind(kind, Some(init))?));
        }
        let offer = self.pc.create_offer(None)?;
        self.pc.set_local_description(Instant::now(), offer)?;
        self.add_host_candidate()?;
        let mut mids = Vec::new();
        for (name, id) in ids {
            let mid = self.pc.rtp_transceiver(id).and_then(|t| t.mid().clone()).ok_or_else(|| anyhow!("{name} transceiver without mid"))?;
            mids.push((name, mid));
        }
        let sdp = self.pc.local_description().ok_or_else(|| anyhow!("no local offer"))?.sdp;
        Ok((sdp, mids))
    }

    /// Applies the server's answer to [`LightPeer::offer_recvonly`].
    pub fn apply_answer(&mut self, sdp: String) -> anyhow::Result<()> {
        self.pc.set_remote_description(Instant::now(), RTCSessionDescription::answer(sdp)?)?;
        Ok(())
    }

    /// Answers a server's offer (servers that offer subscriptions, like Janus) with this
    /// peer's host candidate; returns the answer SDP.
    pub fn answer(&mut self, offer: String) -> anyhow::Result<String> {
        self.pc.set_remote_description(Instant::now(), RTCSessionDescription::offer(offer)?)?;
        self.add_host_candidate()?;
        let answer = self.pc.create_answer(None)?;
        self.pc.set_local_description(Instant::now(), answer)?;
        Ok(self.pc.local_description().ok_or_else(|| anyhow!("no local answer"))?.sdp)
    }

    /// Starts receiving on a task of the current runtime. `remote_sdp` (the server's offer
    /// or answer) tells which payload types are audio and which video.
    pub fn start(self, id: String, remote_sdp: &str) -> LightSubscriber {
        let kinds = payload_kinds(remote_sdp);
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let (stop_tx, stop_rx) = oneshot::channel();
        let decrypts = self.decrypts;
        tokio::spawn(run(self, kinds, received.clone(), stop_rx));
        LightSubscriber { id, received, decrypts, _stop: stop_tx }
    }
}

/// Subscribes to audio and video of `stream` through Tessera's portal with a light peer on `ip`.
pub async fn subscribe(sig: &mut Signaling, ip: &str, stream: &str, decrypts: bool) -> anyhow::Result<LightSubscriber> {
    subscribe_with(sig, ip, stream, LightOptions { decrypts, ..LightOptions::default() }).await
}

/// [`subscribe`] with more choices.
pub async fn subscribe_with(sig: &mut Signaling, ip: &str, stream: &str, options: LightOptions) -> anyhow::Result<LightSubscriber> {
    let mut peer = LightPeer::with_options(ip, options).await?;
    let (offer, mids) = peer.offer_recvonly()?;
    let tracks: Vec<_> = mids.iter().map(|(kind, mid)| json!({"type": kind, "mid": mid, "from": stream})).collect();
    let mut transport = None;
    let (session, answer) =
        offer_session(sig, &mut transport, "subscribe", json!({"media": {"tracks": tracks}}), offer).await.context("subscribe")?;
    peer.apply_answer(answer.clone())?;
    // Running before `ready`: the server reports it once ICE and DTLS are through.
    let sub = peer.start(session.clone(), &answer);
    session_ready(sig, transport.as_deref().unwrap_or_default(), &session, Duration::from_secs(10)).await?;
    Ok(sub)
}

/// Payload type → `audio`/`video`, from the m-lines of an SDP.
fn payload_kinds(sdp: &str) -> HashMap<u8, &'static str> {
    let mut out = HashMap::new();
    for line in sdp.lines() {
        let mut f = line.split_whitespace();
        let kind = match f.next() {
            Some("m=audio") => "audio",
            Some("m=video") => "video",
            _ => continue,
        };
        // m=<kind> <port> <proto> <fmt>...
        for pt in f.skip(2).filter_map(|p| p.parse::<u8>().ok()) {
            out.insert(pt, kind);
        }
    }
    out
}

/// RTP (not RTCP, STUN or DTLS): version 2 and a payload type outside RTCP's 64..=95 (RFC 5761).
fn is_rtp(d: &[u8]) -> bool {
    matches!(d, [b0, b1, ..] if (128..=191).contains(b0) && !(64..=95).contains(&(b1 & 0x7f)))
}

/// Receives one datagram: its length, its sender, and when it arrived (the kernel's
/// receive time where the socket records it, else now).
async fn recv(socket: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr, Instant)> {
    loop {
        socket.readable().await?;
        if let Some(got) = try_recv(socket, buf)? {
            return Ok(got);
        }
    }
}

/// [`recv`] without waiting: `None` when nothing is queued (or a datagram came without a
/// sender address, which is skipped).
fn try_recv(socket: &UdpSocket, buf: &mut [u8]) -> std::io::Result<Option<(usize, SocketAddr, Instant)>> {
    let Some(Stamped { len, from: Some(from), at }) = try_recv_stamped(socket, buf)? else { return Ok(None) };
    let now = Instant::now();
    // The kernel stamps with the wall clock: how long ago that was, on the monotonic one.
    let ago = at.and_then(|s| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.checked_sub(s));
    Ok(Some((len, from, ago.and_then(|a| now.checked_sub(a)).unwrap_or(now))))
}

async fn run(mut peer: LightPeer, kinds: HashMap<u8, &'static str>, log: Arc<Mutex<Vec<Received>>>, mut stop: oneshot::Receiver<()>) {
    let mut buf = vec![0u8; 2048];
    // One timer for the peer's life, moved when the connection's deadline moves: a fresh
    // one per datagram cost a load generator of thousands of peers a timer-wheel insert
    // and removal per packet.
    let mut deadline = Instant::now();
    let sleep = tokio::time::sleep_until(deadline.into());
    tokio::pin!(sleep);
    loop {
        while let Some(out) = peer.pc.poll_write() {
            let _ = peer.socket.send_to(&out.message, out.transport.peer_addr).await;
        }
        while peer.pc.poll_event().is_some() {}
        while let Some(m) = peer.pc.poll_read() {
            if let RTCMessage::RtpPacket(_, p) = m.message {
                let kind = kinds.get(&p.header.payload_type).copied().unwrap_or("video");
                let size = p.header.marshal_size() + p.payload.len();
                record(&log, Received { kind, header: p.header, payload: p.payload, arrived_us: now_us(), size });
            }
        }
        let next = peer.pc.poll_timeout().unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        // One that fired is armed again even for the same instant: a completed timer would
        // be ready at every turn.
        if next != deadline || sleep.is_elapsed() {
            deadline = next;
            sleep.as_mut().reset(deadline.into());
        }
        tokio::select! {
            _ = &mut stop => break,
            () = &mut sleep => {
                let _ = peer.pc.handle_timeout(Instant::now());
            }
            r = recv(&peer.socket, &mut buf) => {
                let Ok(mut got) = r else { break };
                // What else is queued on the socket, up to a batch, before the next turn.
                for _ in 0..RECV_BATCH {
                    let (n, from, arrived) = got;
                    if let Some(d) = buf.get(..n) {
                        take(&mut peer, &kinds, &log, d, from, arrived);
                    }
                    match try_recv(&peer.socket, &mut buf) {
                        Ok(Some(more)) => got = more,
                        _ => break,
                    }
                }
            }
        }
    }
    let _ = peer.pc.close();
    while let Some(out) = peer.pc.poll_write() {
        let _ = peer.socket.send_to(&out.message, out.transport.peer_addr).await;
    }
}

/// Datagrams a peer reads from its socket in one turn at most.
const RECV_BATCH: usize = 32;

fn record(log: &Mutex<Vec<Received>>, r: Received) {
    if let Ok(mut l) = log.lock() {
        l.push(r);
    }
}

/// One datagram: a media packet read in clear by a peer that does not decrypt, anything
/// else to the connection.
fn take(peer: &mut LightPeer, kinds: &HashMap<u8, &'static str>, log: &Mutex<Vec<Received>>, d: &[u8], from: SocketAddr, arrived: Instant) {
    if !peer.decrypts && is_rtp(d) {
        let mut b = d;
        if let Ok(header) = rtp::Header::unmarshal(&mut b) {
            let kind = kinds.get(&header.payload_type).copied().unwrap_or("video");
            record(log, Received { kind, header, payload: Bytes::new(), arrived_us: now_us(), size: d.len().saturating_sub(SRTP_TAG) });
        }
        return;
    }
    let msg = TaggedBytesMut {
        now: arrived,
        transport: TransportContext { local_addr: peer.local, peer_addr: from, ecn: None, transport_protocol: TransportProtocol::UDP },
        message: BytesMut::from(d),
    };
    let _ = peer.pc.handle_read(msg);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_rtp() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111 0\r\na=mid:0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96 97\r\n";
        let k = payload_kinds(sdp);
        assert_eq!((k[&111], k[&0], k[&96], k[&97]), ("audio", "audio", "video", "video"));
        assert!(is_rtp(&[0x80, 96]) && is_rtp(&[0x80, 0x80 | 111]));
        assert!(!is_rtp(&[0x80, 200]) && !is_rtp(&[0x81, 201]), "RTCP SR/RR");
        assert!(!is_rtp(&[0x00, 0x01]) && !is_rtp(&[22, 254]) && !is_rtp(&[0x80]));
    }
}
