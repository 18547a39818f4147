//! The `smoke` scenario runs in the test suite, against Tessera and Janus, so the load
//! generator and both server adapters keep working; real runs are not timed tests.

use std::process::Command;

#[test]
fn smoke_scenario_reports_every_figure_for_both_servers() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let tessera = root.join("target/debug/tessera");
    assert!(tessera.exists(), "build the server first: cargo build -p tessera");
    let out = Command::new(env!("CARGO_BIN_EXE_tessera-bench"))
        .args(["--scenario", "smoke", "--against", "janus", "--json", "--tessera-bin"])
        .arg(&tessera)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (r, server) in rows.iter().zip(["tessera", "janus"]) {
        assert_eq!(r["scenario"], "smoke");
        assert_eq!(r["server"], server);
        for key in ["forwarded_pps", "cpu_seconds", "rss_mb", "latency_ms_p50", "latency_ms_p99", "loss_pct", "out_of_order_pct", "first_frame_ms"] {
            assert!(r[key].is_number(), "missing {key}: {r}");
        }
        // 2 subscribers × (30 video + 50 audio) packets/s, every one carrying a marker.
        let pps = r["forwarded_pps"].as_f64().unwrap();
        assert!((140.0..=180.0).contains(&pps), "{r}");
        let p50 = r["latency_ms_p50"].as_f64().unwrap();
        assert!(p50 > 0.0 && p50 < 50.0, "{r}");
        assert!(r["loss_pct"].as_f64().unwrap() < 5.0, "{r}");
        assert!(r["rss_mb"].as_f64().unwrap() > 1.0, "{r}");
        assert!(r["cpu_seconds"].as_f64().unwrap() > 0.0, "{r}");
        let first = r["first_frame_ms"].as_f64().unwrap();
        assert!(first > 0.0 && first < 5000.0, "{r}");
    }
}

#[test]
fn unknown_peer_and_scenario_are_refused_clearly() {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera-bench")).args(["--against", "mediasoup"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected none or janus"));
    let out = Command::new(env!("CARGO_BIN_EXE_tessera-bench")).args(["--scenario", "nope"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scenario `nope`"));
}
