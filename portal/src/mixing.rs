//! The room side of mixing: mixed streams exist while the room is live, forward streams
//! go into views (automatically when the room says `autoMix`, or by `stream-control
//! mix/unmix` and REST PATCH), and every layout change reaches the room as a `stream`
//! update (`video.layout`).

use std::time::Duration;

use std::sync::Arc;

use serde_json::{Value, json};
use tessera_core::agent::{MediaKind, StreamUpdate};
use tessera_core::command::{GetLayout, Mix, MixNode, SetLayout, SetRegion, SetTemplate, StartView, StopView, Unmix};
use tessera_core::hooks::Hook;
use tessera_core::stream::{LayoutEntry, StreamKind};
use tessera_core::{ControlError, Room, ViewLabel};
use tracing::{debug, info, warn};

use crate::Portal;

impl Portal {
    /// The mixer serving one view of a room.
    fn mixer(&self, room: &str, view: &str) -> Result<Arc<dyn MixNode>, String> {
        self.inner.router.mixer_for(&room.into(), &view.into()).ok_or_else(|| "this server runs no mixer".to_string())
    }

    /// Starts the room's views (each mixer creates a view once, however many logins ask)
    /// and lists their mixed streams in the room state, in view order.
    pub(crate) async fn ensure_mixing(&self, room: &Room) {
        for view in &room.views {
            let Ok(m) = self.mixer(&room.id, &view.label) else { return };
            let label = ViewLabel::from(view.label.as_str());
            // A view stopped as stale (below) is started again if a login came meanwhile:
            // that login's own start found it running and may rely on it. Twice at most.
            let mut attempts = 0;
            let info = loop {
                attempts += 1;
                let info = match m.call(StartView { room: room.id.as_str().into(), view: Box::new(view.clone()) }).await {
                    Ok(info) => info,
                    Err(e) => {
                        warn!(room = %room.id, view = ?view.label, error = %e, "view could not start");
                        break None;
                    }
                };
                // While the view was starting, the room may have emptied (and `room_emptied`
                // stopped what it had started) or the view may have left its configuration
                // (`views_changed`): a view nobody will stop is stopped now. A login on its
                // way in (seating) starts it again itself.
                let Some((wanted, live)) = self.stale_view(&room.id, &view.label) else { break Some(info) };
                info!(room = %room.id, view = ?view.label, wanted, live, "a view started for a room that no longer has it: stopped");
                if let Err(e) = m.call(StopView { room: room.id.as_str().into(), view: label.clone() }).await {
                    debug!(room = %room.id, view = ?label, error = %e, "stopping a view no longer wanted");
                }
                if attempts >= 2 || self.stale_view(&room.id, &view.label).is_some() {
                    break None;
                }
            };
            let Some(info) = info else { continue };
            let mut conf = self.lock();
            let started = conf.mixing.entry(room.id.as_str().into()).or_default();
            if !started.contains(&label) {
                started.push(label);
            }
            let Some(r) = conf.rooms.get_mut(room.id.as_str()) else { continue };
            if r.stream(info.id.as_str()).is_none() {
                let published = Hook::StreamPublished { room: room.id.clone(), stream: info.id.to_string(), kind: "mixed".into(), owner: None };
                let add = json!({"id": info.id, "status": "add", "data": crate::wire::stream_json(&info)});
                r.streams.push(info);
                // A view added to a live room (over REST) is news to those present; a
                // participant logging in has it in its login result instead (its
                // notifications until then give way to the snapshot).
                if room.notifying.stream_change {
                    conf.broadcast(&room.id, None, "stream", &add);
                }
                self.hook(|| published);
            }
        }
    }

    /// Whether a view just started is stale: `Some((wanted, live))` when the room's
    /// configuration no longer has it or the room has neither participants nor a login on
    /// its way in.
    fn stale_view(&self, room: &str, label: &str) -> Option<(bool, bool)> {
        // The store is read before the room lock is taken (a database read).
        let wanted = self.inner.store.get(room).is_some_and(|r| r.views.iter().any(|v| v.label == label));
        let conf = self.lock();
        let live = conf.rooms.contains_key(room) || conf.seating.contains_key(room);
        (!wanted || !live).then_some((wanted, live))
    }

    /// The room's configuration changed over REST: a live room starts the views added and
    /// stops those removed, telling its participants (`stream add` / `stream remove`).
    pub(crate) async fn views_changed(&self, room: &Room) {
        let removed: Vec<ViewLabel> = {
            let mut conf = self.lock();
            if !conf.rooms.contains_key(room.id.as_str()) {
                return;
            }
            // A room with no view running yet (none configured, or none could start) has
            // nothing to stop, and may have views to start.
            match conf.mixing.get_mut(room.id.as_str()) {
                Some(started) => {
                    let (kept, removed) = std::mem::take(started).into_iter().partition(|l| room.views.iter().any(|v| v.label == l.as_str()));
                    *started = kept;
                    removed
                }
                None => Vec::new(),
            }
        };
        for label in removed {
            let stream = tessera_core::StreamId::mixed(&room.id.as_str().into(), &label);
            if let Ok(m) = self.mixer(&room.id, label.as_str())
                && let Err(e) = m.call(StopView { room: room.id.as_str().into(), view: label.clone() }).await
            {
                debug!(room = %room.id, view = ?label, error = %e, "stopping a removed view");
            }
            info!(room = %room.id, view = ?label, "view removed from the room's configuration");
            self.remove_stream(&room.id, stream.as_str(), "view removed");
        }
        self.ensure_mixing(room).await;
    }

    /// The last participant left: stop the views started for the room unless someone
    /// came back meanwhile.
    pub(crate) async fn room_emptied(&self, room: &str) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let views = {
            let mut conf = self.lock();
            if conf.rooms.contains_key(room) {
                return;
            }
            conf.mixing.remove(room).unwrap_or_default()
        };
        for view in &views {
            let Ok(m) = self.mixer(room, view.as_str()) else { continue };
            if let Err(e) = m.call(StopView { room: room.into(), view: view.clone() }).await {
                debug!(room, view = ?view, error = %e, "stopping a view");
            }
        }
        if !views.is_empty() {
            info!(room, views = views.len(), "room mixing stopped (room empty)");
        }
        // Unless someone came back while the views stopped; checked and released under
        // the room lock, so a login cannot slip in between.
        let conf = self.lock();
        if !conf.rooms.contains_key(room) {
            self.inner.router.release(&room.into());
            if let Some(h) = self.homes()
                && !conf.seating.contains_key(room)
            {
                h.release(room);
            }
        }
    }

    fn view_labels(&self, room: &str) -> Vec<String> {
        self.inner.store.get(room).map(|r| r.views.iter().map(|v| v.label.clone()).collect()).unwrap_or_default()
    }

    /// A new forward stream joins every view, when the room mixes automatically.
    pub(crate) async fn auto_mix(&self, room: &str, stream: &str) {
        let Some(cfg) = self.inner.store.get(room) else { return };
        if !cfg.auto_mix {
            return;
        }
        for label in self.view_labels(room) {
            if let Err(e) = self.mix_into(room, &label, stream).await {
                debug!(room, stream, view = %label, error = %e, "auto-mix skipped");
            }
        }
    }

    /// Mixes a forward stream into a view.
    pub(crate) async fn mix_into(&self, room: &str, label: &str, stream: &str) -> Result<(), String> {
        let m = self.mixer(room, label)?;
        self.forward_stream(room, stream)?;
        let layout = m.call(Mix { room: room.into(), view: label.into(), stream: stream.into() }).await.map_err(|e| e.to_string())?;
        self.set_in_view(room, stream, label, true);
        self.layout_changed(room, label, layout);
        Ok(())
    }

    /// Takes a stream out of a view.
    pub(crate) async fn unmix_from(&self, room: &str, label: &str, stream: &str) -> Result<(), String> {
        let m = self.mixer(room, label)?;
        let layout = m.call(Unmix { room: room.into(), view: label.into(), stream: stream.into() }).await.map_err(|e| e.to_string())?;
        self.set_in_view(room, stream, label, false);
        self.layout_changed(room, label, layout);
        Ok(())
    }

    /// A stream left the room: take it out of the views it was in.
    pub(crate) async fn unmix_everywhere(&self, room: &str, stream: &str, views: Vec<String>) {
        for label in views {
            if let Err(e) = self.unmix_from(room, &label, stream).await {
                debug!(room, stream, view = %label, error = %e, "unmix after removal");
            }
        }
    }

    fn forward_stream(&self, room: &str, stream: &str) -> Result<(), String> {
        let conf = self.lock();
        match conf.room(room).and_then(|r| r.stream(stream)) {
            Some(s) if s.is_forward() => Ok(()),
            Some(_) => Err(format!("Stream {stream} is not a forward stream")),
            None => Err(format!("Stream does NOT exist: {stream}")),
        }
    }

    fn set_in_view(&self, room: &str, stream: &str, label: &str, present: bool) {
        let mut conf = self.lock();
        let Some(s) = conf.rooms.get_mut(room).and_then(|r| r.stream_mut(stream)) else { return };
        if let StreamKind::Forward(f) = &mut s.kind {
            f.in_views.retain(|v| v != label);
            if present {
                f.in_views.push(label.into());
            }
        }
    }

    /// Records a view's new layout and tells the room.
    fn layout_changed(&self, room: &str, label: &str, layout: Vec<LayoutEntry>) {
        self.stream_updated(room, &format!("{room}-{label}"), StreamUpdate::Layout(layout));
    }

    /// Records a mixed stream's new layout or active input and, when it differs, tells
    /// the room with a `stream` update (OWT's `{field, value}`).
    pub(crate) fn stream_updated(&self, room: &str, id: &str, update: StreamUpdate) {
        if let StreamUpdate::ActiveLayers(active) = update {
            // Only the publisher acts on it (Tessera's JS client pauses the other encodings).
            let mut conf = self.lock();
            let Some(owner) = conf.rooms.get(room).and_then(|r| r.stream(id)).and_then(|s| s.owner().cloned()) else { return };
            let data = json!({"id": id, "status": "update", "data": {"field": "video.layers", "value": {"active": active}}});
            conf.notify(room, owner.as_str(), "stream", data);
            return;
        }
        let notify = self.inner.store.get(room).map(|r| r.notifying.stream_change).unwrap_or(true);
        let mut conf = self.lock();
        if let StreamUpdate::Tracks(mut tracks) = update {
            let Some(s) = conf.rooms.get_mut(room).and_then(|r| r.stream_mut(id)).filter(|s| s.is_forward()) else { return };
            // Mute states are the room's: kept as they are.
            for t in &mut tracks {
                if let Some(old) = s.tracks.iter().find(|o| o.kind == t.kind && o.rid == t.rid) {
                    t.status = old.status;
                }
            }
            if tracks == s.tracks {
                return;
            }
            s.tracks = tracks;
            let value = crate::wire::stream_json(s);
            if notify {
                conf.broadcast(room, None, "stream", &json!({"id": id, "status": "update", "data": {"field": ".", "value": value}}));
            }
            return;
        }
        let Some(s) = conf.rooms.get_mut(room).and_then(|r| r.stream_mut(id)) else { return };
        let StreamKind::Mixed(m) = &mut s.kind else {
            debug!(%room, stream = %id, "a mixed-stream update for a forward stream ignored");
            return;
        };
        let (field, value) = match update {
            StreamUpdate::Layout(layout) if layout != m.layout => {
                let value = crate::wire::layout_json(&layout);
                m.layout = layout;
                ("video.layout", value)
            }
            StreamUpdate::ActiveInput(active) if active != m.active_input => {
                let value = json!(active.as_ref().map_or("unknown", |a| a.as_str()));
                m.active_input = active;
                ("activeInput", value)
            }
            _ => return,
        };
        if notify {
            let data = json!({"id": id, "status": "update", "data": {"field": field, "value": value}});
            conf.broadcast(room, None, "stream", &data);
        }
    }

    /// The view label of a mixed stream id, if it is one of this room's.
    fn view_of(&self, room: &str, stream: &str) -> Option<String> {
        self.view_labels(room).into_iter().find(|l| format!("{room}-{l}") == stream)
    }

    /// `stream-control` operations that concern mixing.
    pub(crate) async fn mix_control(&self, room: &str, stream: &str, op: &str, data: Option<&Value>) -> Result<Option<Value>, String> {
        match op {
            "mix" | "unmix" => {
                let label = data.and_then(Value::as_str).ok_or_else(|| format!("stream-control: `{op}` needs data: \"<view label>\""))?;
                if op == "mix" {
                    self.mix_into(room, label, stream).await?;
                } else {
                    self.unmix_from(room, label, stream).await?;
                }
                Ok(Some(json!("ok")))
            }
            "get-region" => {
                let label = data.and_then(Value::as_str).ok_or("stream-control: `get-region` needs data: \"<view label>\"")?;
                let m = self.mixer(room, label)?;
                let layout = m.call(GetLayout { room: room.into(), view: label.into() }).await.map_err(|e| e.to_string())?;
                let region = layout
                    .iter()
                    .find(|e| e.stream.as_ref().is_some_and(|s| s == stream))
                    .map(|e| e.region.id.clone())
                    .ok_or_else(|| format!("Stream {stream} is not in view {label}"))?;
                Ok(Some(json!({"region": region})))
            }
            "set-region" => {
                let d = data.ok_or("stream-control: `set-region` needs data: {view, region}")?;
                let label = d.get("view").and_then(Value::as_str).ok_or("stream-control: set-region data.view must be a string")?;
                let region = d.get("region").and_then(Value::as_str).ok_or("stream-control: set-region data.region must be a string")?;
                let m = self.mixer(room, label)?;
                let command = SetRegion { room: room.into(), view: label.into(), stream: stream.into(), region: region.into() };
                let layout = m.call(command).await.map_err(|e| e.to_string())?;
                self.layout_changed(room, label, layout);
                Ok(Some(json!("ok")))
            }
            other => Err(format!("stream-control: unknown operation `{other}`")),
        }
    }

    /// REST `PATCH /v1/rooms/{room}/streams/{stream}` (OWT StreamUpdate operations).
    pub(crate) async fn patch(&self, room: &str, stream: &str, ops: &Value) -> Result<Value, ControlError> {
        let ops = ops.as_array().ok_or_else(|| ControlError::BadRequest("body must be an array of operations".into()))?;
        let exists = self.lock().room(room).is_some_and(|r| r.stream(stream).is_some());
        if !exists {
            return Err(ControlError::StreamNotFound(stream.into()));
        }
        let mixed_view = self.view_of(room, stream);
        for (i, op) in ops.iter().enumerate() {
            let bad = |m: &str| ControlError::BadRequest(format!("[{i}]: {m}"));
            let kind = op.get("op").and_then(Value::as_str).ok_or_else(|| bad("`op` must be a string"))?;
            let path = op.get("path").and_then(Value::as_str).ok_or_else(|| bad("`path` must be a string"))?;
            let value = op.get("value").unwrap_or(&Value::Null);
            match (kind, path, &mixed_view) {
                ("add" | "remove", "/info/inViews", None) => {
                    let label = value.as_str().ok_or_else(|| bad("`value` must be a view label"))?;
                    let r = if kind == "add" { self.mix_into(room, label, stream).await } else { self.unmix_from(room, label, stream).await };
                    r.map_err(|e| bad(&e))?;
                }
                ("replace", "/info/layout", Some(label)) => {
                    let m = self.mixer(room, label).map_err(|e| bad(&e))?;
                    let requested = crate::wire::parse_layout(value).map_err(|e| bad(&e))?;
                    let command = SetLayout { room: room.into(), view: label.as_str().into(), layout: requested };
                    let layout = m.call(command).await.map_err(|e| bad(&e.to_string()))?;
                    self.layout_changed(room, label, layout);
                }
                ("replace", "/info/layout/template", Some(label)) => {
                    let base = value.as_str().ok_or_else(|| bad("`value` must be `fluid` or `lecture`"))?;
                    let m = self.mixer(room, label).map_err(|e| bad(&e))?;
                    let command = SetTemplate { room: room.into(), view: label.as_str().into(), base: base.into() };
                    let layout = m.call(command).await.map_err(|e| bad(&e.to_string()))?;
                    self.layout_changed(room, label, layout);
                }
                ("replace", p, Some(label)) if p.starts_with("/info/layout/") => {
                    let index = layout_index(p).ok_or_else(|| bad("path must be /info/layout/<index>/stream"))?;
                    let target = value.as_str().ok_or_else(|| bad("`value` must be a stream id"))?;
                    let m = self.mixer(room, label).map_err(|e| bad(&e))?;
                    let layout = m.call(GetLayout { room: room.into(), view: label.as_str().into() }).await.map_err(|e| bad(&e.to_string()))?;
                    let region = layout.get(index).map(|e| e.region.id.clone()).ok_or_else(|| bad(&format!("layout has no region #{index}")))?;
                    let command = SetRegion { room: room.into(), view: label.as_str().into(), stream: target.into(), region };
                    let layout = m.call(command).await.map_err(|e| bad(&e.to_string()))?;
                    self.layout_changed(room, label, layout);
                }
                ("replace", "/media/audio/status" | "/media/video/status", None) => {
                    let media = if path == "/media/audio/status" { MediaKind::Audio } else { MediaKind::Video };
                    let active = match value.as_str() {
                        Some("active") => true,
                        Some("inactive") => false,
                        _ => return Err(bad("`value` must be \"active\" or \"inactive\"")),
                    };
                    self.set_stream_status(room, stream, media, active).await.map_err(|e| bad(&e))?;
                }
                _ => return Err(bad(&format!("unsupported operation `{kind} {path}` on this stream"))),
            }
        }
        let conf = self.lock();
        conf.room(room).and_then(|r| r.stream(stream)).map(crate::wire::stream_json).ok_or_else(|| ControlError::StreamNotFound(stream.into()))
    }
}

/// The region index of an OWT `/info/layout/<index>/stream` patch path.
fn layout_index(path: &str) -> Option<usize> {
    let index = path.strip_prefix("/info/layout/")?.strip_suffix("/stream")?;
    // `parse` accepts a leading `+`; OWT's paths are plain decimal.
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    index.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::layout_index;

    #[test]
    fn layout_paths() {
        assert_eq!(layout_index("/info/layout/0/stream"), Some(0));
        assert_eq!(layout_index("/info/layout/12/stream"), Some(12));
        // Once a panic (prefix and suffix overlap): must simply not match.
        assert_eq!(layout_index("/info/layout/stream"), None);
        assert_eq!(layout_index("/info/layout//stream"), None);
        assert_eq!(layout_index("/info/layout/+1/stream"), None);
        assert_eq!(layout_index("/info/layout/1"), None);
        assert_eq!(layout_index("/info/layout/99999999999999999999999/stream"), None);
    }
}

/// Property tests: `layout_index` never panics and reads exactly the paths
/// `/info/layout/<decimal digits>/stream`, as the number the digits say.
#[cfg(test)]
mod proptests {
    use super::layout_index;
    use crate::socketio::packet::proptests::{config, text};
    use proptest::prelude::*;

    /// The model: a plain decimal between the fixed prefix and suffix.
    fn expected(path: &str) -> Option<usize> {
        let rest = path.get("/info/layout/".len()..)?;
        if !path.starts_with("/info/layout/") || !rest.ends_with("/stream") {
            return None;
        }
        let digits = rest.get(..rest.len() - "/stream".len())?;
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        // Value by hand, refusing what does not fit in usize.
        digits.bytes().try_fold(0usize, |n, d| n.checked_mul(10)?.checked_add(usize::from(d - b'0')))
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn layout_index_matches_the_model(path in prop_oneof![
            text(30),
            "(/info/layout/)?[0-9+\\-a/é]{0,8}(/stream)?",
            any::<usize>().prop_map(|n| format!("/info/layout/{n}/stream")),
            (0..4usize, any::<u64>()).prop_map(|(zeros, n)| format!("/info/layout/{}{n}/stream", "0".repeat(zeros))),
        ]) {
            prop_assert_eq!(layout_index(&path), expected(&path), "{:?}", path);
        }

        #[test]
        fn layout_index_reads_every_index(n in any::<usize>()) {
            prop_assert_eq!(layout_index(&format!("/info/layout/{n}/stream")), Some(n));
        }
    }
}
