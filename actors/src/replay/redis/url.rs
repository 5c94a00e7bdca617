//! Where the Redis is and how to reach it ([`RedisTarget`]: the URL and, for `rediss://`, the
//! TLS files), and keeping the password and the private key out of errors and logs.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use redis::{Client, ClientTlsConfig, ConnectionAddr, TlsCertificates};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The TLS files of a `rediss://` connection, PEM: the CA that signed the server's certificate
/// (`replay.tls_ca`; None: the system's trusted roots) and a client certificate and its private
/// key for mutual TLS (`replay.tls_cert`, `replay.tls_key`: both or neither). `Debug` leaves the
/// key's path out; the key's content is read only to hand it to rustls, never into a message.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key.as_ref().map(|_| "***"))
            .finish()
    }
}

impl RedisTls {
    fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }

    /// The files read and parsed for redis-rs; errors name the key (never the key file's path
    /// or content).
    fn certificates(&self) -> Result<TlsCertificates, String> {
        let root_cert = match &self.ca {
            Some(p) => {
                let pem = read_pem("replay.tls_ca", p, true)?;
                if CertificateDer::pem_slice_iter(&pem).next().is_none() {
                    return Err(format!(
                        "replay.tls_ca {}: no PEM certificate in it",
                        p.display()
                    ));
                }
                Some(pem)
            }
            None => None,
        };
        let client_tls = match (&self.cert, &self.key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let client_cert = read_pem("replay.tls_cert", cert, true)?;
                if CertificateDer::pem_slice_iter(&client_cert)
                    .next()
                    .is_none()
                {
                    return Err(format!(
                        "replay.tls_cert {}: no PEM certificate in it",
                        cert.display()
                    ));
                }
                let client_key = read_pem("replay.tls_key", key, false)?;
                if PrivateKeyDer::from_pem_slice(&client_key).is_err() {
                    return Err("replay.tls_key: the file holds no PEM private key".to_owned());
                }
                Some(ClientTlsConfig {
                    client_cert,
                    client_key,
                })
            }
            _ => {
                return Err(
                    "replay.tls_cert and replay.tls_key: mutual TLS needs both (or neither)"
                        .to_owned(),
                )
            }
        };
        Ok(TlsCertificates {
            client_tls,
            root_cert,
        })
    }
}

/// The bytes of the TLS file `path` (config key `key`); `named`: whether errors may show the path
/// (not for the private key).
fn read_pem(key: &str, path: &Path, named: bool) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| {
        if named {
            format!("{key} {}: cannot read: {e}", path.display())
        } else {
            format!("{key}: cannot read the file: {e}")
        }
    })
}

/// A Redis to connect to: its URL (`redis://`, `rediss://` for TLS, `redis+unix://`) and, for
/// `rediss://`, the TLS files. `Debug` and [`redacted`](Self::redacted) hide the password and the
/// key. A plain `&str` / `String` URL converts into one without TLS files (a `rediss://` URL then
/// trusts the system's roots).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RedisTarget {
    pub url: String,
    pub tls: RedisTls,
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTarget")
            .field("url", &redact(&self.url))
            .field("tls", &self.tls)
            .finish()
    }
}

impl From<&str> for RedisTarget {
    fn from(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            tls: RedisTls::default(),
        }
    }
}

impl From<String> for RedisTarget {
    fn from(url: String) -> Self {
        Self {
            url,
            tls: RedisTls::default(),
        }
    }
}

impl From<&String> for RedisTarget {
    fn from(url: &String) -> Self {
        url.as_str().into()
    }
}

impl From<&RedisTarget> for RedisTarget {
    fn from(t: &RedisTarget) -> Self {
        t.clone()
    }
}

impl RedisTarget {
    pub fn new(url: impl Into<String>, tls: RedisTls) -> Self {
        Self {
            url: url.into(),
            tls,
        }
    }

    /// The URL with its password replaced by `***` (see [`redact`]).
    pub fn redacted(&self) -> String {
        redact(&self.url)
    }

    /// `host:port` when the Redis is neither on a loopback address nor a unix socket (None
    /// otherwise, and for a URL that does not parse: connecting reports that).
    pub fn remote_addr(&self) -> Option<String> {
        let client = Client::open(self.url.as_str()).ok()?;
        let addr = client.get_connection_info().addr();
        let host = match addr {
            ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } => host,
            _ => return None,
        };
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let loopback = bare.eq_ignore_ascii_case("localhost")
            || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        (!loopback).then(|| addr.to_string())
    }

    /// Whether the URL asks for TLS (`rediss://`).
    pub fn is_tls(&self) -> bool {
        self.url
            .trim_start()
            .to_ascii_lowercase()
            .starts_with("rediss://")
    }

    /// A hint for error `e` of a connection attempt: a plain `redis://` URL on a port that speaks
    /// only TLS shows as the server resetting the connection; an unknown CA and a missing client
    /// certificate name the keys that fix them.
    pub(super) fn connect_hint(&self, e: &redis::RedisError) -> &'static str {
        let tcp = matches!(
            Client::open(self.url.as_str()).map(|c| c.get_connection_info().addr().clone()),
            Ok(ConnectionAddr::Tcp(..))
        );
        let reset = e.is_connection_dropped()
            || e.kind() == redis::ErrorKind::Io && !e.is_connection_refusal() && !e.is_timeout();
        let text = e.to_string();
        if tcp && reset {
            " (if that port speaks TLS, use a rediss:// URL)"
        } else if text.contains("UnknownIssuer") {
            " (replay.tls_ca or TILT_REDIS_CA names the CA that signed the server's certificate)"
        } else if text.contains("CertificateRequired") {
            " (the server wants a client certificate: replay.tls_cert and replay.tls_key)"
        } else {
            ""
        }
    }

    /// Strings that must not appear in messages: the password as written in the URL and as
    /// decoded.
    pub(super) fn secrets(&self) -> Vec<String> {
        let mut secrets: Vec<String> = password_ranges(&self.url)
            .into_iter()
            .map(|(a, b)| self.url[a..b].to_owned())
            .collect();
        if let Ok(c) = Client::open(self.url.as_str()) {
            secrets.extend(
                c.get_connection_info()
                    .redis_settings()
                    .password()
                    .map(str::to_owned),
            );
        }
        secrets
    }

    /// The redis-rs client: the URL parsed and, for `rediss://` with TLS files, the files read
    /// (at each call: each flag call reads them afresh; a replay reads them once, when it
    /// connects, and its reconnections reuse them). The error is one line naming the redacted
    /// URL or the config key, never the password or the key.
    pub(super) fn client(&self) -> Result<Client, String> {
        let secrets = self.secrets();
        let bad_url = |e: redis::RedisError| {
            format!(
                "redis url {}: {}",
                redact(&self.url),
                scrub(e.to_string(), &secrets)
            )
        };
        let client = Client::open(self.url.as_str()).map_err(bad_url)?;
        if self.tls.is_empty() {
            return Ok(client);
        }
        if !matches!(
            client.get_connection_info().addr(),
            ConnectionAddr::TcpTls { .. }
        ) {
            return Err(format!(
                "redis url {}: replay.tls_ca / tls_cert / tls_key are set, but the URL is not \
                 rediss:// (TLS)",
                redact(&self.url)
            ));
        }
        let certs = self.tls.certificates()?;
        Client::build_with_tls(self.url.as_str(), certs).map_err(bad_url)
    }
}

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
            // TLS with an ACL user.
            (
                "rediss://tilt:s3cr%40t@redis.example:6380/0",
                "rediss://tilt:***@redis.example:6380/0",
            ),
            ("rediss://tilt@h:6380/0", "rediss://tilt@h:6380/0"),
        ];
        for (url, want) in cases {
            assert_eq!(redact(url), want, "{url}");
        }
    }

    fn tls(ca: &str, cert: &str, key: &str) -> RedisTls {
        let p = |s: &str| (!s.is_empty()).then(|| PathBuf::from(s));
        RedisTls {
            ca: p(ca),
            cert: p(cert),
            key: p(key),
        }
    }

    #[test]
    fn debug_hides_the_password_and_the_key_path() {
        let t = RedisTarget::new(
            "rediss://tilt:hunter2@10.0.0.5:6380/0",
            tls("/etc/ca.pem", "/etc/c.pem", "/secret/dir/c.key"),
        );
        let d = format!("{t:?}");
        assert!(d.contains("rediss://tilt:***@10.0.0.5:6380/0"), "{d}");
        assert!(d.contains("/etc/ca.pem"), "{d}");
        assert!(!d.contains("hunter2") && !d.contains("/secret/dir"), "{d}");
        assert_eq!(t.redacted(), "rediss://tilt:***@10.0.0.5:6380/0");
        assert!(t.is_tls());
        assert_eq!(t.remote_addr().as_deref(), Some("10.0.0.5:6380"));
    }

    #[test]
    fn loopback_and_sockets_are_not_remote() {
        for url in [
            "redis://127.0.0.1:6379/",
            "rediss://localhost:6380/",
            "redis://[::1]:6379/",
            "redis+unix:///tmp/r.sock",
        ] {
            assert_eq!(RedisTarget::from(url).remote_addr(), None, "{url}");
        }
        assert_eq!(
            RedisTarget::from("redis://redis.internal:6379/").remote_addr(),
            Some("redis.internal:6379".to_owned())
        );
    }

    #[test]
    fn tls_files_errors_name_the_key_never_the_password_or_key_file() {
        let dir = std::env::temp_dir().join(format!("tilt-url-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello\n").unwrap();
        let not_pem = not_pem.to_str().unwrap();
        let missing = "/nonexistent/tilt/secret-key.pem";
        let url = "rediss://tilt:hunter2@127.0.0.1:6380/0";
        let cases = [
            // Files for TLS, a URL without it: said, not ignored.
            (
                "redis://:hunter2@127.0.0.1:6379/0",
                tls(not_pem, "", ""),
                "is not rediss://",
            ),
            (
                url,
                tls("/nonexistent/ca.pem", "", ""),
                "replay.tls_ca /nonexistent/ca.pem: cannot read",
            ),
            (url, tls(not_pem, "", ""), "replay.tls_ca"),
            (url, tls("", not_pem, ""), "mutual TLS needs both"),
            (url, tls("", not_pem, missing), "replay.tls_cert"),
            (url, tls("", "", missing), "mutual TLS needs both"),
        ];
        for (url, tls, want) in cases {
            let Err(e) = RedisTarget::new(url, tls.clone()).client() else {
                panic!("{url} {tls:?}: a client was built");
            };
            assert!(e.contains(want), "{tls:?}: {e}");
            assert!(!e.contains("hunter2") && !e.contains("secret-key"), "{e}");
        }
        // A real certificate (this test's own CA is not needed: any PEM certificate parses) with
        // a key file that is missing or not a key: the error names replay.tls_key, not the file.
        let cert = dir.join("cert.pem");
        let o = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args([
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=t",
            ])
            .arg("-keyout")
            .arg(dir.join("k.pem"))
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("the TLS tests need the `openssl` command (apt-get install openssl)");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let cert = cert.to_str().unwrap();
        for key in [missing, not_pem] {
            let e = RedisTarget::new(url, tls(cert, cert, key))
                .client()
                .unwrap_err();
            assert!(e.starts_with("replay.tls_key: "), "{e}");
            assert!(!e.contains(key), "{e}");
        }
        let key = dir.join("k.pem");
        let t = RedisTarget::new(url, tls(cert, cert, key.to_str().unwrap()));
        assert!(t.client().is_ok());
        std::fs::remove_dir_all(&dir).ok();
    }
}
