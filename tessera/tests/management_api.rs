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
    let body = json!({"name": "standup", "options": {"participantLimit": 5, "views": [{"label": "grid", "video": {"parameters": {"framerate": 15}}}]}});
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
    let (status, up) = json_of(
        c.put(server.url(&format!("/v1/rooms/{id}"))).bearer_auth(KEY).json(&json!({"inputLimit": 3})).send().await.unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{up}");
    assert_eq!(up["inputLimit"], 3);
    assert_eq!(up["participantLimit"], 5);

    // Paging.
    let (_, page2) =
        json_of(c.get(server.url("/v1/rooms?page=2&per_page=1")).bearer_auth(KEY).send().await.unwrap()).await;
    assert_eq!(page2.as_array().unwrap().len(), 1);
    assert_eq!(page2[0]["id"], id.as_str());

    // Token: an OWT-shaped base64 JSON object.
    let token = server.token(&id, "alice", "presenter").await;
    use base64::Engine;
    let decoded: Value =
        serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(&token).unwrap()).unwrap();
    assert_eq!(decoded["host"], server.portal.trim_start_matches("http://"));
    assert_eq!(decoded["secure"], false);
    assert!(decoded["tokenId"].as_str().unwrap().len() == 32);
    assert_eq!(decoded["signature"].as_str().unwrap().split('.').count(), 3);

    // Unknown role → 400 naming the field.
    let (status, err) = json_of(
        c.post(server.url(&format!("/v1/rooms/{id}/tokens")))
            .bearer_auth(KEY)
            .json(&json!({"user": "bob", "role": "king"}))
            .send()
            .await
            .unwrap(),
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
    let (status, _) = json_of(c.post(server.url("/v1/rooms/dev/tokens")).json(&json!({"user": "x", "role": "presenter"})).send().await.unwrap()).await;
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
    let post = |body: &'static str| {
        c.post(server.url("/v1/rooms")).bearer_auth(KEY).header("content-type", "application/json").body(body).send()
    };

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
    let (status, _) = json_of(c.post(server.url("/v1/rooms/nope/tokens")).bearer_auth(KEY).json(&json!({"user": "a", "role": "presenter"})).send().await.unwrap()).await;
    assert_eq!(status, 404);
    let (status, err) = json_of(c.get(server.url("/v2/whatever")).bearer_auth(KEY).send().await.unwrap()).await;
    assert_eq!(status, 404);
    assert_eq!(err["error"]["code"], 1001);

    // The server is unharmed: a good request still works.
    let (status, _) = json_of(post(r#"{"name": "fine"}"#).await.unwrap()).await;
    assert_eq!(status, 200);
}
