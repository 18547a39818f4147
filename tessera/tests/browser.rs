//! The JS client and demo page in real headless Chromium (clients/js/test-browser), run
//! inside a fresh network namespace that holds only loopback, so no media packet can
//! leave 127.0.0.1.

mod common;

use std::process::Command;

#[test]
fn demo_page_in_headless_chromium() {
    let js = common::workspace_root().join("clients/js");
    assert!(
        js.join("node_modules/playwright-core").is_dir(),
        "npm packages missing: run `npm ci` in clients/js (scripts/install-deps.sh --test does it)"
    );
    assert!(std::path::Path::new("/usr/bin/chromium").exists(), "Chromium missing: apt-get install chromium (scripts/install-deps.sh --test)");
    let shot = common::workspace_root().join("target/demo-screenshot.png");
    let out = Command::new("unshare")
        .args(["-n", "sh", "-c", "ip link set lo up && exec node --test --test-force-exit --test-concurrency=1 test-browser/"])
        .current_dir(&js)
        .env("TESSERA_BIN", common::bin())
        .env("TESSERA_SCREENSHOT", &shot)
        .output()
        .expect("run unshare/node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "browser tests failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("# fail 0") && !stdout.contains("# pass 0"), "{stdout}");
    println!("{stdout}");
}
