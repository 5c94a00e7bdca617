//! Redis over TLS with an ACL user, on a redis-server the test starts itself (TLS only, a
//! self-signed CA made with `openssl`, the `default` user off): a run on the Redis backend
//! finishes over `rediss://` with mutual TLS, and the password and the private key appear in
//! none of its output, progress log or saved config; a wrong password, a plain `redis://` URL on
//! the TLS port, a CA the client does not know and a missing client certificate each fail with
//! one clear line.

mod common;
use common::redis_server::TlsRedisServer;
use common::*;

use std::path::Path;
use std::process::{Command, Output};

const USER: &str = "tilt-acl";
const PASSWORD: &str = "tls-pass-8c41e7";

/// `tilt` without any TILT_REDIS_* from the caller's environment.
fn tilt_clean(args: &[&str]) -> Command {
    let mut c = tilt_cmd(args);
    for v in ["TILT_REDIS_CA", "TILT_REDIS_CERT", "TILT_REDIS_KEY"] {
        c.env_remove(v);
    }
    c
}

fn run(c: &mut Command) -> Output {
    c.output().expect("tilt binary runs")
}

/// The base64 lines of a PEM file (what would show if its content leaked).
fn pem_body(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_run_over_tls_with_an_acl_user_finishes_without_showing_the_password_or_key() {
    let redis = TlsRedisServer::start(USER, PASSWORD, true);
    let d = scratch("redis-tls-run");
    let out = d.join("run");
    let url = format!("replay.url={}", redis.url());
    let cert = format!("replay.tls_cert={}", redis.tls.client_cert.display());
    let key = format!("replay.tls_key={}", redis.tls.client_key.display());
    // The URL (with the password) and the client certificate through the config, the CA
    // through the environment.
    let o = run(tilt_clean(&[
        "run",
        "configs/smoke.toml",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "replay.backend=redis",
        "--set",
        "name=redis-tls-test",
        "--set",
        &url,
        "--set",
        &cert,
        "--set",
        &key,
    ])
    .env("TILT_REDIS_CA", &redis.tls.ca));
    let e = err(&o);
    assert!(
        o.status.success(),
        "{e}\nredis-server log:\n{}",
        redis.log()
    );
    let s = json(&out.join("summary.json"));
    assert_eq!(s["steps"], 60, "{s}");
    let a = accounting(&s);
    assert_eq!(a["applications"], 60 * 64, "{a}");
    assert_eq!(
        redis.keys("tilt:*"),
        Vec::<String>::new(),
        "the run's Redis keys must be removed"
    );

    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        config.contains(&format!("rediss://{USER}:***@127.0.0.1:{}/0", redis.port())),
        "{config}"
    );
    let texts = [
        ("stderr", e.clone()),
        ("stdout", String::from_utf8_lossy(&o.stdout).into_owned()),
        (
            "progress.log",
            std::fs::read_to_string(out.join("progress.log")).unwrap(),
        ),
        ("config.toml", config),
    ];
    let key_body = pem_body(&redis.tls.client_key);
    assert!(!key_body.is_empty());
    for (name, text) in &texts {
        assert!(
            !text.contains(PASSWORD),
            "the password is in {name}:\n{text}"
        );
        for line in &key_body {
            assert!(!text.contains(line.as_str()), "the key is in {name}");
        }
    }
}

/// `tilt run` of the smoke config on the Redis backend at `url` with the TLS files `sets`: it
/// must fail with exit 1 and one error line that names the server's address, contains each of
/// `want`, and not the password `secret`; nothing is trained.
fn refused(
    case: &str,
    redis: &TlsRedisServer,
    url: &str,
    sets: &[String],
    want: &[&str],
    secret: &str,
) {
    let d = scratch(&format!("redis-tls-{case}"));
    let out = d.join("run");
    let url = format!("replay.url={url}");
    let mut args = vec![
        "run",
        "configs/smoke.toml",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "replay.backend=redis",
        "--set",
        &url,
    ];
    for s in sets {
        args.extend(["--set", s.as_str()]);
    }
    let o = run(&mut tilt_clean(&args));
    let e = err(&o);
    assert_eq!(o.status.code(), Some(1), "{case}: {e}");
    let errors: Vec<&str> = e.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{case}: {e}");
    let addr = format!("127.0.0.1:{}", redis.port());
    assert!(
        errors[0].contains(&addr),
        "{case}: the error should name {addr}: {e}"
    );
    for w in want {
        assert!(
            errors[0].contains(w),
            "{case}: the error should say {w:?}: {e}"
        );
    }
    assert!(!e.contains(secret), "{case}: the password leaked: {e}");
    assert!(!e.contains("panicked"), "{case}: {e}");
    assert!(
        !out.join("summary.json").exists() && !out.join("critic.json").exists(),
        "{case}: no work before Redis answers"
    );
}

#[test]
fn bad_credentials_and_wrong_tls_settings_are_one_clear_line_each() {
    let redis = TlsRedisServer::start(USER, PASSWORD, true);
    let tls = &redis.tls;
    let ca = format!("replay.tls_ca={}", tls.ca.display());
    let cert = format!("replay.tls_cert={}", tls.client_cert.display());
    let key = format!("replay.tls_key={}", tls.client_key.display());
    let all = [ca.clone(), cert.clone(), key.clone()];
    let wrong = "not-the-password-5d1c";
    // redis-rs' words for Redis' WRONGPASS reply to AUTH.
    refused(
        "wrong-password",
        &redis,
        &redis.url_as(USER, wrong),
        &all,
        &["authentication failed"],
        wrong,
    );
    // The default user is off: a URL without a user cannot log in either.
    refused(
        "no-user",
        &redis,
        &format!("rediss://:{PASSWORD}@127.0.0.1:{}/0", redis.port()),
        &all,
        &[],
        PASSWORD,
    );
    // Plain TCP on the TLS port: the server drops the connection.
    refused(
        "plain-on-tls-port",
        &redis,
        &format!("redis://{USER}:{PASSWORD}@127.0.0.1:{}/0", redis.port()),
        &[],
        &["rediss://"],
        PASSWORD,
    );
    // No CA: the system's roots do not know the test's CA.
    refused(
        "unknown-ca",
        &redis,
        &redis.url(),
        &[cert.clone(), key.clone()],
        &["UnknownIssuer", "replay.tls_ca"],
        PASSWORD,
    );
    // Mutual TLS required, no client certificate sent.
    refused(
        "no-client-cert",
        &redis,
        &redis.url(),
        &[ca],
        &["CertificateRequired", "replay.tls_cert"],
        PASSWORD,
    );
}

#[test]
fn a_redis_beyond_this_machine_is_stated_at_start() {
    // TEST-NET-1 (RFC 5737): nothing answers there, so the run fails to connect, after the log
    // has said where Redis is and that the URL is not encrypted.
    let d = scratch("redis-tls-remote");
    let out = d.join("run");
    let o = run(&mut tilt_clean(&[
        "run",
        "configs/smoke.toml",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "replay.backend=redis",
        "--set",
        "replay.url=redis://:remote-pass-2b@192.0.2.1:6379/0",
    ]));
    let e = err(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    let note = "tilt: note: Redis is beyond this machine (192.0.2.1:6379, plain TCP, not encrypted";
    assert!(e.contains(note), "{e}");
    let log = std::fs::read_to_string(out.join("progress.log")).unwrap();
    assert!(log.contains(note), "{log}");
    assert!(
        !e.contains("remote-pass-2b") && !log.contains("remote-pass-2b"),
        "{e}"
    );
}
