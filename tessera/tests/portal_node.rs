//! Runs the Node protocol tests (tests/node/portal.test.mjs, real `socket.io-client`;
//! tests/node/eio3.test.mjs, socket.io-client 2.x as older OWT clients use) against the
//! real `tessera` binary with a short reconnection grace period.

mod common;

use std::process::Command;

#[test]
fn portal_protocol_with_real_socketio_client() {
    let root = common::workspace_root();
    let node_dir = root.join("tests/node");
    for package in ["socket.io-client", "socket.io-client-v2"] {
        assert!(
            node_dir.join("node_modules").join(package).is_dir(),
            "npm package {package} missing: run `npm ci` in tests/node (scripts/install-deps.sh --test does it)"
        );
    }
    let dir = common::tempdir();
    let cfg = dir.path().join("tessera.toml");
    std::fs::write(&cfg, "[portal]\nreconnection_timeout_secs = 2\nping_interval_ms = 1000\nping_timeout_ms = 2000\nmax_requests_per_sec = 50\n")
        .unwrap();
    let server = common::start(&dir.path().join("data"), &["--config", cfg.to_str().unwrap()]);
    let out = Command::new("node")
        .args(["--test", "--test-concurrency=1", "--test-force-exit", "portal.test.mjs", "eio3.test.mjs"])
        .current_dir(&node_dir)
        .env("TESSERA_PORTAL", &server.portal)
        .env("TESSERA_API", &server.api)
        .env("TESSERA_KEY", common::KEY)
        .env("TESSERA_GRACE_MS", "2000")
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        panic!("node tests failed:\n{stdout}\n{stderr}\n--- server log ---\n{}", server.stderr.lock().unwrap());
    }
    // The runner's summary, e.g. "# pass 9", must show every test ran.
    assert!(stdout.contains("# fail 0"), "{stdout}");
    assert!(!stdout.contains("# pass 0"), "{stdout}");
}
