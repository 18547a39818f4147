//! Recording end to end: real VP8/Opus publishers, files checked with GStreamer's own
//! demuxers and decoders (and `gst-discoverer-1.0`).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tessera_client::media::live_source;
use tessera_client::peer::{PublishOptions, Publisher, Subscriber};
use tessera_client::signaling::Signaling;

const CONFIG: &str = "[portal]\nreconnection_timeout_secs = 2\n[webrtc]\nbind_ip = \"127.0.0.1\"\n";

struct Setup {
    _dir: tempfile::TempDir,
    data: PathBuf,
    cfg: PathBuf,
}

fn setup() -> Setup {
    let dir = common::tempdir();
    let cfg = dir.path().join("t.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    Setup { data: dir.path().join("data"), cfg, _dir: dir }
}

fn start(s: &Setup) -> common::Server {
    common::start(&s.data, &["--config", s.cfg.to_str().unwrap()])
}

async fn publish(
    s: &common::Server,
    room: &str,
    user: &str,
    colour: (u8, u8, u8),
    tone: u32,
) -> (Signaling, Arc<Publisher>, tessera_client::media::LiveSource) {
    let token = s.token(room, user, "presenter").await;
    let mut sig = Signaling::connect(&s.portal).await.unwrap();
    sig.ok("login", Some(json!({"token": token, "protocol": "1.2"}))).await.unwrap();
    let p = Arc::new(Publisher::start(&mut sig, PublishOptions { audio: true, video: true, data: false, tag: 1, h264: false }, None).await.unwrap());
    let src = live_source(p.clone(), colour, tone).unwrap();
    (sig, p, src)
}

async fn api(s: &common::Server, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    s.api(method, path, body).await
}

/// What a real demuxer and decoder find in a file (video and audio).
fn decode_file(path: &Path) -> common::files::Decoded {
    common::files::decode_file(path, true)
}

/// `gst-discoverer-1.0` output for a file.
fn discover(path: &Path) -> String {
    let out = std::process::Command::new("gst-discoverer-1.0").arg("-v").arg(path).output().expect("gst-discoverer-1.0 (gstreamer1.0-tools)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn discovered_seconds(report: &str) -> f64 {
    let line = report.lines().find(|l| l.trim_start().starts_with("Duration:")).unwrap_or("");
    let t = line.trim().trim_start_matches("Duration:").trim();
    let mut parts = t.split(':');
    let h: f64 = parts.next().and_then(|x| x.parse().ok()).unwrap_or(0.0);
    let m: f64 = parts.next().and_then(|x| x.parse().ok()).unwrap_or(0.0);
    let sec: f64 = parts.next().and_then(|x| x.parse().ok()).unwrap_or(0.0);
    h * 3600.0 + m * 60.0 + sec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn record_forward_and_mixed_streams_stop_by_delete_and_by_source_end() {
    let setup = setup();
    let s = start(&setup);
    let room = "dev";
    let (mut psig, p, src) = publish(&s, room, "cam", (0, 200, 0), 660).await;

    // Forward stream, container auto (VP8/Opus → WebM).
    let (status, rec) = api(
        &s,
        reqwest::Method::POST,
        &format!("/v1/rooms/{room}/recordings"),
        Some(json!({
            "container": "auto", "media": {"audio": {"from": p.stream_id}, "video": {"from": p.stream_id}}
        })),
    )
    .await;
    assert_eq!(status, 200, "{rec}");
    assert_eq!(rec["state"], "recording", "{rec}");
    assert_eq!(rec["container"], "webm");
    let fwd_id = rec["id"].as_str().unwrap().to_string();
    let fwd_file = PathBuf::from(rec["storage"]["file"].as_str().unwrap());
    assert!(fwd_file.file_name().unwrap().to_str().unwrap().starts_with("dev-"), "{}", fwd_file.display());
    let fwd_started = Instant::now();

    // The mixed stream, into Matroska.
    let (status, mrec) = api(
        &s,
        reqwest::Method::POST,
        &format!("/v1/rooms/{room}/recordings"),
        Some(json!({
            "container": "mkv", "media": {"audio": {"from": "dev-common"}, "video": {"from": "dev-common"}}
        })),
    )
    .await;
    assert_eq!(status, 200, "{mrec}");
    let mixed_id = mrec["id"].as_str().unwrap().to_string();
    let mixed_file = PathBuf::from(mrec["storage"]["file"].as_str().unwrap());

    // Bad requests.
    let (status, err) =
        api(&s, reqwest::Method::POST, &format!("/v1/rooms/{room}/recordings"), Some(json!({"media": {"video": {"from": "ghost"}}}))).await;
    assert_eq!(status, 400, "{err}");
    let (status, _) = api(
        &s,
        reqwest::Method::POST,
        &format!("/v1/rooms/{room}/recordings"),
        Some(json!({"container": "avi", "media": {"video": {"from": p.stream_id}}})),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = api(
        &s,
        reqwest::Method::POST,
        &format!("/v1/rooms/{room}/recordings"),
        Some(json!({"container": "mp4", "media": {"video": {"from": p.stream_id}}})),
    )
    .await;
    assert_eq!(status, 400, "VP8 does not go into MP4");

    // Both files grow. (The mixed view's pipeline starts on this first consumer; if its
    // encoder stays silent the mixer rebuilds it after 2 s, so allow for that.)
    let deadline = Instant::now() + Duration::from_secs(12);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (_, list) = api(&s, reqwest::Method::GET, &format!("/v1/rooms/{room}/recordings"), None).await;
        let listed = list.as_array().unwrap().clone();
        assert_eq!(listed.len(), 2);
        assert!(listed.iter().all(|r| r["state"] == "recording"), "{list}");
        if fwd_started.elapsed() > Duration::from_secs(4) && listed.iter().all(|r| r["size"].as_u64().unwrap() > 10_000) {
            break;
        }
        assert!(Instant::now() < deadline, "recordings do not grow: {list}");
    }

    // Stop by DELETE.
    let (status, done) = api(&s, reqwest::Method::DELETE, &format!("/v1/rooms/{room}/recordings/{fwd_id}"), None).await;
    let wall = fwd_started.elapsed().as_secs_f64();
    assert_eq!(status, 200);
    assert_eq!(done["state"], "stopped");
    let report = discover(&fwd_file);
    assert!(report.contains("video/webm") || report.contains("container: WebM"), "{report}");
    assert!(report.to_lowercase().contains("vp8"), "{report}");
    assert!(report.to_lowercase().contains("opus"), "{report}");
    let secs = discovered_seconds(&report);
    assert!((secs - wall).abs() / wall < 0.10, "duration {secs:.2}s vs wall {wall:.2}s");
    let check = decode_file(&fwd_file);
    assert!(check.video.len() as f64 > wall * 15.0 * 0.7, "{check:?} over {wall:.1}s at 15 fps");
    assert!(check.audio_buffers > 50, "{check:?}");

    // Download over the API.
    let res = s.client().get(s.url(&format!("/v1/rooms/{room}/recordings/{fwd_id}/file"))).bearer_auth(common::KEY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "video/webm");
    assert_eq!(res.bytes().await.unwrap().len() as u64, std::fs::metadata(&fwd_file).unwrap().len());
    let res = s.client().get(s.url(&format!("/v1/rooms/{room}/recordings/{fwd_id}/file"))).send().await.unwrap();
    assert_eq!(res.status(), 401);

    // Stop by source end: the publisher leaves; the mixed recording goes on (the mix does).
    let (status, rec2) = api(
        &s,
        reqwest::Method::POST,
        &format!("/v1/rooms/{room}/recordings"),
        Some(json!({
            "media": {"audio": {"from": p.stream_id}, "video": {"from": p.stream_id}}
        })),
    )
    .await;
    assert_eq!(status, 200);
    let rec2_id = rec2["id"].as_str().unwrap().to_string();
    let rec2_file = PathBuf::from(rec2["storage"]["file"].as_str().unwrap());
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.stop(&mut psig).await.unwrap();
    drop(src);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, list) = api(&s, reqwest::Method::GET, &format!("/v1/rooms/{room}/recordings"), None).await;
        let r = list.as_array().unwrap().iter().find(|r| r["id"] == rec2_id.as_str()).cloned().unwrap();
        if r["state"] == "stopped" {
            assert_eq!(r["reason"], "source ended");
            break;
        }
        assert!(Instant::now() < deadline, "not stopped: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(decode_file(&rec2_file).video.len() > 15);

    let (status, done) = api(&s, reqwest::Method::DELETE, &format!("/v1/rooms/{room}/recordings/{mixed_id}"), None).await;
    assert_eq!(status, 200);
    assert_eq!(done["state"], "stopped");
    let report = discover(&mixed_file);
    assert!(report.contains("matroska") || report.contains("Matroska"), "{report}");
    let check = decode_file(&mixed_file);
    assert!(check.video.len() > 50, "mixed recording: {check:?}");
    assert!(check.audio_buffers > 50, "mixed recording: {check:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finalises_and_sigkill_keeps_a_readable_file() {
    let setup = setup();
    let mut s = start(&setup);
    let room = "dev";
    let (_sig, p, _src) = publish(&s, room, "cam", (200, 0, 0), 440).await;
    let (_, rec) = api(
        &s,
        reqwest::Method::POST,
        &format!("/v1/rooms/{room}/recordings"),
        Some(json!({
            "media": {"audio": {"from": p.stream_id}, "video": {"from": p.stream_id}}
        })),
    )
    .await;
    let file = PathBuf::from(rec["storage"]["file"].as_str().unwrap());
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let wall = started.elapsed().as_secs_f64();
    assert!(s.terminate(), "clean exit on SIGTERM");
    let secs = discovered_seconds(&discover(&file));
    assert!(secs > 0.0 && (secs - wall).abs() / wall < 0.15, "finalised duration {secs:.2}s vs {wall:.2}s");
    assert!(decode_file(&file).video.len() > 20);
    drop(s);

    // SIGKILL: no chance to finalise, but what was written stays readable.
    let s = start(&setup);
    let (_sig, p, _src) = publish(&s, room, "cam", (0, 0, 200), 880).await;
    let (_, rec) = api(
        &s,
        reqwest::Method::POST,
        &format!("/v1/rooms/{room}/recordings"),
        Some(json!({
            "container": "mkv", "media": {"audio": {"from": p.stream_id}, "video": {"from": p.stream_id}}
        })),
    )
    .await;
    let file = PathBuf::from(rec["storage"]["file"].as_str().unwrap());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = std::process::Command::new("kill").arg("-KILL").arg(s.child.id().to_string()).status();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let check = decode_file(&file);
    assert!(check.video.len() > 20, "killed recording still decodes: {check:?}");
    assert!(check.last_video_pts > Duration::from_secs(1), "{check:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unwritable_storage_fails_the_recording_not_the_room() {
    let setup = setup();
    let s = start(&setup);
    let room = "dev";
    let (mut sig, p, _src) = publish(&s, room, "cam", (0, 0, 200), 880).await;
    // The storage folder disappears and a file takes its place.
    let rec_dir = setup.data.join("recordings");
    std::fs::remove_dir_all(&rec_dir).unwrap();
    std::fs::write(&rec_dir, b"not a folder").unwrap();
    let (status, rec) = api(
        &s,
        reqwest::Method::POST,
        &format!("/v1/rooms/{room}/recordings"),
        Some(json!({
            "media": {"video": {"from": p.stream_id}}
        })),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(rec["state"], "failed", "{rec}");
    assert!(rec["reason"].as_str().unwrap().to_lowercase().contains("open") || rec["reason"].as_str().unwrap().contains("write"), "{rec}");
    // The room goes on: a subscriber still gets the stream.
    let sub = Subscriber::start(&mut sig, &p.stream_id, true, true, false).await.unwrap();
    sub.wait_until("media", Duration::from_secs(3), |r| r.iter().filter(|p| p.kind == "video").count() > 10).await.unwrap();
}

/// Drain: with `server.drain_timeout_secs`, SIGTERM makes `/readyz` answer 503 and refuses
/// new logins and sessions while the running stream goes on; the server then stops by
/// itself (here at the timeout, someone is still in), exits 0 and finalises the recording.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_the_running_sessions_then_stops_and_finalises() {
    let dir = common::tempdir();
    let cfg = dir.path().join("t.toml");
    std::fs::write(&cfg, format!("[server]\ndrain_timeout_secs = 4\n{CONFIG}")).unwrap();
    let s = common::start(&dir.path().join("data"), &["--config", cfg.to_str().unwrap()]);
    let room = "dev";
    let (_sig, p, _src) = publish(&s, room, "cam", (0, 200, 0), 660).await;
    let token = s.token(room, "viewer", "presenter").await;
    let mut vsig = Signaling::connect(&s.portal).await.unwrap();
    vsig.ok("login", Some(json!({"token": token, "protocol": "1.2"}))).await.unwrap();
    let sub = Subscriber::start(&mut vsig, &p.stream_id, false, true, false).await.unwrap();
    sub.wait_until("video", Duration::from_secs(5), |r| r.iter().filter(|x| x.kind == "video").count() > 10).await.unwrap();
    let (_, rec) = api(
        &s,
        reqwest::Method::POST,
        &format!("/v1/rooms/{room}/recordings"),
        Some(json!({"media": {"audio": {"from": p.stream_id}, "video": {"from": p.stream_id}}})),
    )
    .await;
    let file = PathBuf::from(rec["storage"]["file"].as_str().unwrap());
    let readyz = || async { s.client().get(format!("{}/readyz", s.portal)).send().await.unwrap().status().as_u16() };
    assert_eq!(readyz().await, 200);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let signalled = Instant::now();
    let _ = std::process::Command::new("kill").arg("-TERM").arg(s.child.id().to_string()).status();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(readyz().await, 503, "not ready while draining");
    let late_token = s.token(room, "late", "presenter").await;
    let mut late = Signaling::connect(&s.portal).await.unwrap();
    let refused = late.ok("login", Some(json!({"token": late_token, "protocol": "1.2"}))).await.unwrap_err().to_string();
    assert!(refused.contains("draining"), "{refused}");
    let refused = vsig.ok("publish", Some(json!({"media": {"tracks": [{"type": "video", "mid": "0"}]}}))).await.unwrap_err().to_string();
    assert!(refused.contains("draining"), "{refused}");
    let before = sub.packets("video").len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = sub.packets("video").len() - before;
    assert!(during >= 15, "the running stream goes on while draining: {during} video packets in 1 s");

    // Stops by itself at the drain timeout, cleanly.
    let mut s = s;
    let status = loop {
        if let Ok(Some(status)) = s.child.try_wait() {
            break status;
        }
        assert!(signalled.elapsed() < Duration::from_secs(15), "the server did not stop after draining");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "exit status {status:?}");
    let stopped_after = signalled.elapsed();
    assert!(stopped_after >= Duration::from_secs(4), "stopped after {stopped_after:?}, before the drain timeout");
    let secs = discovered_seconds(&discover(&file));
    assert!(secs > 4.0, "finalised recording of {secs:.2} s");
    assert!(decode_file(&file).video.len() > 60);
}
