//! Headers a route injects into its upstream requests (`headers = { Authorization =
//! "Bearer ${UPSTREAM_TOKEN}" }`). Their values are secrets: the type's `Debug` and its
//! status view show names only, and the values are marked sensitive (never indexed by
//! HPACK on an HTTP/2 upstream).

use std::fmt;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The injected headers of one route.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct InjectedHeaders {
    entries: Vec<(HeaderName, HeaderValue)>,
}

impl InjectedHeaders {
    pub(super) fn new(entries: Vec<(HeaderName, HeaderValue)>) -> Self {
        InjectedHeaders { entries }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The injected names (lower case): a client's own fields of these names are dropped.
    pub fn names(&self) -> impl ExactSizeIterator<Item = &HeaderName> {
        self.entries.iter().map(|(n, _)| n)
    }

    /// Drops the client's copies of the injected fields from `headers`, then adds ours.
    /// Call it last when building the upstream request (after hop-by-hop stripping and
    /// `X-Forwarded-*`), so an injected value is what the upstream sees.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.entries {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// Names only: `InjectedHeaders { authorization: <redacted> }`.
impl fmt::Debug for InjectedHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (name, _) in &self.entries {
            m.entry(&name.as_str(), &format_args!("<redacted>"));
        }
        m.finish()
    }
}

/// Fields that describe a connection or the message's framing, set by the proxy itself:
/// an injected copy would be stripped, contradict the body, or break the upstream `Host`.
const REFUSED: [HeaderName; 12] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HOST,
    header::CONTENT_LENGTH,
    HeaderName::from_static("http2-settings"),
];

/// Parses an injected header's name.
pub(super) fn header_name(raw: &str) -> Result<HeaderName, String> {
    let name = HeaderName::from_bytes(raw.as_bytes())
        .map_err(|_| "is not a valid header name".to_string())?;
    if REFUSED.contains(&name) {
        return Err(
            "is a hop-by-hop or framing header the proxy sets itself; it cannot be injected".into(),
        );
    }
    Ok(name)
}

/// Expands `${VAR}` from `env` in an injected header's value and checks the result. `$${`
/// stands for a literal `${`; a `$` not followed by `{` is literal. Errors never quote the
/// value (it may hold a secret), only variable names.
pub(super) fn header_value(
    raw: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<HeaderValue, String> {
    let expanded = expand(raw, env)?;
    let mut value = HeaderValue::from_str(&expanded).map_err(|_| {
        if raw.contains("${") {
            "is not a valid header value after ${VAR} expansion (control characters?)"
        } else {
            "is not a valid header value (control characters?)"
        }
        .to_string()
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// `${NAME}` (`NAME`: letters, digits, `_`, not starting with a digit) replaced by `env`'s
/// value. A variable that is unset, or set but empty, is an error.
fn expand(raw: &str, env: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(escaped) = after.strip_prefix("${") {
            out.push_str("${");
            rest = escaped;
        } else if let Some(var) = after.strip_prefix('{') {
            let Some(end) = var.find('}') else {
                return Err("has `${` without a closing `}`".into());
            };
            let name = &var[..end];
            let valid = name.chars().next().is_some_and(|c| !c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!(
                    "`${{{}}}` is not a variable reference (letters, digits and `_`; `$${{` for a literal `${{`)",
                    name.escape_debug()
                ));
            }
            match env(name) {
                Some(v) if !v.is_empty() => out.push_str(&v),
                Some(_) => return Err(format!("environment variable `{name}` is empty")),
                None => return Err(format!("environment variable `{name}` is not set")),
            }
            rest = &var[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "TOKEN" => Some("s3cr3t".into()),
            "EMPTY" => Some(String::new()),
            "NL" => Some("a\nb".into()),
            _ => None,
        }
    }

    #[test]
    fn expands_variables_and_escapes() {
        assert_eq!(expand("Bearer ${TOKEN}", &env).unwrap(), "Bearer s3cr3t");
        assert_eq!(expand("${TOKEN}${TOKEN}", &env).unwrap(), "s3cr3ts3cr3t");
        assert_eq!(expand("$${TOKEN} $5 a$", &env).unwrap(), "${TOKEN} $5 a$");
        assert_eq!(expand("plain", &env).unwrap(), "plain");
    }

    #[test]
    fn expansion_errors_name_the_variable_never_the_value() {
        let e = expand("Bearer ${MISSING}", &env).unwrap_err();
        assert!(e.contains("`MISSING` is not set"), "{e}");
        let e = expand("${EMPTY}", &env).unwrap_err();
        assert!(e.contains("`EMPTY` is empty"), "{e}");
        let e = expand("${TOKEN", &env).unwrap_err();
        assert!(e.contains("without a closing"), "{e}");
        let e = expand("${1X}", &env).unwrap_err();
        assert!(e.contains("not a variable reference"), "{e}");
        let e = header_value("x ${NL}", &env).unwrap_err();
        assert!(
            !e.contains("a\nb") && e.contains("after ${VAR} expansion"),
            "{e}"
        );
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(header_name("X-Api-Key").unwrap(), "x-api-key");
        assert!(header_name("bad name").is_err());
        for refused in [
            "Connection",
            "transfer-encoding",
            "Host",
            "Content-Length",
            "TE",
        ] {
            let e = header_name(refused).unwrap_err();
            assert!(e.contains("hop-by-hop"), "{refused}: {e}");
        }
    }

    #[test]
    fn values_are_sensitive_and_debug_redacts_them() {
        let v = header_value("Bearer ${TOKEN}", &env).unwrap();
        assert!(v.is_sensitive());
        let h = InjectedHeaders::new(vec![(header::AUTHORIZATION, v)]);
        let shown = format!("{h:?}");
        assert_eq!(shown, "{\"authorization\": <redacted>}");
        assert!(!shown.contains("s3cr3t"));
    }

    #[test]
    fn apply_replaces_the_clients_copies() {
        let h = InjectedHeaders::new(vec![(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer ours"),
        )]);
        let mut headers = HeaderMap::new();
        headers.append(header::AUTHORIZATION, HeaderValue::from_static("theirs"));
        headers.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("theirs too"),
        );
        headers.append(header::ACCEPT, HeaderValue::from_static("*/*"));
        h.apply(&mut headers);
        let auth: Vec<_> = headers.get_all(header::AUTHORIZATION).iter().collect();
        assert_eq!(auth, ["Bearer ours"]);
        assert_eq!(headers[header::ACCEPT], "*/*");
        assert_eq!(
            h.names().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["authorization"]
        );
    }
}
