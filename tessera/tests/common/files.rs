//! Recorded files, read back with a real demuxer and decoder (GStreamer's `decodebin`).

use std::path::Path;
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;

/// What a file decodes to.
#[derive(Debug, Default)]
pub struct Decoded {
    /// Each video frame's width, height and the colour at its centre.
    pub video: Vec<(i32, i32, (u8, u8, u8))>,
    /// Decoded audio buffers.
    pub audio_buffers: usize,
    /// The last video frame's presentation time.
    pub last_video_pts: Duration,
}

impl Decoded {
    /// Each frame's picture size, in order.
    pub fn sizes(&self) -> Vec<(i32, i32)> {
        self.video.iter().map(|&(w, h, _)| (w, h)).collect()
    }
}

/// Decodes `path`'s video (to RGB) and, with `audio`, its audio, until both end (20 s at
/// most). A file without the audio it is asked for decodes its video and then waits out
/// the 20 s, so ask for audio only where the file has it.
pub fn decode_file(path: &Path, audio: bool) -> Decoded {
    gst::init().unwrap();
    let video_branch = "d. ! queue ! videoconvert ! video/x-raw,format=RGB ! appsink name=v sync=false";
    let audio_branch = if audio { " d. ! queue ! audioconvert ! appsink name=a sync=false" } else { "" };
    let desc = format!("filesrc location=\"{}\" ! decodebin name=d {video_branch}{audio_branch}", path.display());
    let p = gst::parse::launch(&desc).unwrap().downcast::<gst::Pipeline>().unwrap();
    let v = p.by_name("v").unwrap().downcast::<gstreamer_app::AppSink>().unwrap();
    let a = p.by_name("a").map(|a| a.downcast::<gstreamer_app::AppSink>().unwrap());
    p.set_state(gst::State::Playing).unwrap();
    let mut out = Decoded::default();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut v_done, mut a_done) = (false, a.is_none());
    while !(v_done && a_done) && Instant::now() < deadline {
        if !v_done {
            match v.try_pull_sample(gst::ClockTime::from_mseconds(20)) {
                Some(s) => {
                    let st = s.caps().and_then(|c| c.structure(0));
                    let (w, h) = st.map_or((0, 0), |st| (st.get::<i32>("width").unwrap_or(0), st.get::<i32>("height").unwrap_or(0)));
                    let centre = s.buffer().and_then(|b| b.map_readable().ok()).map_or((0, 0, 0), |m| {
                        // RGB rows are padded to 4 bytes.
                        let stride = (w as usize * 3).div_ceil(4) * 4;
                        let at = (h as usize / 2) * stride + (w as usize / 2) * 3;
                        m.get(at..at + 3).map_or((0, 0, 0), |px| (px[0], px[1], px[2]))
                    });
                    out.video.push((w, h, centre));
                    if let Some(pts) = s.buffer().and_then(|b| b.pts()) {
                        out.last_video_pts = Duration::from_nanos(pts.nseconds());
                    }
                }
                None => v_done = v.is_eos(),
            }
        }
        if let Some(a) = a.as_ref().filter(|_| !a_done) {
            match a.try_pull_sample(gst::ClockTime::from_mseconds(20)) {
                Some(_) => out.audio_buffers += 1,
                None => a_done = a.is_eos(),
            }
        }
    }
    p.set_state(gst::State::Null).unwrap();
    out
}
