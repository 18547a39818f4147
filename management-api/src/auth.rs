//! Authentication of management API callers: `Authorization: Bearer <service key>` for
//! curl and the CLI, and OWT's MAuth HMAC scheme for OWT server-side code. Secrets and
//! signatures are compared in constant time.

use tessera_core::crypto::{constant_time_eq, mauth_signature};

use crate::error::ApiError;

/// How far an MAuth timestamp may be from our clock. OWT did not check it at all; a
/// window bounds how long a captured header can be replayed.
const MAUTH_WINDOW_MS: i64 = 15 * 60 * 1000;

/// The service credentials requests are checked against.
#[derive(Clone)]
pub struct Credentials {
    /// Service id expected in `mauth_serviceid`.
    pub service_id: String,
    /// The service key.
    pub service_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials {{ service_id: {:?}, service_key: <hidden> }}", self.service_id)
    }
}

/// Who called, as far as the credentials say: MAuth may carry a user and role that
/// token creation uses when the body names none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// `mauth_username`, base64-decoded.
    pub user: Option<String>,
    /// `mauth_role`.
    pub role: Option<String>,
}

impl Credentials {
    /// Checks an `Authorization` header value at `now_ms`.
    pub fn check(&self, header: Option<&str>, now_ms: i64) -> Result<Caller, ApiError> {
        let header = header.ok_or_else(|| ApiError::Unauthorized("Missing Authorization header (Bearer <service key> or MAuth)".into()))?;
        let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
        if scheme.eq_ignore_ascii_case("bearer") {
            if constant_time_eq(rest.trim().as_bytes(), self.service_key.as_bytes()) {
                return Ok(Caller::default());
            }
            return Err(ApiError::Unauthorized("Invalid service key".into()));
        }
        if scheme.eq_ignore_ascii_case("mauth") {
            return self.check_mauth(rest, now_ms);
        }
        Err(ApiError::Unauthorized(format!("Unsupported authorization scheme `{scheme}`")))
    }

    fn check_mauth(&self, params: &str, now_ms: i64) -> Result<Caller, ApiError> {
        let mut fields = std::collections::HashMap::new();
        for item in params.split(',') {
            let Some((k, v)) = item.split_once('=') else { continue };
            let k = k.trim();
            let k = k.strip_prefix("mauth_").unwrap_or(k);
            fields.insert(k.to_string(), v.trim().trim_matches('"').to_string());
        }
        let get = |k: &str| fields.get(k).map(String::as_str);
        let bad = |m: &str| ApiError::Unauthorized(format!("MAuth: {m}"));
        if get("signature_method") != Some("HMAC_SHA256") {
            return Err(bad("signature_method must be HMAC_SHA256"));
        }
        let service = get("serviceid").ok_or_else(|| bad("mauth_serviceid missing"))?;
        let timestamp = get("timestamp").ok_or_else(|| bad("mauth_timestamp missing"))?;
        let cnonce = get("cnonce").ok_or_else(|| bad("mauth_cnonce missing"))?;
        let signature = get("signature").ok_or_else(|| bad("mauth_signature missing"))?;
        let ts: i64 = timestamp.parse().map_err(|_| bad("mauth_timestamp is not a number"))?;
        if (ts - now_ms).abs() > MAUTH_WINDOW_MS {
            return Err(bad("mauth_timestamp is too far from the server clock"));
        }
        let user_role = match (get("username"), get("role")) {
            (Some(u), Some(r)) => Some((u, r)),
            _ => None,
        };
        let expected = mauth_signature(&self.service_key, timestamp, cnonce, user_role);
        // Both comparisons always run so timing does not tell which one failed.
        let id_ok = constant_time_eq(service.as_bytes(), self.service_id.as_bytes());
        let sig_ok = constant_time_eq(signature.as_bytes(), expected.as_bytes());
        if !(id_ok & sig_ok) {
            return Err(bad("invalid service id or signature"));
        }
        let user = user_role.and_then(|(u, _)| {
            use base64::Engine;
            let raw = base64::engine::general_purpose::STANDARD.decode(u).ok()?;
            String::from_utf8(raw).ok()
        });
        Ok(Caller { user, role: user_role.map(|(_, r)| r.to_string()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        Credentials { service_id: "svc".into(), service_key: "0123456789abcdef".into() }
    }

    fn mauth(id: &str, key: &str, ts: i64, user_role: Option<(&str, &str)>) -> String {
        let sig = mauth_signature(key, &ts.to_string(), "42", user_role);
        let mut h = format!(
            "MAuth realm=http://marte3.dit.upm.es,mauth_signature_method=HMAC_SHA256,mauth_serviceid={id},mauth_cnonce=42,mauth_timestamp={ts}"
        );
        if let Some((u, r)) = user_role {
            h.push_str(&format!(",mauth_username={u},mauth_role={r}"));
        }
        h.push_str(&format!(",mauth_signature={sig}"));
        h
    }

    #[test]
    fn bearer() {
        assert!(creds().check(Some("Bearer 0123456789abcdef"), 0).is_ok());
        assert!(creds().check(Some("Bearer nope"), 0).is_err());
        assert!(creds().check(None, 0).is_err());
        assert!(creds().check(Some("Basic abc"), 0).is_err());
    }

    #[test]
    fn mauth_ok_and_failures() {
        let now = 1_700_000_000_000;
        assert_eq!(creds().check(Some(&mauth("svc", "0123456789abcdef", now, None)), now).unwrap(), Caller::default());
        assert!(creds().check(Some(&mauth("svc", "wrong-key-000000", now, None)), now).is_err());
        assert!(creds().check(Some(&mauth("other", "0123456789abcdef", now, None)), now).is_err());
        assert!(creds().check(Some(&mauth("svc", "0123456789abcdef", now - 3_600_000, None)), now).is_err());
        // user/role variant: username is base64 and signed in that form; "=" padding survives.
        let h = mauth("svc", "0123456789abcdef", now, Some(("Ym9i", "viewer")));
        let c = creds().check(Some(&h), now).unwrap();
        assert_eq!(c.user.as_deref(), Some("bob"));
        assert_eq!(c.role.as_deref(), Some("viewer"));
        let h = mauth("svc", "0123456789abcdef", now, Some(("YWw=", "viewer")));
        assert_eq!(creds().check(Some(&h), now).unwrap().user.as_deref(), Some("al"));
    }
}
