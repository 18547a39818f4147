//! The stream shapes of OWT's REST API (`resource/streamAdapter.js`), made from the
//! portal's form (`media.tracks[]`, what clients get over Socket.IO):
//!
//! - `/v1.1`: `media.audio = {status, source, format}`, `media.video = {status, source,
//!   original: [{format, parameters}]}` (one entry per simulcast layer), no `tracks`;
//! - `/v1`: the same with `media.video.format`/`parameters` taken from the first entry
//!   instead of `original`. Tessera's `/v1` also keeps `media.tracks`, which it served
//!   before following OWT here, so its own scripts keep working.

use serde_json::{Map, Value};

/// Which API version a stream is shown to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamShape {
    /// `/v1`.
    V1,
    /// `/v1.1`.
    V11,
}

impl StreamShape {
    /// `stream` (portal form) in this version's shape; anything else is left as it is.
    pub(crate) fn apply(self, mut stream: Value) -> Value {
        let Some(media) = stream.get_mut("media").and_then(Value::as_object_mut) else { return stream };
        let Some(tracks) = media.get("tracks").and_then(Value::as_array).cloned() else { return stream };
        let of_kind = |kind: &'static str| tracks.iter().filter(move |t| t.get("type").and_then(Value::as_str) == Some(kind));
        if let Some(audio) = of_kind("audio").next() {
            media.insert("audio".into(), Value::Object(pick(audio, &["status", "source", "format", "optional"])));
        }
        let videos: Vec<&Value> = of_kind("video").collect();
        if let Some(first) = videos.first() {
            let mut video = pick(first, &["status", "source", "optional"]);
            match self {
                StreamShape::V1 => video.extend(pick(first, &["format", "parameters"])),
                StreamShape::V11 => {
                    let original = videos
                        .iter()
                        .map(|t| {
                            let mut layer = pick(t, &["format", "parameters"]);
                            if let Some(rid) = t.get("rid") {
                                layer.insert("simulcastRid".into(), rid.clone());
                            }
                            Value::Object(layer)
                        })
                        .collect();
                    video.insert("original".into(), Value::Array(original));
                }
            }
            media.insert("video".into(), Value::Object(video));
        }
        if self == StreamShape::V11 {
            media.remove("tracks");
        }
        stream
    }
}

/// The listed fields of a track object that it has.
fn pick(track: &Value, fields: &[&str]) -> Map<String, Value> {
    fields.iter().filter_map(|f| track.get(*f).map(|v| (f.to_string(), v.clone()))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn portal_form() -> Value {
        json!({"id": "s1", "type": "forward", "media": {"tracks": [
            {"id": "s1-audio", "type": "audio", "source": "mic", "mid": "0", "format": {"codec": "opus", "sampleRate": 48000, "channelNum": 2}, "status": "active"},
            {"id": "s1-video", "type": "video", "source": "camera", "mid": "1", "format": {"codec": "vp8"}, "parameters": {"resolution": {"width": 640, "height": 480}}, "status": "inactive"}
        ]}, "info": {"owner": "p1", "type": "webrtc", "inViews": [], "attributes": {}}})
    }

    #[test]
    fn v1_flattens_video_and_keeps_tracks() {
        let s = StreamShape::V1.apply(portal_form());
        assert_eq!(
            s["media"]["audio"],
            json!({"status": "active", "source": "mic", "format": {"codec": "opus", "sampleRate": 48000, "channelNum": 2}})
        );
        assert_eq!(
            s["media"]["video"],
            json!({"status": "inactive", "source": "camera", "format": {"codec": "vp8"}, "parameters": {"resolution": {"width": 640, "height": 480}}})
        );
        assert_eq!(s["media"]["tracks"].as_array().map(Vec::len), Some(2));
        assert_eq!(s["info"]["owner"], "p1");
    }

    #[test]
    fn v11_lists_video_layers_in_original_without_tracks() {
        let mut form = portal_form();
        form["media"]["tracks"][1]["rid"] = json!("h");
        let s = StreamShape::V11.apply(form);
        assert_eq!(
            s["media"]["video"],
            json!({"status": "inactive", "source": "camera", "original": [{"format": {"codec": "vp8"}, "parameters": {"resolution": {"width": 640, "height": 480}}, "simulcastRid": "h"}]})
        );
        assert!(s["media"].get("tracks").is_none());
        assert_eq!(s["media"]["audio"]["format"]["codec"], "opus");
    }

    #[test]
    fn audio_only_and_odd_streams_pass() {
        let audio_only = json!({"id": "a", "media": {"tracks": [{"type": "audio", "format": {"codec": "opus"}, "status": "active"}]}});
        let s = StreamShape::V11.apply(audio_only);
        assert!(s["media"].get("video").is_none() && s["media"]["audio"]["status"] == "active");
        assert_eq!(StreamShape::V1.apply(json!({"id": "x"})), json!({"id": "x"}));
    }
}
