//! The `smoke` scenario runs in the test suite so the load generator keeps working; real
//! runs are not timed tests.

use std::process::Command;

#[test]
fn smoke_scenario_reports_every_figure() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let tessera = root.join("target/debug/tessera");
    assert!(tessera.exists(), "build the server first: cargo build -p tessera");
    let out = Command::new(env!("CARGO_BIN_EXE_tessera-bench"))
        .args(["--scenario", "smoke", "--json", "--tessera-bin"])
        .arg(&tessera)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let r = &rows[0];
    for key in ["scenario", "server", "forwarded_pps", "cpu_seconds", "rss_mb", "latency_ms_p50", "latency_ms_p99", "loss_pct", "first_frame_ms"] {
        assert!(r.get(key).is_some(), "missing {key}: {r}");
    }
    assert_eq!(r["server"], "tessera");
    // 2 subscribers × (30 video + 50 audio) packets/s.
    assert!(r["forwarded_pps"].as_f64().unwrap() > 100.0, "{r}");
    assert!(r["latency_ms_p50"].as_f64().unwrap() > 0.0 && r["latency_ms_p50"].as_f64().unwrap() < 50.0, "{r}");
    assert!(r["loss_pct"].as_f64().unwrap() < 5.0, "{r}");
    assert!(r["rss_mb"].as_f64().unwrap() > 1.0, "{r}");

    let out = Command::new(env!("CARGO_BIN_EXE_tessera-bench")).args(["--against", "janus"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Janus adapter is not written"));
}
