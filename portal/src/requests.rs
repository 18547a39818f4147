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

