//! OWT's wire shapes, built here and nowhere else: the StreamInfo JSON that clients get in
//! the login result, `stream` notifications and the REST API (OWT protocol 1.2 §4.6,
//! `docs/protocol.md`), from the typed [`StreamInfo`] the media side reports.

use serde_json::{Map, Value, json};
use tessera_core::TransportId;
use tessera_core::agent::Progress;
use tessera_core::stream::{LayoutEntry, StreamInfo, StreamKind, TrackFormat, TrackInfo, TrackStatus};

/// A `progress` notification's data (OWT protocol 1.2).
pub(crate) fn progress_json(transport: &TransportId, progress: &Progress) -> Value {
    match progress {
        Progress::Answer { sdp } => json!({"id": transport, "status": "soac", "data": {"type": "answer", "sdp": sdp}}),
        Progress::TransportReady => json!({"id": transport, "status": "ready"}),
        Progress::SessionReady { session } => json!({"id": transport, "sessionId": session, "status": "ready"}),
    }
}

/// A stream as OWT clients see it.
pub(crate) fn stream_json(s: &StreamInfo) -> Value {
    let forward = s.is_forward();
    let tracks: Vec<Value> = s.tracks.iter().map(|t| track_json(s, t, forward)).collect();
    let mut v = Map::new();
    v.insert("id".into(), json!(s.id));
    match &s.kind {
        StreamKind::Forward(f) => {
            v.insert("type".into(), json!("forward"));
            v.insert("media".into(), json!({"tracks": tracks}));
            let mut info = Map::new();
            info.insert("owner".into(), json!(f.owner));
            info.insert("type".into(), json!("webrtc"));
            info.insert("inViews".into(), json!(f.in_views));
            info.insert("attributes".into(), f.attributes.clone());
            if s.data {
                info.insert("dataChannel".into(), json!(true));
            }
            v.insert("info".into(), Value::Object(info));
        }
        StreamKind::Mixed(m) => {
            v.insert("type".into(), json!("mixed"));
            v.insert("media".into(), json!({"tracks": tracks}));
            // OWT says "unknown" until voice activity picked an input.
            let active = m.active_input.as_ref().map_or("unknown", |a| a.as_str());
            v.insert("info".into(), json!({"label": m.label, "layout": layout_json(&m.layout), "activeInput": active}));
        }
    }
    // OWT's `data: true` marks a data stream, one without media: OWT's JS SDK refuses to
    // subscribe to a stream with both (`A remote stream is either a data stream or a media
    // stream`), so a stream with media and a data channel says so in `info.dataChannel` only.
    if s.data && s.tracks.is_empty() {
        v.insert("data".into(), json!(true));
    }
    Value::Object(v)
}

fn track_json(s: &StreamInfo, t: &TrackInfo, forward: bool) -> Value {
    let mut v = Map::new();
    if forward || t.rid.is_some() {
        // OWT SDK 5.1 keys a forward stream's tracks by id, and subscribes to a simulcast
        // layer by its track's id (`media.resolve_from` reads these back); a mixed video
        // with layers lists them the same way.
        let id = match &t.rid {
            Some(rid) => format!("{}-{}-{rid}", s.id, t.kind.as_str()),
            None => format!("{}-{}", s.id, t.kind.as_str()),
        };
        v.insert("id".into(), json!(id));
    }
    v.insert("type".into(), json!(t.kind.as_str()));
    v.insert("source".into(), json!(t.source));
    if let Some(mid) = &t.mid {
        v.insert("mid".into(), json!(mid));
    }
    let format = match &t.format {
        TrackFormat::Audio(a) => json!(a),
        TrackFormat::Video(f) => json!(f),
    };
    v.insert("format".into(), format);
    if let Some(p) = &t.parameters {
        v.insert("parameters".into(), json!(p));
    }
    let status = match t.status {
        TrackStatus::Active => "active",
        TrackStatus::Inactive => "inactive",
    };
    v.insert("status".into(), json!(status));
    if let Some(rid) = &t.rid {
        v.insert("rid".into(), json!(rid));
    }
    Value::Object(v)
}

/// A view's layout: `[{stream?, region: {id, shape, area}}]`, filled regions first.
pub(crate) fn layout_json(layout: &[LayoutEntry]) -> Value {
    let entry = |e: &LayoutEntry| match &e.stream {
        Some(s) => json!({"stream": s, "region": e.region}),
        None => json!({"region": e.region}),
    };
    let filled = layout.iter().filter(|e| e.stream.is_some()).map(entry);
    let empty = layout.iter().filter(|e| e.stream.is_none()).map(entry);
    Value::Array(filled.chain(empty).collect())
}

/// Parses an OWT layout (`[{stream?, region}]`, as REST PATCH sends it) into entries.
pub(crate) fn parse_layout(value: &Value) -> Result<Vec<LayoutEntry>, String> {
    let items = value.as_array().ok_or("layout must be an array")?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let region =
                serde_json::from_value(item.get("region").cloned().unwrap_or(Value::Null)).map_err(|e| format!("layout[{i}].region: {e}"))?;
            let stream = match item.get("stream") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.as_str().into()),
                Some(_) => return Err(format!("layout[{i}].stream must be a stream id")),
            };
            Ok(LayoutEntry { stream, region })
        })
        .collect()
}
