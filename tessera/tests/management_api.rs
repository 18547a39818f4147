//! The management REST API, driven over HTTP against the real `tessera` binary.

mod common;

use common::{KEY, start, tempdir};
use serde_json::{Value, json};

async fn json_of(res: reqwest::Response) -> (u16, Value) {
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    match serde_json::from_str(&text) {
        Ok(v) => (status, v),
        Err(_) => (status, Value::String(text)),
    }
}

#[tokio::test]
async fn room_crud_tokens_and_persistence() {
    let dir = tempdir();
    let mut server = start(dir.path(), &[]);
    let c = server.client();

    // The default room exists from the first start.
    let (status, rooms) = json_of(c.get(server.url("/v1/rooms")).bearer_auth(KEY).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(rooms.as_array().unwrap().len(), 1);
    assert_eq!(rooms[0]["id"], "dev");
    assert_eq!(rooms[0]["views"][0]["label"], "common");

    // Create with OWT's {name, options}.
    let body =
        json!({"name": "standup", "options": {"participantLimit": 5, "views": [{"label": "grid", "video": {"parameters": {"framerate": 15}}}]}});
    let (status, room) = json_of(c.post(server.url("/v1/rooms")).bearer_auth(KEY).json(&body).send().await.unwrap()).await;
    assert_eq!(status, 200, "{room}");
    let id = room["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 24);
    assert_eq!(room["_id"], id.as_str());
    assert_eq!(room["participantLimit"], 5);
    assert_eq!(room["views"][0]["video"]["parameters"]["framerate"], 15);
    assert_eq!(room["views"][0]["video"]["parameters"]["resolution"]["width"], 640);
    assert_eq!(room["roles"][0]["role"], "presenter");

    // Same name again: conflict.
    let (status, err) = json_of(c.post(server.url("/v1/rooms")).bearer_auth(KEY).json(&body).send().await.unwrap()).await;
    assert_eq!(status, 409);
    assert_eq!(err["error"]["code"], 1203);

    // Read, update.
    let (status, got) = json_of(c.get(server.url(&format!("/v1/rooms/{id}"))).bearer_auth(KEY).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(got, room);
    let (status, up) =
        json_of(c.put(server.url(&format!("/v1/rooms/{id}"))).bearer_auth(KEY).json(&json!({"inputLimit": 3})).send().await.unwrap()).await;
    assert_eq!(status, 200, "{up}");
    assert_eq!(up["inputLimit"], 3);
    assert_eq!(up["participantLimit"], 5);

    // Paging.
    let (_, page2) = json_of(c.get(server.url("/v1/rooms?page=2&per_page=1")).bearer_auth(KEY).send().await.unwrap()).await;
    assert_eq!(page2.as_array().unwrap().len(), 1);
    assert_eq!(page2[0]["id"], id.as_str());

    // Token: an OWT-shaped base64 JSON object.
    let token = server.token(&id, "alice", "presenter").await;
    use base64::Engine;
    let decoded: Value = serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(&token).unwrap()).unwrap();
    assert_eq!(decoded["host"], server.portal.trim_start_matches("http://"));
    assert_eq!(decoded["secure"], false);
    assert!(decoded["tokenId"].as_str().unwrap().len() == 32);
    assert_eq!(decoded["signature"].as_str().unwrap().split('.').count(), 3);

    // Unknown role → 400 naming the field.
    let (status, err) = json_of(
        c.post(server.url(&format!("/v1/rooms/{id}/tokens"))).bearer_auth(KEY).json(&json!({"user": "bob", "role": "king"})).send().await.unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(err["error"]["message"].as_str().unwrap().contains("`role`"), "{err}");

    // Participants and streams: real, empty lists.
    let (status, ps) = json_of(c.get(server.url(&format!("/v1/rooms/{id}/participants"))).bearer_auth(KEY).send().await.unwrap()).await;
    assert_eq!((status, ps), (200, json!([])));
    let (status, ss) = json_of(c.get(server.url(&format!("/v1/rooms/{id}/streams"))).bearer_auth(KEY).send().await.unwrap()).await;
    assert_eq!((status, ss), (200, json!([])));
    let (status, _) = json_of(c.get(server.url(&format!("/v1/rooms/{id}/participants/nobody"))).bearer_auth(KEY).send().await.unwrap()).await;
    assert_eq!(status, 404);

    // Restart: rooms persist, including the update.
    assert!(server.terminate(), "clean exit on SIGTERM");
    drop(server);
    let server = start(dir.path(), &[]);
    let (status, got) = json_of(c.get(server.url(&format!("/v1/rooms/{id}"))).bearer_auth(KEY).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(got["inputLimit"], 3);
    assert_eq!(got["name"], "standup");

    // Delete.
    let res = c.delete(server.url(&format!("/v1/rooms/{id}"))).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let (status, err) = json_of(c.get(server.url(&format!("/v1/rooms/{id}"))).bearer_auth(KEY).send().await.unwrap()).await;
    assert_eq!(status, 404);
    assert_eq!(err["error"]["code"], 1003);
    let (status, _) = json_of(c.delete(server.url(&format!("/v1/rooms/{id}"))).bearer_auth(KEY).send().await.unwrap()).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn authentication() {
    let dir = tempdir();
    let server = start(dir.path(), &[]);
    let c = server.client();
    let url = server.url("/v1/rooms");

    let (status, err) = json_of(c.get(&url).send().await.unwrap()).await;
    assert_eq!(status, 401);
    assert_eq!(err["error"]["code"], 1101);
    let (status, _) = json_of(c.get(&url).bearer_auth("wrong-key").send().await.unwrap()).await;
    assert_eq!(status, 401);
    let (status, _) = json_of(c.get(&url).header("Authorization", "Basic Zm9vOmJhcg==").send().await.unwrap()).await;
    assert_eq!(status, 401);
    // Tokens cannot be minted without credentials either.
    let (status, _) =
        json_of(c.post(server.url("/v1/rooms/dev/tokens")).json(&json!({"user": "x", "role": "presenter"})).send().await.unwrap()).await;
    assert_eq!(status, 401);

    // OWT MAuth, as the OWT server-side samples compute it.
    let mauth = |service: &str, key: &str, ts: u128, user_role: Option<(&str, &str)>| {
        let sig = tessera_core_sig(key, &ts.to_string(), "31337", user_role);
        let mut h = format!(
            "MAuth realm=http://marte3.dit.upm.es,mauth_signature_method=HMAC_SHA256,mauth_serviceid={service},mauth_cnonce=31337,mauth_timestamp={ts}"
        );
        if let Some((u, r)) = user_role {
            h += &format!(",mauth_username={u},mauth_role={r}");
        }
        h + &format!(",mauth_signature={sig}")
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let (status, rooms) = json_of(c.get(&url).header("Authorization", mauth("tessera", KEY, now, None)).send().await.unwrap()).await;
    assert_eq!(status, 200, "{rooms}");
    let (status, _) = json_of(c.get(&url).header("Authorization", mauth("tessera", "not-the-key-0000000", now, None)).send().await.unwrap()).await;
    assert_eq!(status, 401);
    let (status, _) = json_of(c.get(&url).header("Authorization", mauth("other", KEY, now, None)).send().await.unwrap()).await;
    assert_eq!(status, 401);
    // MAuth carrying user and role: a token request may omit them from the body.
    let res = c
        .post(server.url("/v1/rooms/dev/tokens"))
        .header("Authorization", mauth("tessera", KEY, now, Some(("Y2Fyb2w=", "viewer"))))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // ...and, as in OWT, they win over the body's (the signed identity is the caller's).
    let res = c
        .post(server.url("/v1/rooms/dev/tokens/"))
        .header("Authorization", mauth("tessera", KEY, now, Some(("Y2Fyb2w=", "viewer"))))
        .json(&json!({"user": "mallory", "role": "presenter"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    use base64::Engine;
    let envelope: Value = serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(res.text().await.unwrap()).unwrap()).unwrap();
    let claims = envelope["signature"].as_str().unwrap().split('.').nth(1).unwrap().to_string();
    let claims: Value = serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
    assert_eq!((claims["user"].as_str(), claims["role"].as_str()), (Some("carol"), Some("viewer")), "{claims}");

    // OWT routes of features Tessera lacks: 501 with what to do instead, after the credentials check.
    for (method, path, says) in [
        (reqwest::Method::POST, "/v1/rooms/dev/streaming-outs/", "record the stream"),
        (reqwest::Method::GET, "/v1/rooms/dev/streaming-ins", "publish over WebRTC"),
        (reqwest::Method::DELETE, "/v1/rooms/dev/sipcalls/abc", "SIP calls"),
        (reqwest::Method::GET, "/v1/rooms/dev/analytics", "analytics"),
        (reqwest::Method::GET, "/v1/services", "service.key"),
        (reqwest::Method::GET, "/v1.1/stream-engine", "stream-engine"),
    ] {
        let (status, err) = json_of(c.request(method.clone(), server.url(path)).bearer_auth(KEY).send().await.unwrap()).await;
        assert_eq!((status, err["error"]["code"].as_u64()), (501, Some(1301)), "{method} {path}: {err}");
        assert!(err["error"]["message"].as_str().unwrap().contains(says), "{err}");
        let (status, _) = json_of(c.request(method.clone(), server.url(path)).send().await.unwrap()).await;
        assert_eq!(status, 401, "{method} {path} without credentials");
    }
    let (status, _) = json_of(c.get(server.url("/v1/rooms/dev/streaming-outsx")).bearer_auth(KEY).send().await.unwrap()).await;
    assert_eq!(status, 404);
}

/// OWT's MAuth signature: base64(hex(HMAC-SHA256(key, "ts,cnonce[,user,role]"))), computed
/// here independently of the server's code.
fn tessera_core_sig(key: &str, ts: &str, cnonce: &str, user_role: Option<(&str, &str)>) -> String {
    use base64::Engine;
    use hmac::Mac;
    let mut msg = format!("{ts},{cnonce}");
    if let Some((u, r)) = user_role {
        msg += &format!(",{u},{r}");
    }
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(msg.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test]
async fn bad_requests_get_precise_errors() {
    let dir = tempdir();
    let server = start(dir.path(), &[]);
    let c = server.client();
    let post = |body: &'static str| c.post(server.url("/v1/rooms")).bearer_auth(KEY).header("content-type", "application/json").body(body).send();

    let (status, err) = json_of(post("{not json").await.unwrap()).await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["code"], 1201);
    assert!(err["error"]["message"].as_str().unwrap().contains("parse JSON"), "{err}");

    let (status, err) = json_of(post(r#"{"options": {}}"#).await.unwrap()).await;
    assert_eq!(status, 400);
    assert!(err["error"]["message"].as_str().unwrap().contains("`name`"), "{err}");

    let (status, err) = json_of(post(r#"{"name": "x", "options": {"participantLimit": "ten"}}"#).await.unwrap()).await;
    assert_eq!(status, 400);
    assert!(err["error"]["message"].as_str().unwrap().contains("participantLimit"), "{err}");

    let (status, err) = json_of(post(r#"{"name": "x", "options": {"views": [{"video": {"parameters": {"framerate": 500}}}]}}"#).await.unwrap()).await;
    assert_eq!(status, 400);
    assert!(err["error"]["message"].as_str().unwrap().contains("views[0].video.parameters.framerate"), "{err}");

    let (status, err) = json_of(post(r#"{"name": "x", "options": {"colour": 1}}"#).await.unwrap()).await;
    assert_eq!(status, 400);
    assert!(err["error"]["message"].as_str().unwrap().contains("colour"), "{err}");

    let big = format!(r#"{{"name": "{}"}}"#, "x".repeat(300 * 1024));
    let res = c.post(server.url("/v1/rooms")).bearer_auth(KEY).header("content-type", "application/json").body(big).send().await.unwrap();
    let (status, err) = json_of(res).await;
    assert_eq!(status, 413);
    assert_eq!(err["error"]["code"], 1202);

    let (status, err) = json_of(c.get(server.url("/v1/rooms/nope")).bearer_auth(KEY).send().await.unwrap()).await;
    assert_eq!(status, 404);
    assert!(err["error"]["message"].as_str().unwrap().contains("nope"));
    let (status, _) =
        json_of(c.post(server.url("/v1/rooms/nope/tokens")).bearer_auth(KEY).json(&json!({"user": "a", "role": "presenter"})).send().await.unwrap())
            .await;
    assert_eq!(status, 404);
    let (status, err) = json_of(c.get(server.url("/v2/whatever")).bearer_auth(KEY).send().await.unwrap()).await;
    assert_eq!(status, 404);
    assert_eq!(err["error"]["code"], 1001);

    // The server is unharmed: a good request still works.
    let (status, _) = json_of(post(r#"{"name": "fine"}"#).await.unwrap()).await;
    assert_eq!(status, 200);
}

/// OWT's own REST client (owt-server `restClient.js`) signs every call with MAuth and
/// writes some paths with a trailing slash; OWT's express server accepts both spellings.
/// Every route, driven that way.
#[tokio::test]
async fn every_route_with_mauth_and_a_trailing_slash() {
    let dir = tempdir();
    let server = start(dir.path(), &[]);
    let c = server.client();
    let auth = || {
        let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis().to_string();
        let cnonce = "4242";
        let sig = tessera_core_sig(KEY, &ts, cnonce, None);
        format!(
            "MAuth realm=http://marte3.dit.upm.es,mauth_signature_method=HMAC_SHA256,mauth_serviceid=tessera,mauth_cnonce={cnonce},mauth_timestamp={ts},mauth_signature={sig}"
        )
    };
    let call = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut req = c.request(method, server.url(path)).header("Authorization", auth());
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send()
    };
    use reqwest::Method as M;
    let (status, _) = json_of(call(M::GET, "/v1/stats/", None).await.unwrap()).await;
    assert_eq!(status, 200);
    let (status, room) = json_of(call(M::POST, "/v1/rooms/", Some(json!({"name": "slash"}))).await.unwrap()).await;
    assert_eq!(status, 200, "{room}");
    let id = room["id"].as_str().unwrap().to_string();
    let (status, list) = json_of(call(M::GET, "/v1/rooms/", None).await.unwrap()).await;
    assert_eq!(status, 200);
    assert!(list.as_array().unwrap().iter().any(|r| r["id"] == id.as_str()));
    assert_eq!(json_of(call(M::GET, &format!("/v1/rooms/{id}/"), None).await.unwrap()).await.0, 200);
    let (status, updated) = json_of(call(M::PUT, &format!("/v1/rooms/{id}/"), Some(json!({"name": "slash2"}))).await.unwrap()).await;
    assert_eq!(status, 200, "{updated}");
    let token = call(M::POST, &format!("/v1/rooms/{id}/tokens/"), Some(json!({"user": "u", "role": "presenter"}))).await.unwrap();
    assert_eq!(token.status(), 200);
    let token = token.text().await.unwrap();

    // A live participant, for the participant and stream routes.
    let mut sig = tessera_client::signaling::Signaling::connect(&server.portal).await.unwrap();
    let me = sig
        .ok("login", Some(json!({"token": token, "userAgent": {"sdk": {"version": "5.1", "type": "JavaScript"}}, "protocol": "1.2"})))
        .await
        .unwrap();
    let pid = me["id"].as_str().unwrap().to_string();
    let (status, ps) = json_of(call(M::GET, &format!("/v1/rooms/{id}/participants/"), None).await.unwrap()).await;
    assert_eq!((status, ps.as_array().map(Vec::len)), (200, Some(1)), "{ps}");
    assert_eq!(json_of(call(M::GET, &format!("/v1/rooms/{id}/participants/{pid}/"), None).await.unwrap()).await.0, 200);
    let mixed = format!("{id}-common");
    let (status, streams) = json_of(call(M::GET, &format!("/v1/rooms/{id}/streams/"), None).await.unwrap()).await;
    assert_eq!(status, 200);
    assert!(streams.as_array().unwrap().iter().any(|s| s["id"] == mixed.as_str()), "{streams}");
    assert_eq!(json_of(call(M::GET, &format!("/v1/rooms/{id}/streams/{mixed}/"), None).await.unwrap()).await.0, 200);
    let ops = json!([{"op": "replace", "path": "/info/layout/template", "value": "lecture"}]);
    let (status, patched) = json_of(call(M::PATCH, &format!("/v1/rooms/{id}/streams/{mixed}/"), Some(ops)).await.unwrap()).await;
    assert_eq!(status, 200, "{patched}");
    // A mixed stream cannot be deleted: the route answers (400), it is not an unknown path (404).
    let (status, err) = json_of(call(M::DELETE, &format!("/v1/rooms/{id}/streams/{mixed}/"), None).await.unwrap()).await;
    assert_eq!(status, 400, "{err}");

    // A participant's permission, as OWT's ParticipantUpdate.
    let ops = json!([{"op": "replace", "path": "/permission/subscribe/video", "value": false}]);
    let (status, p) = json_of(call(M::PATCH, &format!("/v1/rooms/{id}/participants/{pid}/"), Some(ops)).await.unwrap()).await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["permission"]["subscribe"], json!({"audio": true, "video": false}));
    let ops = json!([{"op": "replace", "path": "/permission/subscribe/video", "value": true}, {"op": "replace", "path": "/role", "value": "admin"}]);
    let (status, err) = json_of(call(M::PATCH, &format!("/v1/rooms/{id}/participants/{pid}/"), Some(ops)).await.unwrap()).await;
    assert_eq!(status, 400, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("[1]"), "{err}");
    let (_, p) = json_of(call(M::GET, &format!("/v1/rooms/{id}/participants/{pid}/"), None).await.unwrap()).await;
    assert_eq!(p["permission"]["subscribe"]["video"], false, "a refused PATCH changes nothing");
    let (status, _) = json_of(call(M::PATCH, &format!("/v1/rooms/{id}/participants/nobody/"), Some(json!([]))).await.unwrap()).await;
    assert_eq!(status, 404);

    // /v1.1 serves every /v1 route; streams in OWT's v1.1 shape (video layers in
    // `original`), /v1 with video format and parameters flattened.
    let (status, v11) = json_of(call(M::GET, &format!("/v1.1/rooms/{id}/streams/"), None).await.unwrap()).await;
    assert_eq!(status, 200);
    let m11 = v11.as_array().unwrap().iter().find(|s| s["id"] == mixed.as_str()).unwrap().clone();
    assert_eq!(m11["media"]["video"]["original"][0]["format"]["codec"], "vp8", "{m11}");
    assert!(m11["media"].get("tracks").is_none(), "{m11}");
    let (_, m1) = json_of(call(M::GET, &format!("/v1/rooms/{id}/streams/{mixed}/"), None).await.unwrap()).await;
    assert_eq!(m1["media"]["video"]["format"]["codec"], "vp8", "{m1}");
    assert_eq!(m1["media"]["audio"]["format"]["codec"], "opus", "{m1}");
    assert!(m1["media"]["video"].get("original").is_none(), "{m1}");
    for path in [format!("/v1.1/rooms/{id}/"), format!("/v1.1/rooms/{id}/participants/{pid}"), format!("/v1.1/rooms/{id}/streams/{mixed}")] {
        assert_eq!(json_of(call(M::GET, &path, None).await.unwrap()).await.0, 200, "{path}");
    }
    assert_eq!(json_of(call(M::GET, "/v1.2/rooms", None).await.unwrap()).await.0, 404);

    let rec = json!({"container": "mkv", "media": {"audio": {"from": mixed}, "video": {"from": mixed}}});
    let (status, rec) = json_of(call(M::POST, &format!("/v1/rooms/{id}/recordings/"), Some(rec)).await.unwrap()).await;
    assert_eq!(status, 200, "{rec}");
    let rid = rec["id"].as_str().unwrap().to_string();
    let (status, recs) = json_of(call(M::GET, &format!("/v1/rooms/{id}/recordings/"), None).await.unwrap()).await;
    assert_eq!((status, recs.as_array().map(Vec::len)), (200, Some(1)), "{recs}");
    let ops = json!([{"op": "replace", "path": "/media/audio/from", "value": mixed}]);
    let (status, patched) = json_of(call(M::PATCH, &format!("/v1/rooms/{id}/recordings/{rid}/"), Some(ops)).await.unwrap()).await;
    assert_eq!(status, 200, "{patched}");
    // No operation: the recording as it is.
    let (status, same) = json_of(call(M::PATCH, &format!("/v1/rooms/{id}/recordings/{rid}/"), Some(json!([]))).await.unwrap()).await;
    assert_eq!((status, same["id"].as_str()), (200, Some(rid.as_str())), "{same}");
    assert_eq!(json_of(call(M::DELETE, &format!("/v1/rooms/{id}/recordings/{rid}/"), None).await.unwrap()).await.0, 200);
    let file = call(M::GET, &format!("/v1/rooms/{id}/recordings/{rid}/file/"), None).await.unwrap();
    assert_eq!(file.status(), 200);

    assert_eq!(json_of(call(M::DELETE, &format!("/v1/rooms/{id}/participants/{pid}/"), None).await.unwrap()).await.0, 200);
    assert_eq!(json_of(call(M::DELETE, &format!("/v1/rooms/{id}/"), None).await.unwrap()).await.0, 200);
    assert_eq!(json_of(call(M::GET, &format!("/v1/rooms/{id}/"), None).await.unwrap()).await.0, 404);
}

/// The API issues tokens, so browsers get no CORS headers unless origins are configured;
/// the portal answers CORS for any origin by default (OWT apps' pages live elsewhere).
#[tokio::test]
async fn cors_closed_on_the_api_open_on_the_portal() {
    let dir = tempdir();
    let server = start(dir.path(), &[]);
    let c = server.client();
    let origin = "https://app.example.com";
    let res = c.get(server.url("/v1/rooms")).bearer_auth(KEY).header("Origin", origin).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("access-control-allow-origin").is_none(), "{:?}", res.headers());
    let res = c.get(format!("{}/socket.io/?EIO=4&transport=polling", server.portal)).header("Origin", origin).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["access-control-allow-origin"], origin);
    let pre = c
        .request(reqwest::Method::OPTIONS, format!("{}/socket.io/?EIO=4&transport=polling", server.portal))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "content-type")
        .send()
        .await
        .unwrap();
    assert!(pre.status().is_success(), "{}", pre.status());
    assert_eq!(pre.headers()["access-control-allow-origin"], origin);
    assert!(pre.headers()["access-control-allow-methods"].to_str().unwrap().contains("POST"));

    // Configured: the API answers the listed origin only; the portal can be closed too.
    let (_d, s2) = common::start_with_config(&format!(
        "[server]\napi_cors_origins = [\"{origin}\"]\n[portal]\ncors_origins = [\"https://other.example.com\"]\n"
    ));
    let res = c.get(s2.url("/v1/rooms")).bearer_auth(KEY).header("Origin", origin).send().await.unwrap();
    assert_eq!(res.headers()["access-control-allow-origin"], origin);
    let res = c.get(s2.url("/v1/rooms")).bearer_auth(KEY).header("Origin", "https://evil.example").send().await.unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
    let res = c.get(format!("{}/socket.io/?EIO=4&transport=polling", s2.portal)).header("Origin", origin).send().await.unwrap();
    assert_eq!(res.status(), 200, "same-origin and non-browser clients are still served");
    assert!(res.headers().get("access-control-allow-origin").is_none());
    // A bad origin in the config names the key.
    let (_d3, cfg) = {
        let d = tempdir();
        let p = d.path().join("bad.toml");
        std::fs::write(&p, "[portal]\ncors_origins = [\"app.example.com/path\"]\n").unwrap();
        (d, p)
    };
    let out = std::process::Command::new(common::bin()).args(["serve", "--config", cfg.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("portal.cors_origins") && err.contains("bad.toml"), "{err}");
}
