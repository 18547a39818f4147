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
}

#[derive(Deserialize)]
struct DevTokenRequest {
    #[serde(default)]
    room: Option<String>,
    user: String,
    #[serde(default)]
    role: Option<String>,
}

/// Registers `/healthz` and, when `dev` is set, `POST /dev/token`.
pub fn configure(dev: Option<DevTokens>) -> impl Fn(&mut web::ServiceConfig) + Clone + Send + 'static {
    move |cfg: &mut web::ServiceConfig| {
        cfg.route("/healthz", web::get().to(|| async { HttpResponse::Ok().content_type("text/plain").body("ok") }));
        if let Some(dev) = dev.clone() {
            cfg.app_data(web::Data::new(dev)).route("/dev/token", web::post().to(dev_token));
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
