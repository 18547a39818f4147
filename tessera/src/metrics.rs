//! `GET /metrics` in Prometheus text format (docs/operator-guide.md, "Metrics"). Every
//! value is read from the parts at scrape time (counts, and totals the parts keep in
//! atomics), so nothing on the media path waits on the exporter.

use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

/// What `/metrics` reads.
pub struct Sources {
    /// Rooms, participants, logins (none on a media node of a cluster).
    pub portal: Option<tessera_portal::Portal>,
    /// Transports and traffic (none on a node without the webrtc role).
    pub sfu: Option<Arc<tessera_webrtc_agent::WorkerAgent>>,
    /// Views.
    pub mixer: Option<Arc<tessera_mixer::Mixer>>,
    /// Recordings.
    pub recorder: Option<Arc<tessera_recorder::Recorder>>,
    /// The media relay between nodes (a cluster's media nodes only).
    pub relay: Option<Arc<tessera_cluster::relay::Relay>>,
}

/// The exporter and its sources.
pub struct Metrics {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
    sources: Sources,
    /// Totals of sources that may start again from zero (a room's view ends and starts anew).
    views: std::sync::Mutex<Monotonic>,
}

/// Makes a total that restarts from zero keep growing, as a Prometheus counter must (the
/// exporter's `absolute` keeps the highest value it saw, so a restarted source would read
/// flat until it passed its old total).
#[derive(Default)]
struct Monotonic(std::collections::HashMap<String, (f64, f64, std::time::Instant)>);

impl Monotonic {
    /// The series' total given the source's current `raw` value.
    fn total(&mut self, series: String, raw: f64) -> f64 {
        let (last, total, seen) = self.0.entry(series).or_insert((0.0, 0.0, std::time::Instant::now()));
        *total += if raw >= *last { raw - *last } else { raw };
        *last = raw;
        *seen = std::time::Instant::now();
        *total
    }

    /// Forgets series not seen for as long as the exporter keeps idle ones (it has dropped
    /// them too, so they may start again from zero).
    fn forget_idle(&mut self) {
        self.0.retain(|_, (_, _, seen)| seen.elapsed() < IDLE);
    }
}

/// Series not updated for this long leave `/metrics` (ended rooms and views).
const IDLE: Duration = Duration::from_secs(300);

impl Metrics {
    /// Installs the process-wide exporter (once per process).
    pub fn install(sources: Sources) -> anyhow::Result<Arc<Metrics>> {
        let handle = PrometheusBuilder::new()
            // Series of rooms and views that ended stop being updated: drop them.
            .idle_timeout(MetricKindMask::ALL, Some(IDLE))
            .install_recorder()
            .map_err(|e| anyhow::anyhow!("metrics exporter: {e}"))?;
        let process = metrics_process::Collector::default();
        process.describe();
        describe();
        Ok(Arc::new(Metrics { handle, process, sources, views: Default::default() }))
    }

    /// The current values, as Prometheus text.
    pub fn render(&self) -> String {
        self.process.collect();
        self.update();
        self.handle.run_upkeep();
        self.handle.render()
    }

    fn update(&self) {
        if let Some(portal) = &self.sources.portal {
            let p = portal.metrics();
            gauge!("tessera_rooms").set(p.rooms as f64);
            gauge!("tessera_participants").set(p.participants as f64);
            gauge!("tessera_participants_reconnecting").set(p.reconnecting as f64);
            gauge!("tessera_streams").set(p.streams as f64);
            gauge!("tessera_publications").set(p.publications as f64);
            gauge!("tessera_subscriptions").set(p.subscriptions as f64);
            for l in &p.logins {
                let result = l.refused.map_or("ok", |r| r.label());
                counter!("tessera_logins_total", "kind" => l.kind.label(), "result" => result).absolute(l.count);
            }
        }
        if let Some(sfu) = &self.sources.sfu {
            let m = sfu.metrics();
            let t = &m.traffic;
            let connected = t.connected as f64;
            gauge!("tessera_transports", "state" => "connected").set(connected);
            gauge!("tessera_transports", "state" => "connecting").set((m.stats.transports as f64 - connected).max(0.0));
            counter!("tessera_packets_received_total").absolute(t.packets_in);
            counter!("tessera_bytes_received_total").absolute(t.bytes_in);
            counter!("tessera_packets_sent_total").absolute(t.packets_out);
            counter!("tessera_bytes_sent_total").absolute(t.bytes_out);
            counter!("tessera_packets_dropped_total").absolute(t.dropped_out);
            counter!("tessera_rtp_packets_received_total").absolute(t.rtp_in);
            counter!("tessera_keyframe_requests_received_total").absolute(t.keyframe_requests_in);
            counter!("tessera_plis_sent_total").absolute(t.plis_out);
            counter!("tessera_nacks_received_total").absolute(m.nacks_in);
            counter!("tessera_nacked_packets_total").absolute(m.nacked_packets);
            counter!("tessera_nacks_sent_total").absolute(m.nacks_out);
            counter!("tessera_rtx_repairs_total").absolute(m.rtx_repairs);
            // Prometheus summaries without quantiles: rate(_sum) / rate(_count) is the mean.
            gauge!("tessera_client_fraction_lost_sum").set(m.fraction_lost_sum);
            counter!("tessera_client_fraction_lost_count").absolute(m.reports);
            gauge!("tessera_client_rtt_seconds_sum").set(m.rtt_sum_secs);
            counter!("tessera_client_rtt_seconds_count").absolute(m.rtt_samples);
        }
        if let Some(mixer) = &self.sources.mixer {
            let mut totals = self.views.lock().unwrap_or_else(|p| p.into_inner());
            totals.forget_idle();
            let views = mixer.metrics();
            // A stopped view's own series linger until idle: this count does not.
            gauge!("tessera_mixer_views").set(views.len() as f64);
            for v in views {
                let key = |name: &str| format!("{name}\0{}\0{}", v.room, v.view);
                let frames = totals.total(key("frames"), v.frames as f64);
                let timed = totals.total(key("timed"), v.timed_frames as f64);
                let encode = totals.total(key("encode"), v.encode_secs);
                let labels = [("room", v.room), ("view", v.view)];
                gauge!("tessera_mixer_view_running", &labels).set(if v.running { 1.0 } else { 0.0 });
                counter!("tessera_mixer_frames_total", &labels).absolute(frames as u64);
                gauge!("tessera_mixer_encode_seconds_sum", &labels).set(encode);
                counter!("tessera_mixer_encode_seconds_count", &labels).absolute(timed as u64);
            }
        }
        if let Some(relay) = &self.sources.relay {
            let (imports, exports) = relay.counts();
            let c = &relay.counters;
            let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            gauge!("tessera_relay_imported_streams").set(imports as f64);
            gauge!("tessera_relay_exported_tracks").set(exports as f64);
            counter!("tessera_relay_packets_sent_total").absolute(load(&c.packets_out));
            counter!("tessera_relay_packets_received_total").absolute(load(&c.packets_in));
            counter!("tessera_relay_nacked_packets_total").absolute(load(&c.nacked));
            counter!("tessera_relay_datagrams_dropped_total").absolute(load(&c.dropped));
        }
        if let Some(recorder) = &self.sources.recorder {
            let (recording, stopped, failed) = recorder.counts();
            gauge!("tessera_recordings", "state" => "recording").set(recording as f64);
            gauge!("tessera_recordings", "state" => "stopped").set(stopped as f64);
            gauge!("tessera_recordings", "state" => "failed").set(failed as f64);
        }
    }
}

fn describe() {
    describe_gauge!("tessera_rooms", "Rooms with at least one participant");
    describe_gauge!("tessera_participants", "Participants in rooms, reconnecting ones included");
    describe_gauge!("tessera_participants_reconnecting", "Participants whose connection dropped and who may still relogin");
    describe_gauge!("tessera_streams", "Streams in rooms, forward and mixed");
    describe_gauge!("tessera_publications", "Participants' publications (announced or flowing)");
    describe_gauge!("tessera_subscriptions", "Subscriptions");
    describe_counter!("tessera_logins_total", "Logins and relogins by result (ok, or why refused)");
    describe_gauge!("tessera_transports", "WebRTC transports (peer connections) by state");
    describe_counter!("tessera_packets_received_total", "UDP datagrams and ICE-TCP frames received by the SFU");
    describe_counter!("tessera_bytes_received_total", "Bytes of those packets");
    describe_counter!("tessera_packets_sent_total", "UDP datagrams and ICE-TCP frames sent by the SFU");
    describe_counter!("tessera_bytes_sent_total", "Bytes of those packets");
    describe_counter!("tessera_packets_dropped_total", "Datagrams dropped behind a full send queue");
    describe_counter!("tessera_rtp_packets_received_total", "RTP packets received from publishers");
    describe_counter!("tessera_keyframe_requests_received_total", "PLI/FIR received from subscribers");
    describe_counter!("tessera_plis_sent_total", "PLIs sent to publishers (after throttling)");
    describe_counter!("tessera_nacks_received_total", "NACK packets received from subscribers");
    describe_counter!("tessera_nacked_packets_total", "Media packets those NACKs asked for");
    describe_counter!("tessera_nacks_sent_total", "NACK packets sent to publishers");
    describe_counter!(
        "tessera_rtx_repairs_total",
        "Retransmissions received from publishers over RTX and restored to their stream (simulcast layers and declared flows)"
    );
    describe_gauge!("tessera_client_fraction_lost_sum", "Sum of the loss fractions subscribers reported (receiver reports)");
    describe_counter!("tessera_client_fraction_lost_count", "Receiver report blocks from subscribers");
    describe_gauge!("tessera_client_rtt_seconds_sum", "Sum of round-trip times measured from subscribers' receiver reports");
    describe_counter!("tessera_client_rtt_seconds_count", "Round-trip times measured");
    describe_gauge!("tessera_mixer_views", "Views this node's mixer has");
    describe_gauge!("tessera_mixer_view_running", "1 while a view's pipeline runs");
    describe_counter!("tessera_mixer_frames_total", "Video frames a view encoded since its pipeline started");
    describe_gauge!("tessera_mixer_encode_seconds_sum", "Sum of a view's measured encode times");
    describe_counter!("tessera_mixer_encode_seconds_count", "Frames whose encode time was measured");
    describe_gauge!("tessera_recordings", "Recordings on this node by state");
    describe_gauge!("tessera_relay_imported_streams", "Streams this node takes from other nodes over the media relay");
    describe_gauge!("tessera_relay_exported_tracks", "Tracks this node sends to other nodes over the media relay");
    describe_counter!("tessera_relay_packets_sent_total", "RTP packets sent to other nodes (repairs included)");
    describe_counter!("tessera_relay_packets_received_total", "RTP packets received from other nodes");
    describe_counter!("tessera_relay_nacked_packets_total", "Relayed packets found missing and asked for again");
    describe_counter!("tessera_relay_datagrams_dropped_total", "Relay datagrams dropped: unreadable, unsigned or forged, unexpected sender");
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_restarted_source_keeps_its_total_growing() {
        let mut m = super::Monotonic::default();
        assert_eq!(m.total("a".into(), 10.0), 10.0);
        assert_eq!(m.total("a".into(), 25.0), 25.0);
        // The view ended and started again: its source counts from zero.
        assert_eq!(m.total("a".into(), 4.0), 29.0);
        assert_eq!(m.total("a".into(), 6.0), 31.0);
        assert_eq!(m.total("b".into(), 1.0), 1.0);
    }
}
