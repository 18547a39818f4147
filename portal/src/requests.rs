//! Payloads of the client requests, parsed with precise error messages. The shapes are
//! OWT Client-Portal protocol 1.2 (see `docs/protocol.md`).

use serde::Deserialize;
use serde_json::Value;

/// Protocol versions we speak; OWT clients send "1.2", older ones "1.0"/"1.1".
pub(crate) const PROTOCOLS: [&str; 3] = ["1.0", "1.1", "1.2"];

/// Longest `text` message, in characters (OWT's documented limit).
pub(crate) const MAX_TEXT_CHARS: usize = 2048;

/// `login` payload.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Login {
    pub token: String,
    #[serde(default)]
    pub user_agent: Option<Value>,
    #[serde(default)]
    pub protocol: Option<String>,
}

/// `text` payload.
#[derive(Debug, Deserialize)]
pub(crate) struct Text {
    pub to: Value,
    pub message: Value,
}

/// Parses the first argument of a request into `T`, naming the request in the error.
pub(crate) fn parse<T: for<'de> Deserialize<'de>>(request: &str, args: &[Value]) -> Result<T, String> {
    let Some(first) = args.first() else {
        return Err(format!("{request}: missing request data"));
    };
    // serde would also read an array as the fields in order (`["all", "hi"]` as a text);
    // the protocol sends objects, as the other requests require.
    if !first.is_object() {
        return Err(format!("{request}: invalid request data: expected an object"));
    }
    serde_json::from_value(first.clone()).map_err(|e| format!("{request}: invalid request data: {e}"))
}

impl Login {
    /// Checks the protocol and user agent the way OWT's portal does.
    pub fn check_client(&self) -> Result<(), String> {
        if let Some(p) = &self.protocol
            && !PROTOCOLS.contains(&p.as_str())
        {
            return Err("Unknown client protocol".into());
        }
        if let Some(ua) = &self.user_agent {
            let sdk = ua.get("sdk");
            let ok = sdk.is_some_and(|s| s.get("type").is_some_and(Value::is_string) && s.get("version").is_some_and(Value::is_string));
            if !ok {
                return Err("User agent info is incorrect".into());
            }
        }
        Ok(())
    }
}

impl Text {
    /// Returns (recipient, message) after checking both.
    pub fn checked(self) -> Result<(String, String), String> {
        let to = match self.to {
            Value::String(s) if !s.is_empty() => s,
            _ => return Err("Invalid receiver".into()),
        };
        let message = match self.message {
            Value::String(s) => s,
            _ => return Err("text: `message` must be a string".into()),
        };
        if message.chars().count() > MAX_TEXT_CHARS {
            return Err(format!("text: message longer than {MAX_TEXT_CHARS} characters"));
        }
        Ok((to, message))
    }
}

/// Property tests: `login` and `text` bodies of any shape parse or fail with a message
/// naming the request, and what is accepted is exactly what the protocol allows.
#[cfg(test)]
mod proptests {
    use super::*;
    use crate::socketio::packet::proptests::{config, json_with, text};
    use proptest::prelude::*;

    const WORDS: &[&str] = &["token", "userAgent", "protocol", "sdk", "type", "version", "to", "message", "1.0", "1.2", "all", "p1"];

    fn args() -> impl Strategy<Value = Vec<Value>> {
        let body = prop_oneof![
            3 => (prop::option::of(json_with(2, WORDS)), prop::option::of(json_with(2, WORDS)), prop::option::of(json_with(2, WORDS)))
                .prop_map(|(a, b, c)| {
                    let mut m = serde_json::Map::new();
                    for (k, v) in [("token", a), ("userAgent", b), ("protocol", c)] {
                        if let Some(v) = v {
                            m.insert(k.into(), v);
                        }
                    }
                    Value::Object(m)
                }),
            3 => (json_with(1, WORDS), prop_oneof![json_with(1, WORDS), text(8).prop_map(Value::from), (2040usize..2060).prop_map(|n| Value::from("é".repeat(n)))])
                .prop_map(|(to, message)| serde_json::json!({"to": to, "message": message})),
            1 => json_with(3, WORDS),
        ];
        prop::collection::vec(body, 0..3)
    }

    #[test]
    fn arrays_are_not_request_bodies() {
        // Found by proptests: serde read `["token"]` as a login and `["all", "hi"]` as a text.
        let e = parse::<Login>("login", &[serde_json::json!(["token"])]).unwrap_err();
        assert_eq!(e, "login: invalid request data: expected an object");
        assert!(parse::<Text>("text", &[serde_json::json!(["all", "hi"])]).is_err());
        assert!(parse::<Text>("text", &[serde_json::json!({"to": "all", "message": "hi"})]).is_ok());
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn login_bodies_parse_or_explain(args in args()) {
            match parse::<Login>("login", &args) {
                Ok(login) => {
                    prop_assert_eq!(Some(login.token.as_str()), args[0]["token"].as_str());
                    let protocol_ok = login.protocol.as_deref().is_none_or(|p| PROTOCOLS.contains(&p));
                    let ua_ok = login.user_agent.as_ref().is_none_or(|ua| ua["sdk"]["type"].is_string() && ua["sdk"]["version"].is_string());
                    prop_assert_eq!(login.check_client().is_ok(), protocol_ok && ua_ok);
                }
                Err(e) => prop_assert!(e.starts_with("login: "), "{}", e),
            }
        }

        #[test]
        fn text_bodies_parse_or_explain(args in args()) {
            match parse::<Text>("text", &args) {
                Ok(t) => {
                    let expected = match (&t.to, &t.message) {
                        (Value::String(to), Value::String(m)) if !to.is_empty() && m.chars().count() <= MAX_TEXT_CHARS => Some((to.clone(), m.clone())),
                        _ => None,
                    };
                    let got = t.checked();
                    prop_assert_eq!(got.as_ref().ok(), expected.as_ref(), "{:?}", got);
                }
                Err(e) => prop_assert!(e.starts_with("text: "), "{}", e),
            }
        }
    }
}
