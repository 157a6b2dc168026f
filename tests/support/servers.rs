//! Private PostgreSQL, Redis and RabbitMQ servers for the chaos suite and the TLS suite: started
//! from the machine's installed packages on free loopback ports, with their data in a temporary
//! directory, so a test can stop, kill and restart them without touching the shared instances
//! every other test uses. Dropping a server stops it and removes its data.
//!
//! With a [`TestCa`], each server accepts TLS only (its clear-text port is closed or refused),
//! presenting a certificate for `127.0.0.1` signed by a private CA that the test has added to
//! the system trust store.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound, then released for the server to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn wait_until(what: &str, deadline: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < deadline, "{what} within {deadline:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run(command: &mut Command, what: &str) {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private certificate authority in the system trust store (`/usr/local/share/ca-certificates`
/// and `update-ca-certificates`, as an operator adds a company CA), and a server certificate it
/// signed for `127.0.0.1` and `localhost`. Dropping it takes the CA out of the store again.
pub struct TestCa {
    dir: Scratch,
    installed: PathBuf,
}

/// The PEM files a TLS server is configured with, copied where its user can read them.
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TestCa {
    /// Creates the CA and the server certificate (EC P-256, valid two days) and trusts the CA
    /// system-wide. Needs root, as `update-ca-certificates` does.
    pub fn install() -> Self {
        let dir = Scratch::new("tls-ca", "root");
        let path = &dir.path;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("scratch name")
            .to_owned();
        std::fs::write(
            path.join("ca.cnf"),
            format!(
                "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = {name}\n\
                 [v3_ca]\nbasicConstraints = critical,CA:TRUE\n\
                 keyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n"
            ),
        )
        .expect("ca.cnf");
        std::fs::write(
            path.join("server.ext"),
            "subjectAltName = DNS:localhost,IP:127.0.0.1\nextendedKeyUsage = serverAuth\n\
             basicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\n",
        )
        .expect("server.ext");
        let openssl = |args: &[&str], what: &str| {
            run(
                Command::new("openssl")
                    .current_dir(path)
                    .args(args)
                    .stderr(Stdio::piped()),
                what,
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"],
                &ec[..],
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.crt",
                    "-days",
                    "2",
                    "-config",
                    "ca.cnf",
                    "-extensions",
                    "v3_ca",
                ],
            ]
            .concat(),
            "openssl: the CA",
        );
        openssl(
            &[
                &["req"],
                &ec[..],
                &[
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                    "-subj",
                    "/CN=localhost",
                ],
            ]
            .concat(),
            "openssl: the server key",
        );
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ],
            "openssl: the server certificate",
        );
        let installed =
            PathBuf::from("/usr/local/share/ca-certificates").join(format!("{name}.crt"));
        std::fs::create_dir_all("/usr/local/share/ca-certificates").expect("CA directory");
        std::fs::copy(path.join("ca.crt"), &installed).expect("install the CA");
        run(
            Command::new("update-ca-certificates").stdout(Stdio::null()),
            "update-ca-certificates",
        );
        Self { dir, installed }
    }

    /// The server's certificate, key and the CA, copied into `dir` and owned by `owner` (the
    /// key readable by it alone, as PostgreSQL demands).
    pub fn server_files(&self, dir: &Path, owner: &str) -> ServerCert {
        let files = ServerCert {
            cert: dir.join("server.crt"),
            key: dir.join("server.key"),
            ca: dir.join("ca.crt"),
        };
        for (from, to) in [
            ("server.crt", &files.cert),
            ("server.key", &files.key),
            ("ca.crt", &files.ca),
        ] {
            std::fs::copy(self.dir.path.join(from), to).expect("copy a TLS file");
        }
        run(
            Command::new("chown")
                .arg(owner)
                .arg(&files.cert)
                .arg(&files.key)
                .arg(&files.ca),
            "chown the TLS files",
        );
        run(
            Command::new("chmod").arg("600").arg(&files.key),
            "chmod the server key",
        );
        files
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.installed);
        let _ = Command::new("update-ca-certificates")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A directory owned by `user` (the servers drop root privileges), removed on drop.
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn new(name: &str, user: &str) -> Self {
        let path = std::env::temp_dir().join(super::unique(name));
        std::fs::create_dir_all(&path).expect("scratch dir");
        run(
            Command::new("chown").arg("-R").arg(user).arg(&path),
            "chown scratch dir",
        );
        Self { path }
    }
}

impl Drop for Scratch {
    /// Removed, unless a test is failing: its message names the logs kept here.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The directory of PostgreSQL's server binaries (the newest installed version).
fn pg_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL installed under /usr/lib/postgresql")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    versions.sort();
    versions.pop().expect("a PostgreSQL version").join("bin")
}

/// A PostgreSQL cluster of its own (trust authentication, user `postgres`).
pub struct PrivatePostgres {
    pub port: u16,
    dir: Scratch,
    /// Server options for TLS only (set by [`PrivatePostgres::start_tls`]).
    tls: Option<String>,
}

impl PrivatePostgres {
    pub fn start() -> Self {
        Self::launch(None)
    }

    /// A cluster that accepts TCP connections over TLS only: `hostssl` is its one TCP rule, so a
    /// clear-text connection is refused (`no pg_hba.conf entry … no encryption`).
    pub fn start_tls(ca: &TestCa) -> Self {
        Self::launch(Some(ca))
    }

    fn launch(ca: Option<&TestCa>) -> Self {
        let dir = Scratch::new("chaos-pg", "postgres");
        let data = dir.path.join("data");
        run(
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(pg_bin().join("initdb"))
                .arg("-D")
                .arg(&data)
                .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
                .stdout(Stdio::null()),
            "initdb",
        );
        let tls = ca.map(|ca| {
            let files = ca.server_files(&dir.path, "postgres");
            let hba = dir.path.join("pg_hba.conf");
            std::fs::write(
                &hba,
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
            )
            .expect("pg_hba.conf");
            run(
                Command::new("chown").arg("postgres").arg(&hba),
                "chown pg_hba.conf",
            );
            format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={} -c hba_file={}",
                files.cert.display(),
                files.key.display(),
                hba.display()
            )
        });
        let server = Self {
            port: free_port(),
            dir,
            tls,
        };
        server.start_again();
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.path.join("data")
    }

    /// The URL of `database`; `?sslmode=require` on a TLS-only cluster.
    pub fn url(&self, database: &str) -> String {
        let tls = if self.tls.is_some() {
            "?sslmode=require"
        } else {
            ""
        };
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}{tls}",
            self.port
        )
    }

    /// `pg_ctl` as the `postgres` user on this cluster's data directory.
    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut command = Command::new("runuser");
        command
            .args(["-u", "postgres", "--"])
            .arg(pg_bin().join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(args)
            .stdout(Stdio::null());
        command
    }

    /// Starts the stopped cluster and waits until it accepts connections.
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200{}",
            self.port,
            self.dir.path.display(),
            self.tls.as_deref().unwrap_or_default()
        );
        let log = self.dir.path.join("log");
        let log = log.to_string_lossy();
        run(
            &mut self.pg_ctl(&["-o", &options, "-l", &log, "-w", "start"]),
            "pg_ctl start",
        );
    }

    /// Stops the cluster at once, as a crash would (`-m immediate`: no checkpoint, connections
    /// cut).
    pub fn stop(&self) {
        run(
            &mut self.pg_ctl(&["-m", "immediate", "-w", "stop"]),
            "pg_ctl stop",
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .pg_ctl(&["-m", "immediate", "-w", "stop"])
            .stderr(Stdio::null())
            .status();
    }
}

/// A Redis server of its own, without persistence: a restart comes back empty.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
    /// The TLS files of a TLS-only server, and the directory holding them.
    tls: Option<(ServerCert, Scratch)>,
}

impl PrivateRedis {
    pub fn start() -> Self {
        let mut server = Self {
            port: free_port(),
            child: None,
            tls: None,
        };
        server.start_again();
        server
    }

    /// A server listening with TLS only (`--port 0 --tls-port …`); clients need no certificate.
    pub fn start_tls(ca: &TestCa) -> Self {
        let dir = Scratch::new("tls-redis", "root");
        let files = ca.server_files(&dir.path, "root");
        let mut server = Self {
            port: free_port(),
            child: None,
            tls: Some((files, dir)),
        };
        server.start_again();
        server
    }

    /// `redis://`, or `rediss://` on a TLS-only server.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn start_again(&mut self) {
        let port = self.port.to_string();
        let listen: Vec<String> = match &self.tls {
            None => vec!["--port".into(), port],
            Some((files, _)) => [
                [
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-auth-clients",
                    "no",
                ]
                .map(String::from)
                .to_vec(),
                vec!["--tls-cert-file".into(), files.cert.display().to_string()],
                vec!["--tls-key-file".into(), files.key.display().to_string()],
                vec!["--tls-ca-cert-file".into(), files.ca.display().to_string()],
            ]
            .concat(),
        };
        let child = Command::new("redis-server")
            .args(&listen)
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(std::env::temp_dir())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        let port = self.port;
        wait_until("redis up", Duration::from_secs(10), || port_open(port));
    }

    /// Kills the server (SIGKILL): every key is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A RabbitMQ node of its own (`guest`/`guest` on loopback), with its own node name, ports and
/// data directory.
pub struct PrivateRabbit {
    pub port: u16,
    node: String,
    dir: Scratch,
    tls: bool,
}

impl PrivateRabbit {
    pub fn start() -> Self {
        Self::launch(None)
    }

    /// A node whose one AMQP listener is TLS (`listeners.tcp = none`); clients need no
    /// certificate.
    pub fn start_tls(ca: &TestCa) -> Self {
        Self::launch(Some(ca))
    }

    fn launch(ca: Option<&TestCa>) -> Self {
        let dir = Scratch::new("chaos-rabbit", "rabbitmq:rabbitmq");
        let port = free_port();
        let node = format!("chaos{port}@localhost");
        let conf = dir.path.join("rabbitmq.conf");
        let listeners = match ca {
            None => format!("listeners.tcp.local = 127.0.0.1:{port}\n"),
            Some(ca) => {
                let files = ca.server_files(&dir.path, "rabbitmq:rabbitmq");
                format!(
                    "listeners.tcp = none\nlisteners.ssl.local = 127.0.0.1:{port}\n\
                     ssl_options.cacertfile = {}\nssl_options.certfile = {}\n\
                     ssl_options.keyfile = {}\nssl_options.verify = verify_none\n\
                     ssl_options.fail_if_no_peer_cert = false\n",
                    files.ca.display(),
                    files.cert.display(),
                    files.key.display()
                )
            }
        };
        std::fs::write(&conf, listeners).expect("rabbitmq.conf");
        std::fs::write(
            dir.path.join("rabbitmq-env.conf"),
            format!("NODENAME={node}\nERL_EPMD_ADDRESS=127.0.0.1\n"),
        )
        .expect("rabbitmq-env.conf");
        std::fs::write(dir.path.join("enabled_plugins"), "[].\n").expect("enabled_plugins");
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.path.join(sub)).expect("rabbit dirs");
        }
        run(
            Command::new("chown")
                .args(["-R", "rabbitmq:rabbitmq"])
                .arg(&dir.path),
            "chown rabbit dir",
        );
        let server = Self {
            port,
            node,
            dir,
            tls: ca.is_some(),
        };
        let path = &server.dir.path;
        let mut command = Command::new("rabbitmq-server");
        if !server.tls {
            command.env("RABBITMQ_NODE_PORT", port.to_string());
        }
        run(
            command
                .arg("-detached")
                .env("RABBITMQ_NODENAME", &server.node)
                .env("RABBITMQ_DIST_PORT", free_port().to_string())
                .env("RABBITMQ_CONFIG_FILE", path.join("rabbitmq.conf"))
                .env("RABBITMQ_CONF_ENV_FILE", path.join("rabbitmq-env.conf"))
                .env(
                    "RABBITMQ_ENABLED_PLUGINS_FILE",
                    path.join("enabled_plugins"),
                )
                .env("RABBITMQ_FEATURE_FLAGS_FILE", path.join("feature_flags"))
                .env("RABBITMQ_MNESIA_BASE", path.join("mnesia"))
                .env("RABBITMQ_LOG_BASE", path.join("log"))
                .env("RABBITMQ_PID_FILE", path.join("pid"))
                .env("ERL_FLAGS", "-kernel inet_dist_use_interface {127,0,0,1}")
                .stdout(Stdio::null()),
            "rabbitmq-server -detached",
        );
        wait_until("rabbitmq up", Duration::from_secs(90), || {
            port_open(port) && server.ctl(&["-q", "await_startup", "--timeout", "5"])
        });
        server
    }

    /// `amqp://`, or `amqps://` on a TLS-only node.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "amqps" } else { "amqp" };
        format!("{scheme}://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn ctl(&self, args: &[&str]) -> bool {
        Command::new("rabbitmqctl")
            .args(["-n", &self.node])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `rabbitmqctl stop_app`: the broker goes away, its durable queues stay on disk.
    pub fn stop_app(&self) {
        assert!(self.ctl(&["stop_app"]), "rabbitmqctl stop_app");
    }

    /// `rabbitmqctl start_app`, waiting until the listener answers.
    pub fn start_app(&self) {
        assert!(self.ctl(&["start_app"]), "rabbitmqctl start_app");
        let port = self.port;
        wait_until("rabbitmq app up", Duration::from_secs(60), || {
            port_open(port)
        });
    }

    /// Ready and unacknowledged messages of `queue` (0, 0 when absent).
    pub fn depth(&self, queue: &str) -> (u64, u64) {
        let out = Command::new("rabbitmqctl")
            .args([
                "-n",
                &self.node,
                "-q",
                "list_queues",
                "name",
                "messages_ready",
            ])
            .arg("messages_unacknowledged")
            .output()
            .expect("rabbitmqctl list_queues");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| {
                let mut cols = line.split_whitespace();
                let name = cols.next()?;
                let ready = cols.next()?.parse().ok()?;
                let unacked = cols.next()?.parse().ok()?;
                (name == queue).then_some((ready, unacked))
            })
            .next()
            .unwrap_or((0, 0))
    }

    pub fn dir(&self) -> &Path {
        &self.dir.path
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        let _ = self.ctl(&["stop"]);
    }
}

/// A running `processor` or `ingress`, killed with SIGKILL on drop.
pub struct Process {
    child: Child,
    pub addr: String,
}

impl Process {
    pub fn spawn(binary: &str, args: &[&str], env: &[(&str, String)], log: PathBuf) -> Self {
        let path = crate::binary(binary);
        let addr = env
            .iter()
            .find(|(k, _)| k.ends_with("_ADDR"))
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let log = std::fs::File::create(log).expect("log file");
        let child = Command::new(path)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn");
        Self { child, addr }
    }

    /// `kill -9`.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
