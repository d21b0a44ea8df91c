//! The processes of the deployment tests: `mamba-serve` replicas, nginx
//! running the repo's `docker/nginx.conf` in front of them, and a stand-in
//! upstream that streams in lock step with its reader.

use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// Longest any single request or stream may take before the test calls it
/// hung.
pub const HANG: Duration = Duration::from_secs(30);

/// One `mamba-serve` process.
pub struct Replica {
    pub name: String,
    pub child: Child,
    pub addr: SocketAddr,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Replica {
    /// Starts `mamba-serve serve` on the tiny fixture, on a free port, named
    /// `name` in its X-Replica header, with extra `MAMBA_SERVE_*` settings.
    pub fn start(name: &str, env: &[(&str, &str)]) -> Replica {
        let model = fixtures_dir().join("mamba1-tiny");
        let mut child = Command::new(env!("CARGO_BIN_EXE_mamba-serve"))
            .args(["serve", "--model", model.to_str().expect("utf-8 path"), "--device", "cpu", "--port", "0"])
            .env("MAMBA_SERVE_SERVER_REPLICA_NAME", name)
            .env("MAMBA_SERVE_ENGINE_MAX_TOTAL_TOKENS", "100000")
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the mamba-serve binary starts");
        let mut stderr = child.stderr.take().expect("piped");
        let mut seen = String::new();
        let started = Instant::now();
        let addr = loop {
            let mut b = [0u8; 512];
            let n = stderr.read(&mut b).expect("stderr");
            assert!(n > 0, "replica {name} exited early: {seen}");
            seen.push_str(&String::from_utf8_lossy(&b[..n]));
            if let Some(rest) = seen.split("listening on http://").nth(1) {
                if let (Some(a), true) = (rest.split_whitespace().next(), rest.contains('\n')) {
                    break a.parse().expect("a socket address");
                }
            }
            assert!(started.elapsed() < HANG, "replica {name} printed no listening line: {seen}");
        };
        // Keep draining stderr so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = vec![0u8; 4096];
            while matches!(stderr.read(&mut sink), Ok(n) if n > 0) {}
        });
        Replica { name: name.to_string(), child, addr }
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: sends a signal to our own child process.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    pub async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.addr);
        reqwest::get(url).await.expect("metrics answer").text().await.expect("metrics text")
    }
}

/// The value of one sample line (`name` with its labels, exactly) in a
/// Prometheus text exposition; 0 when absent.
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

/// The nginx binary: `MAMBA_TEST_NGINX`, else the first on PATH or in the
/// usual sbin folders.
fn nginx_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("MAMBA_TEST_NGINX") {
        return p.into();
    }
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin"])
        .map(|d| Path::new(d).join("nginx"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "nginx is not installed. The deployment tests run the real nginx in front of the server: install it \
                 (Debian: `apt-get install nginx-light`; scripts/test.sh does this when run as root) or set \
                 MAMBA_TEST_NGINX to the binary"
            )
        })
}

/// `docker/nginx.conf` with its `listen` line moved to `127.0.0.1:port` and
/// its one template server line (between the BEGIN/END markers) repeated
/// for each replica, keeping its parameters (max_fails, fail_timeout).
fn site_conf(conf: &str, port: u16, replicas: &[SocketAddr]) -> String {
    let mut out = String::new();
    let (mut listens, mut templates, mut inside) = (0, 0, false);
    for line in conf.lines() {
        let t = line.trim();
        if t == "# BEGIN upstream servers" {
            inside = true;
        } else if t == "# END upstream servers" {
            inside = false;
        } else if inside && t.starts_with("server ") {
            templates += 1;
            let params = t.trim_end_matches(';').split_whitespace().skip(2).collect::<Vec<_>>().join(" ");
            for r in replicas {
                out.push_str(&format!("    server {r} {params};\n"));
            }
            continue;
        } else if t == "listen 80;" {
            listens += 1;
            out.push_str(&format!("    listen 127.0.0.1:{port};\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    assert_eq!(listens, 1, "docker/nginx.conf has one `listen 80;` line");
    assert_eq!(templates, 1, "docker/nginx.conf has one server line between the upstream markers");
    out
}

/// nginx (master and worker processes, not daemonized) with its prefix,
/// temp folders, logs and pid file in a temporary folder.
pub struct Nginx {
    child: Child,
    pub url: String,
    dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers, then exits. SIGKILL would
        // orphan the workers with the listening socket.
        // SAFETY: sends a signal to our own child process.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nginx {
    /// nginx in front of `upstreams`.
    pub fn start_for(upstreams: &[SocketAddr]) -> Nginx {
        let repo_conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/nginx.conf");
        let conf = std::fs::read_to_string(&repo_conf).expect("docker/nginx.conf readable");
        // A port picked free can be taken by someone else before nginx binds
        // it: try a few.
        let mut last = String::new();
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
            match Nginx::try_start(&site_conf(&conf, port, upstreams), port) {
                Ok(n) => return n,
                Err(e) => last = e,
            }
        }
        panic!("nginx did not start: {last}");
    }

    fn try_start(site: &str, port: u16) -> Result<Nginx, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().display();
        std::fs::write(dir.path().join("site.conf"), site).expect("write site.conf");
        // What the official image's /etc/nginx/nginx.conf provides around the
        // site file, with every path inside the temporary folder. Workers of
        // a root master run as root here, so they can use that folder.
        // SAFETY: geteuid has no preconditions.
        let user = if unsafe { libc::geteuid() } == 0 { "user root root;" } else { "" };
        let main = format!(
            "{user}\nworker_processes 2;\ndaemon off;\npid {d}/nginx.pid;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/client_body;\n  proxy_temp_path {d}/proxy;\n  \
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
             include {d}/site.conf;\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), main).expect("write nginx.conf");
        let nginx = nginx_binary();
        let args = |test: bool| {
            let mut a =
                vec!["-p".to_string(), format!("{d}/"), "-c".into(), format!("{d}/nginx.conf"), "-e".into(), format!("{d}/error.log")];
            if test {
                a.push("-t".into());
            }
            a
        };
        let check = Command::new(&nginx).args(args(true)).output().map_err(|e| format!("cannot run {}: {e}", nginx.display()))?;
        assert!(check.status.success(), "nginx -t rejects docker/nginx.conf:\n{}\n{site}", String::from_utf8_lossy(&check.stderr));
        let log = File::create(dir.path().join("access.log")).expect("access log");
        let mut child = Command::new(&nginx).args(args(false)).stdout(log).stderr(Stdio::null()).spawn().expect("nginx starts");
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let err = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
                return Err(format!("nginx exited ({status}): {err}"));
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(Nginx { child, url: format!("http://127.0.0.1:{port}"), dir });
            }
            assert!(started.elapsed() < Duration::from_secs(10), "nginx did not listen on {port}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// nginx's access log so far (one line per request, with the replicas
    /// tried and their statuses): context for a failed assertion.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

/// Three replicas behind nginx.
pub struct Cluster {
    pub replicas: Vec<Replica>,
    pub nginx: Nginx,
}

impl Cluster {
    pub fn start(env: &[(&str, &str)]) -> Cluster {
        let replicas: Vec<Replica> = (0..3).map(|i| Replica::start(&format!("replica-{i}"), env)).collect();
        let nginx = Nginx::start_for(&replicas.iter().map(|r| r.addr).collect::<Vec<_>>());
        Cluster { replicas, nginx }
    }

    pub fn completions(&self) -> String {
        format!("{}/v1/completions", self.nginx.url)
    }

    pub fn replica(&self, name: &str) -> &Replica {
        self.replicas.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("no replica named {name:?}"))
    }
}

/// An upstream that answers one request with an SSE stream in lock step
/// with its reader: it writes each event only after `read` says the client
/// has the one before. A proxy that holds back any part of a stream stalls
/// it.
pub fn lockstep_upstream(events: Vec<String>, read: std::sync::mpsc::Receiver<()>) -> SocketAddr {
    use std::io::{BufRead, BufReader, Write};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let Ok((sock, _)) = listener.accept() else { return };
        let mut reader = BufReader::new(sock.try_clone().expect("clone"));
        let mut length = 0;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        // No X-Accel-Buffering header: only nginx's own settings decide.
        let mut sock = sock;
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        if sock.write_all(head.as_bytes()).is_err() {
            return;
        }
        for e in events {
            if sock.write_all(format!("{:x}\r\n{e}\r\n", e.len()).as_bytes()).is_err() || read.recv_timeout(HANG).is_err() {
                return;
            }
        }
        let _ = sock.write_all(b"0\r\n\r\n");
    });
    addr
}
