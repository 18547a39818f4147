//! Routes the binary adds to the portal's address: a health check and the dev-only token
//! endpoint the demo page uses to join without an application server.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use tessera_core::token::{PortalAddress, TokenAuthority};

/// What the dev token endpoint needs to issue tokens.
#[derive(Clone)]
pub struct DevTokens {
    /// Room configurations.
    pub store: std::sync::Arc<dyn tessera_core::Rooms>,
    /// Token signer.
    pub tokens: TokenAuthority,
    /// Portal address for the token.
    pub portal: PortalAddress,
    /// Token lifetime in seconds.
    pub lifetime_secs: u64,
    /// Room used when the request names none.
    pub default_room: String,
    /// Further rooms the dev endpoints may serve (`demo.dev_rooms`).
    pub extra_rooms: Vec<String>,
    /// Whether requests may name the server by any IP address (`dev_tokens = "on"`, a LAN
    /// demo) rather than only by a loopback name.
    pub any_ip_host: bool,
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

/// Registers `/healthz`, `/readyz`, the JS SDK at `/sdk/tessera.js`, the demo page at `/` when
/// `demo` is set, and `POST /dev/token` when `dev` is set.
pub fn configure(
    demo: bool,
    dev: Option<DevTokens>,
    cors_origins: Vec<String>,
    portal: tessera_portal::Portal,
) -> impl Fn(&mut web::ServiceConfig) + Clone + Send + 'static {
    move |cfg: &mut web::ServiceConfig| {
        cfg.route("/healthz", web::get().to(|| async { HttpResponse::Ok().content_type("text/plain").body("ok") }));
        // Ready means: accepting new logins and sessions (not while draining).
        let p = portal.clone();
        cfg.route(
            "/readyz",
            web::get().to(move || {
                let draining = p.is_draining();
                async move {
                    if draining {
                        HttpResponse::ServiceUnavailable().content_type("text/plain").body("draining")
                    } else {
                        HttpResponse::Ok().content_type("text/plain").body("ready")
                    }
                }
            }),
        );
        for (path, mime, body) in ASSETS {
            let sdk = path == "/sdk/tessera.js";
            if !sdk && !demo {
                continue;
            }
            let asset = move || async move { HttpResponse::Ok().content_type(mime).insert_header(("Cache-Control", "no-cache")).body(body) };
            // Pages on other origins import the SDK as a module, which browsers fetch with CORS.
            let origins: &[String] = if sdk { &cors_origins } else { &[] };
            cfg.service(web::resource(path).wrap(tessera_portal::socketio::cors(origins)).route(web::get().to(asset)));
        }
        if let Some(dev) = dev.clone() {
            cfg.app_data(web::Data::new(dev)).route("/dev/token", web::post().to(dev_token)).route("/dev/layout", web::post().to(dev_layout));
        }
    }
}

fn error(status: actix_web::http::StatusCode, message: String) -> HttpResponse {
    HttpResponse::build(status).json(serde_json::json!({"error": {"code": 1201, "message": message}}))
}

/// The host part of a `Host` header value or of an origin's authority (`[::1]:80` → `::1`).
fn host_name(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// Whether `host` names this machine without DNS: `localhost`, `*.localhost` or a
/// loopback address — or, when `any_ip`, any IP literal. A DNS name other than those is
/// refused, which is what defeats DNS rebinding (an attacker's name resolving to us).
fn trusted_host(host: &str, any_ip: bool) -> bool {
    let host = host.to_ascii_lowercase();
    if host == "localhost" || host.ends_with(".localhost") {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => any_ip || ip.is_loopback(),
        Err(_) => false,
    }
}

/// The dev endpoints answer only requests addressed to this machine by a trusted name
/// and, when a browser sends an `Origin`, only pages of the same origin. `Err` is why not.
fn check_dev_request(req: &HttpRequest, dev: &DevTokens) -> Result<(), &'static str> {
    let Some(host) = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return Err("dev endpoint: missing Host header");
    };
    if !trusted_host(host_name(host), dev.any_ip_host) {
        return Err("dev endpoint: only for requests to localhost or a loopback address");
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        let authority = origin.split_once("://").map(|(_, a)| a).unwrap_or_default();
        if !authority.eq_ignore_ascii_case(host) {
            return Err("dev endpoint: only for pages served by this portal (Origin differs from Host)");
        }
    }
    Ok(())
}

/// The room a dev request may use: the default room or one of `demo.dev_rooms`.
fn dev_room(dev: &DevTokens, requested: Option<String>) -> Result<String, &'static str> {
    let room = requested.unwrap_or_else(|| dev.default_room.clone());
    if room == dev.default_room || dev.extra_rooms.contains(&room) {
        Ok(room)
    } else {
        Err("dev endpoint: this room is not open to dev tokens (config key demo.dev_rooms)")
    }
}

/// Both checks of a dev request; `Err` is why it is refused (403).
fn dev_request_room(req: &HttpRequest, dev: &DevTokens, requested: Option<String>) -> Result<String, &'static str> {
    check_dev_request(req, dev).and_then(|()| dev_room(dev, requested))
}

async fn dev_token(req: HttpRequest, dev: web::Data<DevTokens>, body: web::Json<DevTokenRequest>) -> HttpResponse {
    use actix_web::http::StatusCode;
    let body = body.into_inner();
    let room_id = match dev_request_room(&req, &dev, body.room) {
        Ok(r) => r,
        Err(why) => return error(StatusCode::FORBIDDEN, why.to_string()),
    };
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
async fn dev_layout(req: HttpRequest, dev: web::Data<DevTokens>, body: web::Json<DevLayoutRequest>) -> HttpResponse {
    use actix_web::http::StatusCode;
    let body = body.into_inner();
    let room = match dev_request_room(&req, &dev, body.room) {
        Ok(r) => r,
        Err(why) => return error(StatusCode::FORBIDDEN, why.to_string()),
    };
    let view = body.view.unwrap_or_else(|| "common".into());
    let ops = serde_json::json!([{"op": "replace", "path": "/info/layout/template", "value": body.template}]);
    match dev.control.patch_stream(&room, &format!("{room}-{view}"), &ops).await {
        Ok(stream) => HttpResponse::Ok().json(stream),
        Err(tessera_core::ControlError::StreamNotFound(s)) => error(StatusCode::NOT_FOUND, format!("Stream not found: {s}")),
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert_eq!(host_name("127.0.0.1:8080"), "127.0.0.1");
        assert_eq!(host_name("[::1]:8080"), "::1");
        assert_eq!(host_name("localhost"), "localhost");
        for ok in ["localhost", "app.localhost", "127.0.0.1", "127.9.9.9", "::1", "LOCALHOST"] {
            assert!(trusted_host(ok, false), "{ok}");
        }
        for bad in ["evil.example", "localhost.evil.example", "192.168.1.5", "0.0.0.0", "", "127.0.0.1.nip.io"] {
            assert!(!trusted_host(bad, false), "{bad}");
        }
        assert!(trusted_host("192.168.1.5", true));
        assert!(!trusted_host("evil.example", true));
    }
}
