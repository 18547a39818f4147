//! Routes the binary adds to the portal's address: a health check and the dev-only token
//! endpoint the demo page uses to join without an application server.

use actix_web::{HttpResponse, web};
use serde::Deserialize;
use tessera_core::token::{PortalAddress, TokenAuthority};
use tessera_core::RoomStore;

/// What the dev token endpoint needs to issue tokens.
#[derive(Clone)]
pub struct DevTokens {
    /// Room configurations.
    pub store: std::sync::Arc<RoomStore>,
    /// Token signer.
    pub tokens: TokenAuthority,
    /// Portal address for the token.
    pub portal: PortalAddress,
    /// Token lifetime in seconds.
    pub lifetime_secs: u64,
    /// Room used when the request names none.
    pub default_room: String,
    /// Live rooms, for the demo page's layout switcher.
    pub control: std::sync::Arc<dyn tessera_core::RoomControl>,
}

#[derive(Deserialize)]
struct DevLayoutRequest {
    #[serde(default)]
    room: Option<String>,
    #[serde(default)]
    view: Option<String>,
    template: String,
}

#[derive(Deserialize)]
struct DevTokenRequest {
    #[serde(default)]
    room: Option<String>,
    user: String,
    #[serde(default)]
    role: Option<String>,
}

/// The JS client and the demo page, embedded so `tessera serve` works from any folder.
const ASSETS: [(&str, &str, &str); 4] = [
    ("/sdk/tessera.js", "text/javascript; charset=utf-8", include_str!("../../clients/js/dist/tessera.js")),
    ("/", "text/html; charset=utf-8", include_str!("../../clients/js/demo/index.html")),
    ("/demo.js", "text/javascript; charset=utf-8", include_str!("../../clients/js/demo/demo.js")),
    ("/demo.css", "text/css; charset=utf-8", include_str!("../../clients/js/demo/demo.css")),
];

/// Registers `/healthz`, the JS SDK at `/sdk/tessera.js`, the demo page at `/` when
/// `demo` is set, and `POST /dev/token` when `dev` is set.
pub fn configure(demo: bool, dev: Option<DevTokens>) -> impl Fn(&mut web::ServiceConfig) + Clone + Send + 'static {
    move |cfg: &mut web::ServiceConfig| {
        cfg.route("/healthz", web::get().to(|| async { HttpResponse::Ok().content_type("text/plain").body("ok") }));
        for (path, mime, body) in ASSETS {
            if path != "/sdk/tessera.js" && !demo {
                continue;
            }
            cfg.route(
                path,
                web::get().to(move || async move {
                    HttpResponse::Ok().content_type(mime).insert_header(("Cache-Control", "no-cache")).body(body)
                }),
            );
        }
        if let Some(dev) = dev.clone() {
            cfg.app_data(web::Data::new(dev))
                .route("/dev/token", web::post().to(dev_token))
                .route("/dev/layout", web::post().to(dev_layout));
        }
    }
}

fn error(status: actix_web::http::StatusCode, message: String) -> HttpResponse {
    HttpResponse::build(status).json(serde_json::json!({"error": {"code": 1201, "message": message}}))
}

async fn dev_token(dev: web::Data<DevTokens>, body: web::Json<DevTokenRequest>) -> HttpResponse {
    use actix_web::http::StatusCode;
    let body = body.into_inner();
    let room_id = body.room.unwrap_or_else(|| dev.default_room.clone());
    let Some(room) = dev.store.get(&room_id) else {
        return error(StatusCode::NOT_FOUND, format!("Room not found: {room_id}"));
    };
    let role = body.role.unwrap_or_else(|| "presenter".into());
    if room.role(&role).is_none() {
        return error(StatusCode::BAD_REQUEST, format!("`role` `{role}` is not a role of room {room_id}"));
    }
    if body.user.trim().is_empty() || body.user.len() > 256 {
        return error(StatusCode::BAD_REQUEST, "`user` must be a non-empty string of at most 256 bytes".into());
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    match dev.tokens.issue(&room.id, &body.user, &role, &dev.portal, now, dev.lifetime_secs) {
        Ok((token, _)) => HttpResponse::Ok().content_type("text/plain").body(token),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Switches a view's layout template for the demo page (same dev-only switch as tokens).
async fn dev_layout(dev: web::Data<DevTokens>, body: web::Json<DevLayoutRequest>) -> HttpResponse {
    use actix_web::http::StatusCode;
    let body = body.into_inner();
    let room = body.room.unwrap_or_else(|| dev.default_room.clone());
    let view = body.view.unwrap_or_else(|| "common".into());
    let ops = serde_json::json!([{"op": "replace", "path": "/info/layout/template", "value": body.template}]);
    match dev.control.patch_stream(&room, &format!("{room}-{view}"), &ops).await {
        Ok(stream) => HttpResponse::Ok().json(stream),
        Err(tessera_core::ControlError::StreamNotFound(s)) => error(StatusCode::NOT_FOUND, format!("Stream not found: {s}")),
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}
