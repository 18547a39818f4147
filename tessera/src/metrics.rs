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
    /// Rooms, participants, logins.
    pub portal: tessera_portal::Portal,
    /// Transports and traffic (none on a node without the webrtc role).
    pub sfu: Option<Arc<tessera_webrtc_agent::WorkerAgent>>,
    /// Views.
    pub mixer: Option<Arc<tessera_mixer::Mixer>>,
    /// Recordings.
    pub recorder: Option<Arc<tessera_recorder::Recorder>>,
}

/// The exporter and its sources.
pub struct Metrics {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
    sources: Sources,
}

impl Metrics {
    /// Installs the process-wide exporter (once per process).
    pub fn install(sources: Sources) -> anyhow::Result<Arc<Metrics>> {
        let handle = PrometheusBuilder::new()
            // Series of rooms and views that ended stop being updated: drop them.
            .idle_timeout(MetricKindMask::ALL, Some(Duration::from_secs(300)))
            .install_recorder()
            .map_err(|e| anyhow::anyhow!("metrics exporter: {e}"))?;
        let process = metrics_process::Collector::default();
        process.describe();
        describe();
        Ok(Arc::new(Metrics { handle, process, sources }))
    }

    /// The current values, as Prometheus text.
    pub fn render(&self) -> String {
        self.process.collect();
        self.update();
        self.handle.run_upkeep();
        self.handle.render()
    }

    fn update(&self) {
        let p = self.sources.portal.metrics();
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
            // Prometheus summaries without quantiles: rate(_sum) / rate(_count) is the mean.
            gauge!("tessera_client_fraction_lost_sum").set(m.fraction_lost_sum);
            counter!("tessera_client_fraction_lost_count").absolute(m.reports);
            gauge!("tessera_client_rtt_seconds_sum").set(m.rtt_sum_secs);
            counter!("tessera_client_rtt_seconds_count").absolute(m.rtt_samples);
        }
        if let Some(mixer) = &self.sources.mixer {
            for v in mixer.metrics() {
                let labels = [("room", v.room), ("view", v.view)];
                gauge!("tessera_mixer_view_running", &labels).set(if v.running { 1.0 } else { 0.0 });
                counter!("tessera_mixer_frames_total", &labels).absolute(v.frames);
                gauge!("tessera_mixer_encode_seconds_sum", &labels).set(v.encode_secs);
                counter!("tessera_mixer_encode_seconds_count", &labels).absolute(v.timed_frames);
            }
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
    describe_gauge!("tessera_client_fraction_lost_sum", "Sum of the loss fractions subscribers reported (receiver reports)");
    describe_counter!("tessera_client_fraction_lost_count", "Receiver report blocks from subscribers");
    describe_gauge!("tessera_client_rtt_seconds_sum", "Sum of round-trip times measured from subscribers' receiver reports");
    describe_counter!("tessera_client_rtt_seconds_count", "Round-trip times measured");
    describe_gauge!("tessera_mixer_view_running", "1 while a view's pipeline runs");
    describe_counter!("tessera_mixer_frames_total", "Video frames a view encoded since its pipeline started");
    describe_gauge!("tessera_mixer_encode_seconds_sum", "Sum of a view's measured encode times");
    describe_counter!("tessera_mixer_encode_seconds_count", "Frames whose encode time was measured");
    describe_gauge!("tessera_recordings", "Recordings on this node by state");
}
