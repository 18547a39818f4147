//! Checks of a mixed stream's pictures: colours by name, the quadrants of a 2×2 layout.

use std::time::Duration;

use tessera_client::media::{Frame, decode_vp8};
use tessera_client::peer::Subscriber;

/// Whether a colour is near the named one.
pub fn is(c: (u8, u8, u8), want: &str) -> bool {
    let (r, g, b) = (i32::from(c.0), i32::from(c.1), i32::from(c.2));
    match want {
        "red" => r > 150 && g < 90 && b < 90,
        "blue" => b > 150 && r < 90 && g < 90,
        "green" => g > 150 && r < 90 && b < 90,
        "yellow" => r > 150 && g > 150 && b < 90,
        "black" => r < 50 && g < 50 && b < 50,
        _ => false,
    }
}

/// Colour at the centre of each quadrant of a 2×2 fluid layout.
pub fn quadrants(f: &Frame) -> [(u8, u8, u8); 4] {
    let (w, h) = (f.width, f.height);
    [f.around(w / 4, h / 4), f.around(3 * w / 4, h / 4), f.around(w / 4, 3 * h / 4), f.around(3 * w / 4, 3 * h / 4)]
}

/// Waits until the mix's newest frame passes `test`; returns how long that took.
pub async fn wait_for_mix(sub: &Subscriber, within: Duration, what: &str, test: impl Fn(&Frame) -> bool) -> Duration {
    let start = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let frames = decode_vp8(&sub.received.lock().unwrap().clone()).unwrap();
        if frames.last().is_some_and(&test) {
            return start.elapsed();
        }
        let last = frames.last().map(|f| (f.width, f.height, quadrants(f)));
        assert!(start.elapsed() < within, "{what}: not within {within:?}; the last frame's size and quadrants {last:?} ({} frames)", frames.len());
    }
}
