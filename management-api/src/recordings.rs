//! `/v1/rooms/{room}/recordings`: start, list, switch source, stop, download.

use actix_web::{HttpResponse, web};
use serde_json::Value;
use tessera_core::agent::{MediaKind, RecordingSpec};
use tessera_core::command::{
    ListRecordings, MAX_RECORDING_CHUNK, ReadRecording, RecorderNode, RecordingError, StartRecording, StopRecording, SwitchSource,
};

use crate::ApiState;
use crate::error::ApiError;
use crate::routes::{Authed, find_room, reject_unknown};

type Result<T> = std::result::Result<T, ApiError>;

fn engine(state: &ApiState, room: &str) -> Result<std::sync::Arc<dyn RecorderNode>> {
    state.router.recorder_for(&room.into()).ok_or_else(|| ApiError::Internal("this server does not record".into()))
}

/// The recorder's refusals as REST errors.
fn recording_error(e: RecordingError) -> ApiError {
    match e {
        RecordingError::NoRecording(_) => ApiError::NotFound(e.to_string()),
        RecordingError::NoStream(_) | RecordingError::Rejected(_) => ApiError::BadRequest(e.to_string()),
        RecordingError::Failed(m) => ApiError::Internal(m),
    }
}

/// `{from}` or `false`/absent.
fn source(media: &Value, kind: &str) -> Result<Option<String>> {
    match media.get(kind) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(None),
        Some(v) => v
            .get("from")
            .and_then(Value::as_str)
            .map(|s| Some(s.to_string()))
            .ok_or_else(|| ApiError::BadRequest(format!("Invalid request body: `media.{kind}.from` must be a stream id"))),
    }
}

pub(crate) async fn start(_: Authed, state: web::Data<ApiState>, path: web::Path<String>, body: web::Json<Value>) -> Result<HttpResponse> {
    let room = find_room(&state, &path)?;
    let fields = body.as_object().ok_or_else(|| ApiError::BadRequest("Invalid request body: expected a JSON object {container, media}".into()))?;
    reject_unknown(fields.keys(), &["container", "media"], "")?;
    let container = match body.get("container") {
        None | Some(Value::Null) => "auto".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(ApiError::BadRequest("Invalid request body: `container` must be a string".into())),
    };
    let media =
        body.get("media").filter(|m| m.is_object()).ok_or_else(|| ApiError::BadRequest("Invalid request body: `media` must be an object".into()))?;
    if let Some(m) = media.as_object() {
        reject_unknown(m.keys(), &["audio", "video"], "media.")?;
        for kind in ["audio", "video"] {
            if let Some(Value::Object(track)) = m.get(kind) {
                // OWT's `format`/`parameters` are accepted: recordings keep the source's encoding.
                reject_unknown(track.keys(), &["from", "format", "parameters"], &format!("media.{kind}."))?;
            }
        }
    }
    let spec = RecordingSpec { container, audio_from: source(media, "audio")?.map(Into::into), video_from: source(media, "video")?.map(Into::into) };
    let rec = engine(&state, &room.id)?.call(StartRecording { room: room.id.as_str().into(), spec }).await.map_err(recording_error)?;
    Ok(HttpResponse::Ok().json(rec))
}

/// Every recorder's recordings of `room`, and the recorder of each: in a cluster a room's
/// recordings may be on several nodes (its recorder moved when a node left, or when the
/// room was placed afresh after it emptied). Fails naming the recorders that could not be
/// asked, rather than answering with a list that silently lacks theirs.
async fn recordings_of(state: &ApiState, room: &str) -> Result<Vec<(std::sync::Arc<dyn RecorderNode>, tessera_core::command::RecordingInfo)>> {
    // A server without a recorder has no recordings (OWT answers an empty list too).
    let recorders = state.router.recorder_nodes();
    let (mut all, mut unreachable) = (Vec::new(), Vec::new());
    for recorder in recorders {
        match recorder.call(ListRecordings { room: room.into() }).await {
            Ok(list) => {
                for r in list {
                    if !all.iter().any(|(_, known): &(_, tessera_core::command::RecordingInfo)| known.id == r.id) {
                        all.push((recorder.clone(), r));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "a recorder could not be asked for its recordings");
                unreachable.push(e.to_string());
            }
        }
    }
    if !unreachable.is_empty() {
        return Err(ApiError::Unavailable(format!("recordings of room {room}: some recorders could not be asked: {}", unreachable.join("; "))));
    }
    Ok(all)
}

/// The recorder holding recording `id` of `room`: the room's current one if it has it,
/// else whichever has (see [`recordings_of`]).
async fn holder(state: &ApiState, room: &str, id: &str) -> Result<std::sync::Arc<dyn RecorderNode>> {
    let current = engine(state, room)?;
    let here = current.call(ListRecordings { room: room.into() }).await.map_err(recording_error)?;
    if here.iter().any(|r| r.id == id) {
        return Ok(current);
    }
    recordings_of(state, room)
        .await?
        .into_iter()
        .find(|(_, r)| r.id == id)
        .map(|(recorder, _)| recorder)
        .ok_or_else(|| recording_error(RecordingError::NoRecording(id.to_string())))
}

pub(crate) async fn list(_: Authed, state: web::Data<ApiState>, path: web::Path<String>) -> Result<HttpResponse> {
    let room = find_room(&state, &path)?;
    let mut list: Vec<_> = recordings_of(&state, &room.id).await?.into_iter().map(|(_, r)| r).collect();
    list.sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));
    Ok(HttpResponse::Ok().json(list))
}

pub(crate) async fn patch(_: Authed, state: web::Data<ApiState>, path: web::Path<(String, String)>, body: web::Json<Value>) -> Result<HttpResponse> {
    let (room, id) = path.into_inner();
    let room = find_room(&state, &room)?;
    let ops = body.as_array().ok_or_else(|| ApiError::BadRequest("Invalid request body: expected an array of operations".into()))?;
    let engine = holder(&state, &room.id, &id).await?;
    if ops.is_empty() {
        // Nothing to change: the recording as it is.
        let current = recordings_of(&state, &room.id).await?.into_iter().map(|(_, r)| r).find(|r| r.id == id);
        return current.map(|r| HttpResponse::Ok().json(r)).ok_or_else(|| recording_error(RecordingError::NoRecording(id)));
    }
    let mut last = None;
    for (i, op) in ops.iter().enumerate() {
        let kind = match (op.get("op").and_then(Value::as_str), op.get("path").and_then(Value::as_str)) {
            (Some("replace"), Some("/media/audio/from")) => MediaKind::Audio,
            (Some("replace"), Some("/media/video/from")) => MediaKind::Video,
            _ => return Err(ApiError::BadRequest(format!("[{i}]: supported: replace /media/audio/from or /media/video/from"))),
        };
        let from = op.get("value").and_then(Value::as_str).ok_or_else(|| ApiError::BadRequest(format!("[{i}]: `value` must be a stream id")))?;
        let switch = SwitchSource { room: room.id.as_str().into(), recording: id.clone(), kind, from: from.into() };
        last = Some(engine.call(switch).await.map_err(recording_error)?);
    }
    Ok(HttpResponse::Ok().json(last))
}

pub(crate) async fn stop(_: Authed, state: web::Data<ApiState>, path: web::Path<(String, String)>) -> Result<HttpResponse> {
    let (room, id) = path.into_inner();
    let room = find_room(&state, &room)?;
    let rec =
        holder(&state, &room.id, &id).await?.call(StopRecording { room: room.id.as_str().into(), recording: id }).await.map_err(recording_error)?;
    Ok(HttpResponse::Ok().json(rec))
}

/// `GET .../recordings/{id}/file`: the file, read in chunks from the recorder that made it
/// (this process's, or another node's over NATS), streamed as they come.
pub(crate) async fn file(_: Authed, state: web::Data<ApiState>, path: web::Path<(String, String)>) -> Result<HttpResponse> {
    let (room, id) = path.into_inner();
    let room = find_room(&state, &room)?;
    // The recorder that made it: the room may have been placed elsewhere since (or on no
    // node at all once it emptied), so each recorder is asked, this process's first.
    let recorders = state.router.recorder_nodes();
    if recorders.is_empty() {
        return Err(ApiError::Internal("this server does not record".into()));
    }
    let (mut found, mut unreachable) = (None, Vec::new());
    for recorder in recorders {
        let first = ReadRecording { room: room.id.as_str().into(), recording: id.clone(), offset: 0, len: MAX_RECORDING_CHUNK };
        match recorder.call(first).await {
            Ok(chunk) => {
                found = Some((recorder, chunk));
                break;
            }
            Err(RecordingError::NoRecording(_)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "a recorder could not be asked for a recording");
                unreachable.push(e.to_string());
            }
        }
    }
    let Some((recorder, first)) = found else {
        // Not on any recorder that answered: unknown, unless one could not be asked.
        return Err(match unreachable.is_empty() {
            true => recording_error(RecordingError::NoRecording(id)),
            false => {
                ApiError::Unavailable(format!("recording {id} not found on the recorders that answered; others failed: {}", unreachable.join("; ")))
            }
        });
    };
    let read = {
        let (recorder, room, id) = (recorder.clone(), room.id.clone(), id.clone());
        move |offset: u64| {
            let (recorder, room, recording) = (recorder.clone(), room.as_str().into(), id.clone());
            async move { recorder.call(ReadRecording { room, recording, offset, len: MAX_RECORDING_CHUNK }).await }
        }
    };
    let size = first.size;
    let mime = match first.name.rsplit('.').next() {
        Some("webm") => "video/webm",
        Some("mp4") => "video/mp4",
        _ => "video/x-matroska",
    };
    let name = first.name.clone();
    let first_len = first.data.len() as u64;
    // The size at the first chunk is the body's length: a running recording is cut there.
    let body = futures_util::stream::unfold((Some(first.data), first_len, read), move |(pending, offset, read)| async move {
        if let Some(data) = pending {
            return Some((Ok::<_, actix_web::Error>(web::Bytes::from(data)), (None, offset, read)));
        }
        if offset >= size {
            return None;
        }
        match read(offset).await {
            Ok(chunk) if !chunk.data.is_empty() => {
                let end = (offset + chunk.data.len() as u64).min(size);
                let mut data = chunk.data;
                data.truncate(usize::try_from(end - offset).unwrap_or(0));
                Some((Ok(web::Bytes::from(data)), (None, end, read)))
            }
            // Shorter than when the download began: cut, and the client sees a short body.
            Ok(_) => Some((Err(actix_web::error::ErrorInternalServerError("the recording file shrank")), (None, size, read))),
            Err(e) => Some((Err(actix_web::error::ErrorInternalServerError(e.to_string())), (None, size, read))),
        }
    });
    Ok(HttpResponse::Ok()
        .content_type(mime)
        .insert_header(("Content-Disposition", format!("attachment; filename=\"{}\"", name.escape_debug())))
        .no_chunking(size)
        .streaming(body))
}

/// Property tests of the recording body helpers: any JSON gives a source or a clear error.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            prop_oneof!["from|audio|video|format|s-1", "\\PC{0,8}"].prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                prop::collection::btree_map(prop_oneof!["from|audio|video|format|parameters", "\\PC{0,6}"], inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn source_reads_from_or_explains(media in json(), kind in prop::sample::select(&["audio", "video"][..])) {
            let track = media.get(kind);
            match source(&media, kind) {
                Ok(None) => prop_assert!(matches!(track, None | Some(Value::Null) | Some(Value::Bool(false)))),
                Ok(Some(from)) => prop_assert_eq!(track.and_then(|t| t.get("from")).and_then(Value::as_str), Some(from.as_str())),
                Err(e) => prop_assert!(e.to_string().contains(&format!("media.{kind}.from")), "{}", e),
            }
        }

        #[test]
        fn reject_unknown_names_the_first_stranger(keys in prop::collection::vec(prop_oneof!["container|media|audio", "\\PC{0,6}"], 0..5)) {
            let known = ["container", "media"];
            match reject_unknown(keys.iter(), &known, "body.") {
                Ok(()) => prop_assert!(keys.iter().all(|k| known.contains(&k.as_str()))),
                Err(e) => {
                    let stranger = keys.iter().find(|k| !known.contains(&k.as_str())).unwrap();
                    let named = format!("`body.{}`", stranger.escape_debug());
                    prop_assert!(e.to_string().contains(&named), "{}", e);
                }
            }
        }
    }
}
