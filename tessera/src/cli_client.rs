//! `tessera room …`, `tessera token …` and `tessera drain`: thin clients of the management API, so
//! operators need neither curl nor the MAuth scheme.

use anyhow::{Context, bail};
use serde_json::Value;

use crate::{ApiArgs, RoomAction, TokenAction};

fn service_key(api: &ApiArgs) -> anyhow::Result<String> {
    if let Some(k) = &api.key
        && !k.is_empty()
    {
        return Ok(k.clone());
    }
    let path = api.data_dir.join("service.key");
    let key = std::fs::read_to_string(&path)
        .with_context(|| format!("no service key: pass --key, set TESSERA_SERVICE_KEY, or run where {} exists", path.display()))?;
    Ok(key.trim().to_string())
}

async fn call(api: &ApiArgs, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<String> {
    let key = service_key(api)?;
    let url = format!("{}{}", api.api.trim_end_matches('/'), path);
    let client = http_client(api)?;
    let mut req = client.request(method, &url).bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.with_context(|| format!("cannot reach the management API at {url}"))?;
    let status = res.status();
    let text = res.text().await.context("reading the response")?;
    if !status.is_success() {
        let msg = serde_json::from_str::<Value>(&text).ok().and_then(|v| v["error"]["message"].as_str().map(str::to_string)).unwrap_or(text);
        bail!("{status}: {msg}");
    }
    Ok(text)
}

/// An https-capable client trusting the system's roots, plus `--ca-cert` or, without it
/// and for an API on this machine (a loopback address or localhost), the server's
/// generated dev certificate (`<data-dir>/dev-tls/cert.pem`) when present. Never that file
/// for another host: whoever could write it would be trusted with the service key.
fn http_client(api: &ApiArgs) -> anyhow::Result<reqwest::Client> {
    let dev = api.data_dir.join("dev-tls/cert.pem");
    let ca = match &api.ca_cert {
        Some(path) => Some(path.clone()),
        None => (is_local(&api.api) && dev.exists()).then_some(dev),
    };
    let mut builder = reqwest::Client::builder();
    if let Some(path) = ca {
        let pem = std::fs::read(&path).with_context(|| format!("--ca-cert: cannot read {}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).with_context(|| format!("--ca-cert: {} is not a PEM certificate", path.display()))?;
        builder = builder.tls_certs_merge(certs);
    }
    builder.build().context("building the HTTP client")
}

/// Whether an API URL names this machine.
fn is_local(url: &str) -> bool {
    // Parsed as the client will connect: `https://localhost@evil.example` is evil.example.
    let Some(parsed) = reqwest::Url::parse(url).ok() else { return false };
    let host = parsed.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn pretty(text: &str) -> String {
    serde_json::from_str::<Value>(text).and_then(|v| serde_json::to_string_pretty(&v)).unwrap_or_else(|_| text.to_string())
}

/// Runs a `tessera room` subcommand.
pub async fn room(action: RoomAction, api: ApiArgs) -> anyhow::Result<()> {
    match action {
        RoomAction::Create { name, options } => {
            let options: Value = match options {
                Some(o) => serde_json::from_str(&o).context("--options is not valid JSON")?,
                None => Value::Object(Default::default()),
            };
            let body = serde_json::json!({"name": name, "options": options});
            println!("{}", pretty(&call(&api, reqwest::Method::POST, "/v1/rooms", Some(body)).await?));
        }
        RoomAction::List => println!("{}", pretty(&call(&api, reqwest::Method::GET, "/v1/rooms", None).await?)),
        RoomAction::Delete { id } => {
            call(&api, reqwest::Method::DELETE, &format!("/v1/rooms/{id}"), None).await?;
            println!("room {id} deleted");
        }
    }
    Ok(())
}

/// `tessera drain`: asks the server to drain (`POST /v1/drain`).
pub async fn drain(api: ApiArgs) -> anyhow::Result<()> {
    call(&api, reqwest::Method::POST, "/v1/drain", None).await?;
    println!("draining: new logins are refused; the server stops when everyone has left or at its drain timeout");
    Ok(())
}

/// Runs a `tessera token` subcommand.
pub async fn token(action: TokenAction, api: ApiArgs) -> anyhow::Result<()> {
    let TokenAction::Create { room, user, role } = action;
    let body = serde_json::json!({"user": user, "role": role});
    println!("{}", call(&api, reqwest::Method::POST, &format!("/v1/rooms/{room}/tokens"), Some(body)).await?);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn local_api_hosts() {
        for url in ["https://127.0.0.1:3000", "https://localhost:3000/", "https://[::1]:3000", "http://127.0.0.2"] {
            assert!(super::is_local(url), "{url}");
        }
        for url in ["https://meet.example.org", "https://10.0.0.5:3000", "https://localhost.example.org:3000", "https://localhost:1@evil.example/"] {
            assert!(!super::is_local(url), "{url}");
        }
    }
}
