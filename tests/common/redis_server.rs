//! A redis-server of the test's own, so no test needs a Redis on 127.0.0.1:6379: a free loopback
//! port, no persistence unless asked (AOF, fsync always), SIGKILLed on drop. Std only: the
//! tilt-actors tests include this file by path (`#[path]`), and it is `tests/common`'s too.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What the tests say when redis-server is not installed.
pub const INSTALL_HINT: &str =
    "the Redis tests start their own redis-server, and none is on PATH: \
     install Redis (Debian/Ubuntu: `apt-get install redis-server`; macOS: `brew install redis`)";

/// How long a server may take to answer PING after it is started (an AOF replay included).
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Whether the server keeps its data across a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Nothing on disk: a restart comes back empty.
    None,
    /// Append-only file, fsync on every write: a restart (even after SIGKILL) keeps every
    /// acknowledged write.
    Aof,
}

/// A redis-server child process on 127.0.0.1:`port`, killed (and its directory removed) on drop.
pub struct RedisServer {
    program: String,
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    persistence: Persistence,
}

impl RedisServer {
    /// A server without persistence on a free port, answering PING.
    pub fn start() -> Self {
        Self::start_with(Persistence::None)
    }

    /// A server with this persistence on a free port, answering PING. Panics with
    /// [`INSTALL_HINT`] if redis-server is missing, or with its log if it does not come up.
    pub fn start_with(persistence: Persistence) -> Self {
        Self::start_program("redis-server", persistence)
    }

    /// [`start_with`](Self::start_with) with another redis-server binary (a path or a name on
    /// PATH).
    pub fn start_program(program: &str, persistence: Persistence) -> Self {
        let mut last = String::new();
        // Another process may take the free port between our probe and the server's bind: the
        // server then exits at once, and we try another port.
        for _ in 0..5 {
            let mut s = Self {
                program: program.to_owned(),
                child: None,
                port: free_port(),
                dir: scratch_dir(),
                persistence,
            };
            match s.spawn_and_wait() {
                Ok(()) => return s,
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start (5 tries): {last}");
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// SIGKILL: no shutdown, no final save (what a crash or a pre-empted node does).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port and directory (with AOF it replays its file), and wait
    /// until it answers PING. Panics if it does not.
    pub fn start_again(&mut self) {
        assert!(
            self.child.is_none(),
            "redis-server {} still runs",
            self.port
        );
        if let Err(e) = self.spawn_and_wait() {
            panic!(
                "redis-server did not start again on port {}: {e}",
                self.port
            );
        }
    }

    /// [`kill`](Self::kill), then [`start_again`](Self::start_again).
    pub fn restart(&mut self) {
        self.kill();
        self.start_again();
    }

    /// Whether it answers PING now.
    pub fn answers(&self) -> bool {
        ping(self.port).is_ok()
    }

    /// `redis-cli -p PORT ARGS...`: its stdout. Panics if redis-cli cannot run or fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let o = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("redis-cli: {e}; {INSTALL_HINT}"));
        assert!(
            o.status.success(),
            "redis-cli {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Keys matching `pattern` (SCAN, not KEYS).
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        self.cli(&["--scan", "--pattern", pattern])
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    fn log_file(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(&self.program);
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.log_file());
        match self.persistence {
            Persistence::None => cmd.args(["--appendonly", "no"]),
            Persistence::Aof => cmd.args(["--appendonly", "yes", "--appendfsync", "always"]),
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => INSTALL_HINT.to_owned(),
                _ => format!("cannot run redis-server: {e}"),
            });
        let child = match child {
            Ok(c) => c,
            // A missing binary is not worth four more tries.
            Err(e) if e == INSTALL_HINT => panic!("{e}"),
            Err(e) => return Err(e),
        };
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            if ping(self.port).is_ok() {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited ({status}); its log:\n{}",
                    self.port,
                    std::fs::read_to_string(self.log_file()).unwrap_or_default()
                ));
            }
            if t0.elapsed() > READY_TIMEOUT {
                self.kill();
                return Err(format!(
                    "redis-server on port {} did not answer PING within {READY_TIMEOUT:?}; its log:\n{}",
                    self.port,
                    std::fs::read_to_string(self.log_file()).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// PING over a raw connection; Ok once the reply is +PONG (not -LOADING during an AOF replay).
fn ping(port: u16) -> Result<(), String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"*1\r\n$4\r\nPING\r\n")
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).map_err(|e| e.to_string())?;
    let reply = String::from_utf8_lossy(&buf[..n]);
    if reply.starts_with("+PONG") {
        Ok(())
    } else {
        Err(reply.trim().to_owned())
    }
}

/// A port nothing listens on now (bound to port 0, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot bind a loopback port: {e}"))
}

/// A fresh directory for the server's files: on tmpfs when there is one (it survives the
/// server's SIGKILL like a disk would, and `appendfsync always` is cheap there).
fn scratch_dir() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let dir = base.join(format!(
        "tilt-redis-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// What the TLS tests say when the `openssl` command is missing.
pub const OPENSSL_HINT: &str = "the Redis TLS tests make their certificates with the `openssl` \
     command, and none is on PATH: install OpenSSL (Debian/Ubuntu: `apt-get install openssl`)";

/// Certificates for a TLS test server, made with the `openssl` command in a fresh directory
/// (removed on drop): a self-signed CA, a server certificate for 127.0.0.1 and localhost signed by
/// it, and a client certificate signed by it (for mutual TLS). EC P-256 keys, PKCS#8 PEM.
pub struct TlsFiles {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// Make them. Panics with [`OPENSSL_HINT`] if `openssl` is missing, or with its stderr.
    pub fn generate() -> Self {
        let dir = scratch_dir();
        let openssl = |args: &[&str]| {
            let o = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .unwrap_or_else(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => panic!("{OPENSSL_HINT}"),
                    _ => panic!("cannot run openssl: {e}"),
                });
            assert!(
                o.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca_args = vec!["req", "-x509", "-days", "2", "-subj", "/CN=tilt test CA"];
        ca_args.extend(ec);
        ca_args.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
        openssl(&ca_args);
        for (name, cn, ext) in [
            (
                "server",
                "/CN=localhost",
                "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
            ),
            ("client", "/CN=tilt", "extendedKeyUsage=clientAuth\n"),
        ] {
            let (key, csr, pem, cnf) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.cnf"),
            );
            let mut req = vec!["req", "-subj", cn];
            req.extend(ec);
            req.extend(["-keyout", &key, "-out", &csr]);
            openssl(&req);
            std::fs::write(dir.join(&cnf), ext).unwrap();
            openssl(&[
                "x509",
                "-req",
                "-days",
                "2",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-extfile",
                &cnf,
                "-out",
                &pem,
            ]);
        }
        Self {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            dir,
        }
    }
}

impl Drop for TlsFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A redis-server on 127.0.0.1 that speaks only TLS (`--port 0 --tls-port PORT`, certificates
/// from [`TlsFiles`]), with one ACL user (`user`, `password`, all commands and keys) and the
/// `default` user off, so every client must authenticate as that user. With `mutual`, clients
/// must also present a certificate signed by the CA (`--tls-auth-clients yes`). No persistence;
/// SIGKILLed on drop.
pub struct TlsRedisServer {
    pub tls: TlsFiles,
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    user: String,
    password: String,
}

impl TlsRedisServer {
    /// Start it on a free port and wait until it answers PING over TLS as `user`. Panics with
    /// [`INSTALL_HINT`] if redis-server is missing, or with its log if it does not come up (a
    /// redis-server built without TLS says so there).
    pub fn start(user: &str, password: &str, mutual: bool) -> Self {
        let tls = TlsFiles::generate();
        let dir = scratch_dir();
        let acl = dir.join("users.acl");
        std::fs::write(
            &acl,
            format!("user default off\nuser {user} on >{password} ~* &* +@all\n"),
        )
        .unwrap();
        let mut s = Self {
            tls,
            child: None,
            port: 0,
            dir,
            user: user.to_owned(),
            password: password.to_owned(),
        };
        let mut last = String::new();
        // Another process may take the free port between our probe and the server's bind: the
        // server then exits at once, and we try another port.
        for _ in 0..5 {
            s.port = free_port();
            let child = Command::new("redis-server")
                .args(["--port", "0", "--tls-port", &s.port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--daemonize", "no"])
                .arg("--tls-cert-file")
                .arg(&s.tls.server_cert)
                .arg("--tls-key-file")
                .arg(&s.tls.server_key)
                .arg("--tls-ca-cert-file")
                .arg(&s.tls.ca)
                .args(["--tls-auth-clients", if mutual { "yes" } else { "no" }])
                .arg("--aclfile")
                .arg(&acl)
                .arg("--dir")
                .arg(&s.dir)
                .arg("--logfile")
                .arg(s.dir.join("redis.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => panic!("{INSTALL_HINT}"),
                    _ => panic!("cannot run redis-server: {e}"),
                });
            s.child = Some(child);
            match s.wait_ready() {
                Ok(()) => return s,
                Err(e) => last = e,
            }
            s.kill();
        }
        panic!("redis-server with TLS did not start (5 tries): {last}");
    }

    /// `rediss://USER:PASSWORD@127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        self.url_as(&self.user, &self.password)
    }

    /// The URL with another user name and password.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("rediss://{user}:{password}@127.0.0.1:{}/0", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis-cli` over TLS (with the client certificate) as the ACL user: its stdout. Panics
    /// if redis-cli cannot run or fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let o = self.cli_output(args);
        assert!(
            o.status.success(),
            "redis-cli {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn cli_output(&self, args: &[&str]) -> std::process::Output {
        Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "--tls"])
            .arg("--cacert")
            .arg(&self.tls.ca)
            .arg("--cert")
            .arg(&self.tls.client_cert)
            .arg("--key")
            .arg(&self.tls.client_key)
            .args(["--user", &self.user])
            // The password through the environment, not the command line.
            .env("REDISCLI_AUTH", &self.password)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("redis-cli: {e}; {INSTALL_HINT}"))
    }

    /// Keys matching `pattern` (SCAN, not KEYS).
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        self.cli(&["--scan", "--pattern", pattern])
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let t0 = Instant::now();
        loop {
            let o = self.cli_output(&["PING"]);
            if o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "PONG" {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(format!(
                    "redis-server on TLS port {} exited ({status}); its log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            if t0.elapsed() > READY_TIMEOUT {
                return Err(format!(
                    "redis-server on TLS port {} did not answer PING within {READY_TIMEOUT:?}; \
                     redis-cli: {}; its log:\n{}",
                    self.port,
                    String::from_utf8_lossy(&o.stderr).trim(),
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TlsRedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
