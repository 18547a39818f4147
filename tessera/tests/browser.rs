//! The JS client and demo page in real headless Chromium (clients/js/test-browser), run
//! inside a fresh network namespace that holds only loopback, so no media packet can
//! leave 127.0.0.1; the ICE-TCP test in one where UDP is dropped too.

mod common;

use std::path::PathBuf;
use std::process::Command;

/// clients/js, after checking that the browser tests can run here.
fn js_dir() -> PathBuf {
    let js = common::workspace_root().join("clients/js");
    assert!(
        js.join("node_modules/playwright-core").is_dir(),
        "npm packages missing: run `npm ci` in clients/js (scripts/install-deps.sh --test does it)"
    );
    assert!(std::path::Path::new("/usr/bin/chromium").exists(), "Chromium missing: apt-get install chromium (scripts/install-deps.sh --test)");
    js
}

/// One Chromium at a time: two beside each other on two cores make the video checks flaky.
static BROWSER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `script` in a new network namespace (loopback only) and checks node's TAP summary,
/// which it also keeps in `target/browser-tests/<name>.tap` (what each test measured, and
/// which skipped, stays readable after a run whose output cargo captured).
fn run_in_namespace(name: &str, script: &str, env: &[(&str, &std::ffi::OsStr)]) {
    let _one = BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new("unshare");
    cmd.args(["-n", "sh", "-c", script]).current_dir(js_dir()).env("TESSERA_BIN", common::bin());
    // OWT's JS SDK for owt-sdk.test.mjs, where scripts/install-deps.sh could fetch it.
    let sdk = common::workspace_root().join("target/owt-client-javascript/src/sdk");
    if std::env::var_os("OWT_SDK_DIR").is_none() && sdk.join("export.js").is_file() {
        cmd.env("OWT_SDK_DIR", sdk);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run unshare/node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let kept = common::workspace_root().join("target/browser-tests");
    if let Err(e) = std::fs::create_dir_all(&kept).and_then(|()| std::fs::write(kept.join(format!("{name}.tap")), stdout.as_bytes())) {
        eprintln!("keeping the TAP output in {}: {e}", kept.display());
    }
    assert!(out.status.success(), "browser tests failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("# fail 0") && !stdout.contains("# pass 0"), "{stdout}");
    println!("{stdout}");
}

#[test]
fn demo_page_in_headless_chromium() {
    let shot = common::workspace_root().join("target/demo-screenshot.png");
    run_in_namespace(
        "all",
        "ip link set lo up && exec node --test --test-force-exit --test-concurrency=1 test-browser/",
        &[("TESSERA_SCREENSHOT", shot.as_os_str())],
    );
}

#[test]
fn ice_tcp_in_headless_chromium_with_udp_blocked() {
    assert!(std::path::Path::new("/usr/sbin/nft").exists(), "nft missing: apt-get install nftables (scripts/install-deps.sh --test)");
    // Every UDP packet leaving any socket in the namespace is dropped (the server's and
    // Chromium's alike), so only ICE-TCP can carry media.
    run_in_namespace(
        "ice-tcp",
        "ip link set lo up \
         && nft add table inet blockudp \
         && nft add chain inet blockudp out '{ type filter hook output priority 0; policy accept; }' \
         && nft add rule inet blockudp out meta l4proto udp drop \
         && exec node --test --test-force-exit test-browser/ice-tcp.test.mjs",
        &[("TESSERA_UDP_BLOCKED", std::ffi::OsStr::new("1"))],
    );
}
