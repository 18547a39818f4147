//! Route handlers. Each one checks the caller first (via [`Authed`]), then the room, then
//! the body, so errors come in the order a client can act on.

use std::sync::Arc;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest, HttpResponse, web};
use futures_util::future::{Ready, ready};
use serde::Deserialize;
use serde_json::{Value, json};
use tessera_core::Room;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::streams::StreamShape;
use crate::{ApiState, MAX_BODY_BYTES, now_ms, now_secs};

type Result<T> = std::result::Result<T, ApiError>;

pub(crate) fn configure(cfg: &mut web::ServiceConfig, state: ApiState) {
    let json_cfg = web::JsonConfig::default()
        .limit(MAX_BODY_BYTES)
        // curl users often omit the content type; the body is JSON either way.
        .content_type_required(false)
        .error_handler(|err, _req| {
            use actix_web::error::JsonPayloadError as J;
            let api = match &err {
                J::Overflow { limit } | J::OverflowKnownLength { limit, .. } => ApiError::TooLarge(format!("Request body larger than {limit} bytes")),
                J::Deserialize(e) => ApiError::BadRequest(format!("Failed to parse JSON body: {e}")),
                other => ApiError::BadRequest(format!("Failed to read JSON body: {other}")),
            };
            api.into()
        });
    // Query strings get the same JSON errors as bodies (actix answers plain text otherwise).
    let query_cfg = web::QueryConfig::default().error_handler(|err, _req| ApiError::BadRequest(format!("Invalid query string: {err}")).into());
    let metrics = state.metrics.is_some();
    cfg.app_data(web::Data::new(state)).app_data(json_cfg).app_data(query_cfg);
    if metrics {
        // Prometheus scrapers send no credentials: keep this address private
        // (docs/operator-guide.md), or turn it off with `server.metrics = false`.
        cfg.route("/metrics", web::get().to(metrics_text));
    }
    // OWT serves every /v1 route under /v1.1 too; only the stream shape differs.
    cfg.service(api_scope("/v1", StreamShape::V1)).service(api_scope("/v1.1", StreamShape::V11)).default_service(web::to(not_found));
}

/// The API's routes under `prefix`, answering streams in `shape`.
fn api_scope(prefix: &str, shape: StreamShape) -> actix_web::Scope {
    web::scope(prefix)
        .app_data(web::Data::new(shape))
        .route("/{any:.*}", web::method(actix_web::http::Method::OPTIONS).to(preflight))
        .route("/stats", web::get().to(stats))
        .route("/cluster/nodes", web::get().to(cluster_nodes))
        .route("/drain", web::post().to(drain))
        .route("/rooms", web::post().to(create_room))
        .route("/rooms", web::get().to(list_rooms))
        .route("/rooms/{room}", web::get().to(get_room))
        .route("/rooms/{room}", web::put().to(update_room))
        .route("/rooms/{room}", web::delete().to(delete_room))
        .route("/rooms/{room}/tokens", web::post().to(create_token))
        .route("/rooms/{room}/participants", web::get().to(list_participants))
        .route("/rooms/{room}/participants/{participant}", web::get().to(get_participant))
        .route("/rooms/{room}/participants/{participant}", web::delete().to(drop_participant))
        .route("/rooms/{room}/participants/{participant}", web::patch().to(patch_participant))
        .route("/rooms/{room}/streams", web::get().to(list_streams))
        .route("/rooms/{room}/streams/{stream}", web::get().to(get_stream))
        .route("/rooms/{room}/streams/{stream}", web::patch().to(patch_stream))
        .route("/rooms/{room}/streams/{stream}", web::delete().to(delete_stream))
        .route("/rooms/{room}/recordings", web::post().to(crate::recordings::start))
        .route("/rooms/{room}/recordings", web::get().to(crate::recordings::list))
        .route("/rooms/{room}/recordings/{id}", web::patch().to(crate::recordings::patch))
        .route("/rooms/{room}/recordings/{id}", web::delete().to(crate::recordings::stop))
        .route("/rooms/{room}/recordings/{id}/file", web::get().to(crate::recordings::file))
        .route("/rooms/{room}/streaming-ins{rest:(/.*)?}", web::to(not_served))
        .route("/rooms/{room}/streaming-outs{rest:(/.*)?}", web::to(not_served))
        .route("/rooms/{room}/sipcalls{rest:(/.*)?}", web::to(not_served))
        .route("/rooms/{room}/analytics{rest:(/.*)?}", web::to(not_served))
        .route("/services{rest:(/.*)?}", web::to(not_served))
        .route("/stream-engine{rest:(/.*)?}", web::to(not_served))
}

/// OWT routes of features Tessera does not have: a clear answer (after the credentials
/// check, as any route) instead of a bare 404 that reads like a wrong path.
async fn not_served(_: Authed, req: HttpRequest) -> Result<HttpResponse> {
    let path = req.path();
    let what = if path.contains("/streaming-ins") {
        "streaming-ins (pulling RTSP/RTMP/HLS into a room) are not served by Tessera: publish over WebRTC instead"
    } else if path.contains("/streaming-outs") {
        "streaming-outs (pushing a stream to RTMP/RTSP/HLS/DASH) are not served by Tessera: record the stream (`/recordings`) instead"
    } else if path.contains("/sipcalls") {
        "SIP calls are not served by Tessera"
    } else if path.contains("/analytics") {
        "analytics (media analysis plugins) are not served by Tessera"
    } else if path.contains("/services") {
        "OWT's `/services` routes are not served: a Tessera deployment is one service, its key in `service.key`"
    } else {
        "OWT's stream-engine routes are not served by Tessera"
    };
    Err(ApiError::NotServed(format!("{} {}: {what}", req.method(), path.escape_debug())))
}

/// `GET /metrics`: Prometheus text format 0.0.4.
async fn metrics_text(state: web::Data<ApiState>) -> Result<HttpResponse> {
    let render = state.metrics.clone().ok_or_else(|| ApiError::NotFound("GET /metrics".into()))?;
    render_metrics(render).await
}

/// The metrics text, rendered off the async workers (reading the parts takes a few locks
/// briefly).
async fn render_metrics(render: Arc<dyn Fn() -> String + Send + Sync>) -> Result<HttpResponse> {
    let text = web::block(move || render()).await.map_err(|e| ApiError::Internal(format!("metrics: {e}")))?;
    Ok(HttpResponse::Ok().content_type("text/plain; version=0.0.4; charset=utf-8").body(text))
}

/// The routes of a media node's HTTP server: `GET /metrics`, JSON 404s for the rest.
pub(crate) fn configure_metrics_only(render: Arc<dyn Fn() -> String + Send + Sync>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg: &mut web::ServiceConfig| {
        cfg.app_data(web::Data::new(render))
            .route("/metrics", web::get().to(|render: web::Data<Arc<dyn Fn() -> String + Send + Sync>>| render_metrics(render.get_ref().clone())))
            .default_service(web::to(not_found));
    }
}

/// Proof that the request carried valid service credentials. Extracting it runs the check,
/// so a handler that takes `Authed` cannot forget authentication.
pub(crate) struct Authed(pub(crate) Caller);

impl FromRequest for Authed {
    type Error = ApiError;
    type Future = Ready<Result<Authed>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let Some(state) = req.app_data::<web::Data<ApiState>>() else {
            return ready(Err(ApiError::Internal("API state missing".into())));
        };
        let header = req.headers().get(header::AUTHORIZATION).and_then(|h| h.to_str().ok());
        let result = state.credentials.check(header, now_ms()).map(Authed);
        if let Err(e) = &result {
            tracing::info!(peer = ?req.peer_addr(), path = req.path(), reason = ?e.to_string(), "management API request refused");
        }
        ready(result)
    }
}

async fn not_found(req: HttpRequest) -> Result<HttpResponse> {
    Err(ApiError::NotFound(format!("{} {}", req.method(), req.path())))
}

/// CORS pre-flight: answered without credentials, as browsers send none (OWT does the same).
async fn preflight() -> HttpResponse {
    HttpResponse::Ok().finish()
}

/// CORS for browser-based admin tools on the configured origins only: the API issues
/// tokens, so unlike OWT (which allows any origin) it is closed to pages unless configured.
pub(crate) fn cors(origins: &[String]) -> actix_web::middleware::Condition<actix_cors::Cors> {
    let mut cors = actix_cors::Cors::default()
        .allowed_methods(["POST", "GET", "PUT", "DELETE", "PATCH"])
        .allowed_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .block_on_origin_mismatch(false)
        .max_age(3600);
    for origin in origins {
        cors = if origin == "*" { cors.allow_any_origin() } else { cors.allowed_origin(origin) };
    }
    actix_web::middleware::Condition::new(!origins.is_empty(), cors)
}

/// The room as JSON, with OWT's `_id` beside `id` for scripts written against OWT.
fn room_json(room: &Room) -> Value {
    let mut v = serde_json::to_value(room).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("_id".into(), Value::String(room.id.clone()));
    }
    v
}

pub(crate) fn find_room(state: &ApiState, id: &str) -> Result<Room> {
    state.store.get(id).ok_or_else(|| ApiError::RoomNotFound(id.into()))
}

async fn create_room(_: Authed, state: web::Data<ApiState>, body: web::Json<Value>) -> Result<HttpResponse> {
    let Value::Object(mut body) = body.into_inner() else {
        return Err(ApiError::BadRequest("Invalid request body: expected a JSON object {name, options}".into()));
    };
    let name = match body.remove("name") {
        Some(Value::String(s)) if !s.trim().is_empty() => s,
        Some(_) => return Err(ApiError::BadRequest("Invalid request body: `name` must be a non-empty string".into())),
        None => return Err(ApiError::BadRequest("Invalid request body: `name` is required".into())),
    };
    let options = body.remove("options").unwrap_or(Value::Null);
    if let Some(extra) = body.keys().next() {
        return Err(ApiError::BadRequest(format!("Invalid request body: unknown field `{extra}` (expected name, options)")));
    }
    let room = Room::from_options(tessera_core::ids::room_id(), name, options)?;
    let room = state.store.create(room).await?;
    tracing::info!(room = %room.id, name = ?room.name, "room created");
    Ok(HttpResponse::Ok().json(room_json(&room)))
}

#[derive(Deserialize)]
struct Paging {
    page: Option<usize>,
    per_page: Option<usize>,
}

async fn list_rooms(_: Authed, state: web::Data<ApiState>, q: web::Query<Paging>) -> Result<HttpResponse> {
    // Paged in the store's SQL, so a page reads its own rows rather than every room.
    let rooms = match q.per_page {
        Some(0) => return Err(ApiError::BadRequest("per_page must be at least 1".into())),
        Some(per) => {
            let page = q.page.unwrap_or(1).max(1);
            state.store.list_page((page - 1).saturating_mul(per), per)?
        }
        None => state.store.list_page(0, usize::MAX)?,
    };
    Ok(HttpResponse::Ok().json(rooms.iter().map(room_json).collect::<Vec<Value>>()))
}

async fn get_room(_: Authed, state: web::Data<ApiState>, path: web::Path<String>) -> Result<HttpResponse> {
    Ok(HttpResponse::Ok().json(room_json(&find_room(&state, &path)?)))
}

async fn update_room(_: Authed, state: web::Data<ApiState>, path: web::Path<String>, body: web::Json<Value>) -> Result<HttpResponse> {
    let room = find_room(&state, &path)?;
    let updated = state.store.update(room.updated(body.into_inner())?).await?;
    state.control.room_updated(&updated).await;
    tracing::info!(room = %updated.id, "room updated");
    Ok(HttpResponse::Ok().json(room_json(&updated)))
}

async fn delete_room(_: Authed, state: web::Data<ApiState>, path: web::Path<String>) -> Result<HttpResponse> {
    let room = state.store.delete(&path).await?;
    if let Some(r) = state.router.recorder_for(&room.id.as_str().into()) {
        let room = room.id.as_str().into();
        if let Err(e) = r.call(tessera_core::command::RoomDeleted { room }).await {
            tracing::warn!(error = %e, "the recorder could not stop the deleted room's recordings");
        }
    }
    state.control.room_deleted(&room.id).await;
    tracing::info!(room = %room.id, "room deleted");
    Ok(HttpResponse::Ok().content_type("text/plain").body("Room deleted"))
}

async fn create_token(caller: Authed, state: web::Data<ApiState>, path: web::Path<String>, body: web::Json<Value>) -> Result<HttpResponse> {
    let room = find_room(&state, &path)?;
    let body = body.into_inner();
    let field = |name: &str| -> Result<Option<String>> {
        match body.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ApiError::BadRequest(format!("Invalid request body: `{name}` must be a string"))),
        }
    };
    let Some(fields) = body.as_object() else {
        return Err(ApiError::BadRequest("Invalid request body: expected a JSON object {user, role}".into()));
    };
    // OWT clients may send `preference` ({isp, region}, a placement hint Tessera has no use
    // for on one node); anything else is a typo the caller should hear about.
    reject_unknown(fields.keys(), &["user", "role", "preference"], "")?;
    // As OWT: the user and role signed into the MAuth header win over the body's.
    let (body_user, body_role) = (field("user")?, field("role")?);
    let user = caller.0.user.or(body_user).unwrap_or_default();
    let role = caller.0.role.or(body_role).unwrap_or_default();
    if user.trim().is_empty() || user.len() > 256 {
        return Err(ApiError::BadRequest("Invalid request body: `user` must be a non-empty string of at most 256 bytes".into()));
    }
    if room.role(&role).is_none() {
        let known: Vec<&str> = room.roles.iter().map(|r| r.role.as_str()).collect();
        return Err(ApiError::BadRequest(format!(
            "Invalid request body: `role` `{role}` is not a role of room {} (roles: {})",
            room.id,
            known.join(", ")
        )));
    }
    let (token, claims) = state
        .tokens
        .issue(&room.id, &user, &role, &state.portal, now_secs(), state.token_lifetime_secs)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    tracing::info!(room = %room.id, user = ?user, role = ?role, token = %claims.jti, "token issued");
    Ok(HttpResponse::Ok().content_type("text/plain").body(token))
}

async fn list_participants(_: Authed, state: web::Data<ApiState>, path: web::Path<String>) -> Result<HttpResponse> {
    let room = find_room(&state, &path)?;
    Ok(HttpResponse::Ok().json(state.control.participants(&room.id).await?))
}

async fn get_participant(_: Authed, state: web::Data<ApiState>, path: web::Path<(String, String)>) -> Result<HttpResponse> {
    let (room, participant) = path.into_inner();
    let room = find_room(&state, &room)?;
    let found = state.control.participants(&room.id).await?.into_iter().find(|p| p.id == participant);
    Ok(HttpResponse::Ok().json(found.ok_or(ApiError::ParticipantNotFound(participant))?))
}

async fn drop_participant(_: Authed, state: web::Data<ApiState>, path: web::Path<(String, String)>) -> Result<HttpResponse> {
    let (room, participant) = path.into_inner();
    let room = find_room(&state, &room)?;
    state.control.drop_participant(&room.id, &participant).await?;
    tracing::info!(room = %room.id, participant = %participant, "participant dropped over REST");
    Ok(HttpResponse::Ok().finish())
}

async fn patch_participant(_: Authed, state: web::Data<ApiState>, path: web::Path<(String, String)>, body: web::Json<Value>) -> Result<HttpResponse> {
    let (room, participant) = path.into_inner();
    let room = find_room(&state, &room)?;
    let updated = state.control.patch_participant(&room.id, &participant, &body).await?;
    Ok(HttpResponse::Ok().json(updated))
}

async fn list_streams(_: Authed, state: web::Data<ApiState>, shape: web::Data<StreamShape>, path: web::Path<String>) -> Result<HttpResponse> {
    let room = find_room(&state, &path)?;
    let streams: Vec<Value> = state.control.streams(&room.id).await?.into_iter().map(|s| shape.apply(s)).collect();
    Ok(HttpResponse::Ok().json(streams))
}

async fn get_stream(_: Authed, state: web::Data<ApiState>, shape: web::Data<StreamShape>, path: web::Path<(String, String)>) -> Result<HttpResponse> {
    let (room, stream) = path.into_inner();
    let room = find_room(&state, &room)?;
    let found = state.control.streams(&room.id).await?.into_iter().find(|s| s.get("id") == Some(&json!(stream)));
    Ok(HttpResponse::Ok().json(shape.apply(found.ok_or(ApiError::StreamNotFound(stream))?)))
}

async fn delete_stream(_: Authed, state: web::Data<ApiState>, path: web::Path<(String, String)>) -> Result<HttpResponse> {
    let (room, stream) = path.into_inner();
    let room = find_room(&state, &room)?;
    state.control.delete_stream(&room.id, &stream).await?;
    Ok(HttpResponse::Ok().finish())
}

/// `POST /v1/drain` (Tessera extension, what `tessera drain` calls): the same as SIGTERM.
async fn drain(_: Authed, state: web::Data<ApiState>) -> Result<HttpResponse> {
    let hook = state.drain.as_ref().ok_or_else(|| ApiError::Internal("this server cannot be drained over REST".into()))?;
    hook.notify_one();
    tracing::info!("drain requested over REST");
    Ok(HttpResponse::Accepted().json(serde_json::json!({"draining": true})))
}

/// Tessera extension: live counts, for operators and leak checks.
async fn stats(_: Authed, state: web::Data<ApiState>) -> Result<HttpResponse> {
    Ok(HttpResponse::Ok().json(state.control.stats().await))
}

/// `GET /v1/cluster/nodes` (Tessera extension): every live node with its roles and load;
/// `self` names the node that answered.
async fn cluster_nodes(_: Authed, state: web::Data<ApiState>) -> Result<HttpResponse> {
    let nodes = state.nodes.nodes().await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"self": state.nodes.this_node().id, "nodes": nodes})))
}

async fn patch_stream(
    _: Authed,
    state: web::Data<ApiState>,
    shape: web::Data<StreamShape>,
    path: web::Path<(String, String)>,
    body: web::Json<Value>,
) -> Result<HttpResponse> {
    let (room, stream) = path.into_inner();
    let room = find_room(&state, &room)?;
    let updated = state.control.patch_stream(&room.id, &stream, &body).await?;
    Ok(HttpResponse::Ok().json(shape.apply(updated)))
}

/// Refuses a body with a field outside `known` (`at` names the enclosing object, e.g. `media.`).
pub(crate) fn reject_unknown<'a>(keys: impl IntoIterator<Item = &'a String>, known: &[&str], at: &str) -> Result<()> {
    match keys.into_iter().find(|k| !known.contains(&k.as_str())) {
        Some(extra) => {
            Err(ApiError::BadRequest(format!("Invalid request body: unknown field `{at}{}` (expected {})", extra.escape_debug(), known.join(", "))))
        }
        None => Ok(()),
    }
}
