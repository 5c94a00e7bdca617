//! Keeping the Redis password out of errors and logs.

/// `url` with its password replaced by `***`, for errors and logs: the password of the userinfo
/// (`redis://user:pw@host`, `redis://:pw@host`) and `pass=` / `password=` query parameters
/// (the unix-socket form). Everything else is kept.
pub fn redact(url: &str) -> String {
    let mut secrets: Vec<(usize, usize)> = password_ranges(url);
    secrets.sort_unstable();
    let mut out = String::with_capacity(url.len());
    let mut at = 0;
    for (start, end) in secrets {
        if start < at {
            continue;
        }
        out.push_str(&url[at..start]);
        out.push_str("***");
        at = end;
    }
    out.push_str(&url[at..]);
    out
}

/// Byte ranges of `url` that hold a password.
pub(super) fn password_ranges(url: &str) -> Vec<(usize, usize)> {
    let body = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[body..];
    let mut ranges = Vec::new();
    // Userinfo: up to the last '@'. A ':' before any '/' separates user and password; the
    // password itself may hold any character ('@', '/', '?' unencoded included).
    if let Some(at) = rest.rfind('@') {
        let userinfo = &rest[..at];
        if let Some(colon) = userinfo.find(':') {
            if !userinfo[..colon].contains('/') && colon + 1 < at {
                ranges.push((body + colon + 1, body + at));
            }
        }
    }
    // Query parameters after the first '?' that is not inside the userinfo password.
    let query_from = ranges.first().map_or(body, |&(_, end)| end);
    if let Some(q) = url[query_from..].find('?') {
        let mut pos = query_from + q + 1;
        for param in url[pos..].split('&') {
            if let Some((name, value)) = param.split_once('=') {
                let name = name.to_ascii_lowercase();
                if (name == "pass" || name == "password") && !value.is_empty() {
                    let start = pos + param.len() - value.len();
                    ranges.push((start, start + value.len()));
                }
            }
            pos += param.len() + 1;
        }
    }
    ranges
}

pub(super) fn scrub(text: String, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .fold(text, |t, s| t.replace(s.as_str(), "***"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_passwords() {
        let cases = [
            (
                "redis://:hunter2@127.0.0.1:6379/0",
                "redis://:***@127.0.0.1:6379/0",
            ),
            ("redis://user:hunter2@host/1", "redis://user:***@host/1"),
            // Unencoded '@', '/', '?' inside the password.
            ("redis://:p@s/s?w@host:1", "redis://:***@host:1"),
            (
                "rediss://u:pw@h:6380?protocol=resp3",
                "rediss://u:***@h:6380?protocol=resp3",
            ),
            (
                "redis+unix:///tmp/r.sock?db=1&pass=hunter2",
                "redis+unix:///tmp/r.sock?db=1&pass=***",
            ),
            (
                "unix:///tmp/r.sock?password=x@y",
                "unix:///tmp/r.sock?password=***",
            ),
            // Nothing secret: unchanged.
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            ("redis://user@host", "redis://user@host"),
        ];
        for (url, want) in cases {
            assert_eq!(redact(url), want, "{url}");
        }
    }
}
