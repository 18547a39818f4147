//! Sender reports (RFC 3550 §6.4.1) for the streams a connection sends: what rtc's sender
//! report interceptor does (the same counts, timing and reports; the stack's differential
//! test compares them byte for byte), with a way in by reference. A forwarded packet the
//! worker sends itself past rtc's pipeline is counted through [`SenderReports::on_send`]
//! instead of being moved into a queue and out again, and its stream is found in a short
//! list rather than a SipHash map.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rtc::interceptor::{AttributedPacket, Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtp;
use rtc::sansio::Protocol;
use rtc::shared::TransportContext;
use rtc::shared::error::Error;
use rtc::shared::time::SystemInstant;

/// How often a stream that sent something is reported (rtc's default).
pub const INTERVAL: Duration = Duration::from_secs(1);

/// The sender-report link of a connection's interceptors.
pub struct SenderReports {
    interval: Duration,
    /// Armed by the first packet counted, then every `interval`.
    next_timeout: Option<Instant>,
    /// Streams bound, searched linearly: a connection sends a few.
    streams: Vec<Stream>,
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
}

/// What one sending stream's report says.
struct Stream {
    ssrc: u32,
    clock_rate: f64,
    started: bool,
    last_sequence: u16,
    /// The RTP timestamp of the latest packet in order, when it went out, and the wall
    /// clock then (read once per new timestamp, as rtc does).
    last_timestamp: u32,
    last_at: Option<(Instant, SystemInstant)>,
    packets: u32,
    octets: u32,
}

impl Stream {
    fn count(&mut self, now: Instant, p: &rtp::Packet) {
        let seq = p.header.sequence_number;
        let diff = seq.wrapping_sub(self.last_sequence);
        if !self.started || (diff > 0 && diff < 1 << 15) {
            self.started = true;
            self.last_sequence = seq;
            if self.last_at.is_none() || p.header.timestamp != self.last_timestamp {
                self.last_timestamp = p.header.timestamp;
                self.last_at = Some((now, SystemInstant::now(now)));
            }
        }
        self.packets = self.packets.wrapping_add(1);
        self.octets = self.octets.wrapping_add(u32::try_from(p.payload.len()).unwrap_or(u32::MAX));
    }

    fn report(&self, now: Instant) -> Option<SenderReport> {
        let (at, wall) = self.last_at.as_ref()?;
        Some(SenderReport {
            ssrc: self.ssrc,
            ntp_time: wall.ntp(now),
            rtp_time: self.last_timestamp.wrapping_add((now.duration_since(*at).as_secs_f64() * self.clock_rate) as u32),
            packet_count: self.packets,
            octet_count: self.octets,
            ..Default::default()
        })
    }
}

impl SenderReports {
    /// Reports every `interval`.
    pub fn new(interval: Duration) -> Self {
        SenderReports { interval, next_timeout: None, streams: Vec::new(), read: VecDeque::new(), write: VecDeque::new() }
    }

    /// Counts an RTP packet going out on a bound stream.
    pub fn on_send(&mut self, now: Instant, p: &rtp::Packet) {
        if let Some(s) = self.streams.iter_mut().find(|s| s.ssrc == p.header.ssrc) {
            s.count(now, p);
            if self.next_timeout.is_none() {
                self.next_timeout = Some(now + self.interval);
            }
        }
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for SenderReports {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Error> {
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        crate::stack::next_of(&mut self.read)
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Error> {
        if let Packet::Rtp(p) = &msg.message.packet {
            self.on_send(msg.now, p);
        }
        self.write.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        crate::stack::next_of(&mut self.write)
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), Error> {
        if self.next_timeout.is_some_and(|t| now >= t) {
            self.next_timeout = Some(now + self.interval);
            for report in self.streams.iter().filter_map(|s| s.report(now)) {
                self.write.push_back(TaggedPacket {
                    now,
                    transport: TransportContext::default(),
                    message: AttributedPacket::new(Packet::Rtcp(vec![Box::new(report)])),
                });
            }
        }
        Ok(())
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        self.next_timeout
    }

    fn close(&mut self) -> Result<(), Error> {
        Ok(())
    }
}

impl Interceptor for SenderReports {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        self.streams.retain(|s| s.ssrc != info.ssrc);
        self.streams.push(Stream {
            ssrc: info.ssrc,
            clock_rate: f64::from(info.clock_rate),
            started: false,
            last_sequence: 0,
            last_timestamp: 0,
            last_at: None,
            packets: 0,
            octets: 0,
        });
    }

    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.streams.retain(|s| s.ssrc != info.ssrc);
    }

    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}

    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

#[cfg(test)]
impl SenderReports {
    /// Packets its queues have room for (a test of `crate::stack::next_of`).
    pub(crate) fn queued_room(&self) -> usize {
        self.read.capacity() + self.write.capacity()
    }
}
