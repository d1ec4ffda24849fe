//! A 3-server NATS JetStream cluster on loopback ports, started from the `nats-server` binary
//! (Debian's package; `.ci/run` installs it where missing), with servers that can be killed and
//! started again on the same store, and a TCP proxy that can cut one client off.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

/// The `nats-server` binary: on `PATH`, else where Debian's package puts it (`/usr/sbin`, which
/// is not on a user's `PATH`), else `/usr/local/sbin` and `/usr/local/bin`.
pub fn nats_server() -> std::path::PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
    });
    on_path
        .or_else(|| {
            ["/usr/sbin", "/usr/local/sbin", "/usr/local/bin"]
                .iter()
                .map(|d| std::path::Path::new(d).join("nats-server"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| "nats-server".into())
}

/// `n` distinct loopback ports nobody listens on right now. nats-server is told its client
/// and route ports (each server's routes name the others'), so they are picked here and
/// released for it to bind: a race this third-party process leaves no way around. They are
/// held until all are picked: released one by one, the kernel could hand the same port out
/// twice, and a server whose client port was another's route port never started (the cluster
/// then had two peers, and a stream of three replicas found "no suitable peers for
/// placement"). (Its own copy: guestd-bench includes this file without `tests/common`.)
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Three JetStream servers in one cluster.
pub struct NatsCluster {
    pub ports: Vec<u16>,
    /// Each server's monitoring port (`/connz`: messages per client connection).
    pub monitors: Vec<u16>,
    dir: PathBuf,
    procs: Vec<Option<Child>>,
}

impl NatsCluster {
    pub fn start() -> NatsCluster {
        let dir = std::env::temp_dir().join(format!("guestd-nats-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ports = free_ports(9);
        let monitors = ports.split_off(6);
        let routes = ports.split_off(3);
        for i in 0..3 {
            let others: Vec<String> = (0..3)
                .filter(|j| *j != i)
                .map(|j| format!("nats-route://127.0.0.1:{}", routes[j]))
                .collect();
            let conf = format!(
                "server_name: s{i}\nlisten: 127.0.0.1:{}\nhttp: 127.0.0.1:{}\n\
                 jetstream {{\n  store_dir: \"{}\"\n}}\n\
                 cluster {{\n  name: guestd-test\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                ports[i],
                monitors[i],
                dir.join(format!("s{i}")).display(),
                routes[i],
                others.join(", ")
            );
            std::fs::write(dir.join(format!("s{i}.conf")), conf).unwrap();
        }
        let mut c = NatsCluster {
            ports,
            monitors,
            dir,
            procs: vec![None, None, None],
        };
        for i in 0..3 {
            c.restart(i);
        }
        c
    }

    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.ports[i])
    }

    pub fn urls(&self) -> Vec<String> {
        (0..3).map(|i| self.url(i)).collect()
    }

    /// SIGKILL server `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.procs[i].take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    /// Start server `i` (again), on its store.
    pub fn restart(&mut self, i: usize) {
        let log = std::fs::File::create(self.dir.join(format!("s{i}.log"))).unwrap();
        let child = Command::new(nats_server())
            .arg("-c")
            .arg(self.dir.join(format!("s{i}.conf")))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server must be installed (Debian package nats-server)");
        self.procs[i] = Some(child);
    }

    /// Wait until JetStream answers through a client of the whole cluster.
    pub async fn client(&self) -> async_nats::Client {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(self.urls())
            .await
            .unwrap();
        let js = async_nats::jetstream::new(client.clone());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            // JetStream is ready once the meta leader is elected: a stream can be created.
            match js
                .get_or_create_stream(async_nats::jetstream::stream::Config {
                    name: "READY".into(),
                    subjects: vec!["ready.probe".into()],
                    num_replicas: 3,
                    ..Default::default()
                })
                .await
            {
                Ok(_) => return client,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "JetStream did not become ready: {e}\n{}",
                        self.log_tails()
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

impl NatsCluster {
    /// The last lines each server wrote to its log, for a failure message (a server that could
    /// not bind its ports says so there).
    fn log_tails(&self) -> String {
        (0..3)
            .map(|i| {
                let log =
                    std::fs::read_to_string(self.dir.join(format!("s{i}.log"))).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(8)..].join("\n  ");
                format!(
                    "server s{i} (port {}), last lines:\n  {tail}",
                    self.ports[i]
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP proxy to one server that can cut every connection and refuse new ones.
#[derive(Clone)]
pub struct Proxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    /// Listening at once (inside a tokio runtime).
    pub fn start(upstream: u16) -> Proxy {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        let listener = TcpListener::from_std(std_listener).unwrap();
        let p = Proxy {
            port,
            cut: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(Vec::new())),
        };
        let me = p.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if me.cut.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(("127.0.0.1", upstream)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                me.conns.lock().await.push(task.abort_handle());
            }
        });
        p
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Drop every connection and refuse new ones.
    pub async fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for c in self.conns.lock().await.drain(..) {
            c.abort();
        }
    }

    /// Let connections through again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// One JetStream server on a port it picks itself (`-1`, read back from its log), with `conf`
/// added to its configuration (accounts, TLS) and files of `files` written beside it.
pub struct NatsServer {
    pub port: u16,
    pub dir: PathBuf,
    proc: tokio::process::Child,
}

impl NatsServer {
    pub async fn start(conf: &str, files: &[(&str, &str)]) -> NatsServer {
        use tokio::io::AsyncBufReadExt;
        let dir = std::env::temp_dir().join(format!("guestd-nats1-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        let main = format!(
            "listen: 127.0.0.1:-1\njetstream {{\n  store_dir: \"{}\"\n}}\n{conf}\n",
            dir.join("js").display()
        );
        std::fs::write(dir.join("server.conf"), main).unwrap();
        let mut proc = tokio::process::Command::new(nats_server())
            .arg("-c")
            .arg(dir.join("server.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("nats-server must be installed (Debian package nats-server)");
        let mut lines = tokio::io::BufReader::new(proc.stderr.take().unwrap()).lines();
        let mut log = std::fs::File::create(dir.join("server.log")).unwrap();
        let mut port = None;
        let read = async {
            while let Ok(Some(line)) = lines.next_line().await {
                use std::io::Write;
                let _ = writeln!(log, "{line}");
                if let Some(at) = line.split("Listening for client connections on ").nth(1) {
                    port = at.trim().rsplit(':').next().and_then(|p| p.parse().ok());
                }
                if line.contains("Server is ready") {
                    return;
                }
            }
            panic!(
                "nats-server stopped before it was ready; see {}",
                dir.display()
            );
        };
        tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .expect("nats-server did not get ready");
        // Keep draining its log, or the pipe fills and the server blocks.
        tokio::spawn(async move {
            use std::io::Write;
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = writeln!(log, "{line}");
            }
        });
        NatsServer {
            port: port.expect("no client port in nats-server's log"),
            dir,
            proc,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.proc.start_kill();
    }
}
