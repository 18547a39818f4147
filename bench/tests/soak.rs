//! A short soak in the test suite (60 s, a 3-person core meeting: debug builds on two
//! cores): the long-running checks keep working, and a leak of fds or threads per
//! participant, or memory growing with the churn, fails it. About 90 s.

use std::process::Command;

#[test]
fn short_soak_keeps_memory_fds_and_threads_in_check() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let tessera = root.join("target/debug/tessera");
    assert!(tessera.exists(), "build the server first: cargo build -p tessera");
    let out = Command::new(env!("CARGO_BIN_EXE_tessera-bench"))
        .args(["--scenario", "soak", "--seconds", "60", "--participants", "3", "--max-loss-pct", "0.5", "--json", "--tessera-bin"])
        .arg(&tessera)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"));
    let r = &rows.as_array().unwrap()[0];
    assert_eq!(r["scenario"], "soak", "{r}");
    let checks = &r["checks"];
    let why = || format!("failures: {}\nafter: {}\n{stderr}", r["failures"], r["after"]);
    // RSS after warm-up (12 s) grows less than 5 %.
    assert_eq!(checks["rss_growth"]["passed"], true, "{}", why());
    assert!(r["rss_growth_pct"].as_f64().unwrap() < 5.0, "{}", why());
    // Fds and threads come back once everyone has left.
    assert_eq!(checks["fds_back"]["passed"], true, "{}", why());
    assert_eq!(checks["threads_back"]["passed"], true, "{}", why());
    let (base, after) = (&r["baseline"], &r["after"]);
    assert!(after["fds"].as_u64().unwrap() <= base["fds"].as_u64().unwrap() + 2, "{}", why());
    assert!(after["threads"].as_u64().unwrap() <= base["threads"].as_u64().unwrap() + 2, "{}", why());
    assert_eq!(checks["portal_back"]["passed"], true, "{}", why());
    assert_eq!(after["participants"], 0, "{}", why());
    // No loss worth the name on the core meeting (debug builds: at most 0.5 %).
    assert_eq!(checks["loss"]["passed"], true, "{}", why());
    assert!(r["loss_pct"].as_f64().unwrap() < 0.5, "{}", why());
    // The churn ran, every extra got media, the mix was watched and recorded.
    assert_eq!(checks["churn"]["passed"], true, "{}", why());
    assert!(r["extras"].as_u64().unwrap() >= 10, "{}", why());
    assert_eq!(checks["recording"]["passed"], true, "{}", why());
    assert!(r["mixer_fps"].as_f64().unwrap() > 5.0, "{}", why());
    // The curve: a sample every 2 s, each with the process and portal figures.
    let curve = r["curve"].as_array().unwrap();
    assert!(curve.len() >= 20, "{curve:?}");
    for s in curve {
        for key in ["t_s", "rss_mb", "fds", "threads", "participants", "streams", "sockets"] {
            assert!(s[key].is_number(), "missing {key}: {s}");
        }
        // The core meeting and the two cameras are there all along.
        assert!(s["participants"].as_u64().unwrap() >= 5, "{s}");
    }
    assert_eq!(r["passed"], true, "{}", why());
    assert!(out.status.success(), "{stdout}\n{stderr}");
}
