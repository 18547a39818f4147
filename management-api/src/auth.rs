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
        if ts.abs_diff(now_ms) > MAUTH_WINDOW_MS.unsigned_abs() {
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

    #[test]
    fn extreme_timestamps_are_refused_not_overflowed() {
        // `ts - now` overflowed here (a panic in debug builds) before the signature was checked.
        let now = 1_700_000_000_000;
        for ts in [i64::MIN, i64::MAX, -now] {
            let e = creds().check(Some(&mauth("svc", "0123456789abcdef", ts, None)), now).unwrap_err();
            assert!(e.to_string().contains("too far"), "{e}");
        }
    }
}

/// Property tests: no `Authorization` header makes `check` panic or let in a caller
/// without the key, every correctly signed MAuth header gets in with its user and role,
/// and an altered one never gets in as someone else.
#[cfg(test)]
mod proptests {
    use super::*;
    use base64::Engine;
    use proptest::prelude::*;

    const KEY: &str = "0123456789abcdef-service-key";
    const NOW: i64 = 1_700_000_000_000;

    fn creds() -> Credentials {
        Credentials { service_id: "svc".into(), service_key: KEY.into() }
    }

    fn text(max: usize) -> impl Strategy<Value = String> {
        prop::collection::vec(any::<char>(), 0..max).prop_map(String::from_iter)
    }

    fn header(ts: i64, cnonce: &str, user_role: Option<(&str, &str)>) -> String {
        let sig = mauth_signature(KEY, &ts.to_string(), cnonce, user_role);
        let mut h =
            format!("MAuth realm=http://example,mauth_signature_method=HMAC_SHA256,mauth_serviceid=svc,mauth_cnonce={cnonce},mauth_timestamp={ts}");
        if let Some((u, r)) = user_role {
            h.push_str(&format!(",mauth_username={u},mauth_role={r}"));
        }
        h.push_str(&format!(",mauth_signature={sig}"));
        h
    }

    /// A signed header for an optional (user, role), and the caller it stands for.
    fn signed() -> impl Strategy<Value = (String, Caller)> {
        let who = prop::option::of((text(16), "[a-z_]{1,12}"));
        (-MAUTH_WINDOW_MS..=MAUTH_WINDOW_MS, "[A-Za-z0-9]{1,12}", who).prop_map(|(skew, cnonce, who)| match who {
            Some((user, role)) => {
                let b64 = base64::engine::general_purpose::STANDARD.encode(&user);
                (header(NOW + skew, &cnonce, Some((&b64, &role))), Caller { user: Some(user), role: Some(role) })
            }
            None => (header(NOW + skew, &cnonce, None), Caller::default()),
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_headers_are_refused(h in prop_oneof![
            text(60),
            "(MAuth|mauth|Bearer|bearer|Basic)? ?((mauth_)?(signature_method|serviceid|cnonce|timestamp|username|role|signature)=[A-Za-z0-9+/=\"_-]{0,12},?){0,7}",
        ], now in prop_oneof![Just(NOW), any::<i64>()]) {
            prop_assert!(creds().check(Some(&h), now).is_err(), "{:?} got in", h);
        }

        #[test]
        fn signed_headers_get_in_as_signed((h, caller) in signed()) {
            prop_assert_eq!(creds().check(Some(&h), NOW).ok(), Some(caller));
            let other = Credentials { service_id: "other".into(), ..creds() }.check(Some(&h), NOW).map(|_| ()).map_err(|e| e.to_string());
            prop_assert_eq!(other, Err("MAuth: invalid service id or signature".to_string()));
        }

        #[test]
        fn late_headers_are_refused((h, _) in signed(), late in 2 * MAUTH_WINDOW_MS + 1..i64::MAX / 2, past in any::<bool>()) {
            let now = if past { NOW - late } else { NOW + late };
            let e = creds().check(Some(&h), now).unwrap_err();
            prop_assert!(e.to_string().contains("too far"), "{}", e);
        }

        #[test]
        fn altered_headers_never_get_in_as_someone_else((h, caller) in signed(), at in any::<prop::sample::Index>(), with in any::<char>(), delete in any::<bool>()) {
            let mut chars: Vec<char> = h.chars().collect();
            let i = at.index(chars.len());
            if delete { chars.remove(i); } else { chars[i] = with; }
            let altered: String = chars.into_iter().collect();
            if let Ok(got) = creds().check(Some(&altered), NOW) {
                prop_assert_eq!(got, caller, "{:?} got in as someone else", altered);
            }
        }

        #[test]
        fn bearer_needs_the_exact_key(key in text(40), pad in "[ \t]{0,2}") {
            let h = format!("Bearer {pad}{key}{pad}");
            let ok = creds().check(Some(&h), NOW).is_ok();
            prop_assert_eq!(ok, key.trim() == KEY);
            prop_assert_eq!(creds().check(Some(&format!("Bearer {pad}{KEY}{pad}")), NOW).ok(), Some(Caller::default()));
        }
    }
}
