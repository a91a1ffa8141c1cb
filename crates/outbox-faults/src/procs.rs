//! Real processes: the `outbox` CLI (and this crate's `outbox-fault-relay`) as relays, and a moto
//! emulator of the scenario's own on a free loopback port, so stopping it never disturbs the
//! shared emulator on 4566 that other tests use.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The directory cargo put the running test binary's executables in (`target/debug`).
fn target_profile_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/debug/deps/<test> or target/debug/<bin>
    let mut dir = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no parent of {}", exe.display()))?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// The `outbox` CLI binary built from this workspace. `cargo test --workspace` builds it with
/// every other target; when it is missing or older than the sources it is built from (e.g.
/// `cargo test -p outbox-faults` alone), it is built once per test process.
pub fn outbox_cli() -> PathBuf {
    static CLI: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    CLI.get_or_init(fresh_cli).clone()
}

fn fresh_cli() -> PathBuf {
    let dir = target_profile_dir().expect("locate the target directory");
    let bin = dir.join("outbox");
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or(std::time::UNIX_EPOCH);
    let root = repo_root();
    for src in [
        "crates/outbox/src",
        "crates/outbox-cli/src",
        "crates/outbox-aws/src",
    ] {
        if let Some(newer) = newest_file(&root.join(src)).filter(|(t, _)| *t > built) {
            // Tests run after cargo released its build lock, so building here does not deadlock.
            eprintln!(
                "the outbox CLI is missing or older than {}: running `cargo build -p outbox-cli`",
                newer.1.display()
            );
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let ok = std::process::Command::new(cargo)
                .args(["build", "-p", "outbox-cli"])
                .current_dir(&root)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "`cargo build -p outbox-cli` failed");
            break;
        }
    }
    assert!(bin.exists(), "no outbox CLI at {}", bin.display());
    bin
}

fn newest_file(dir: &Path) -> Option<(std::time::SystemTime, PathBuf)> {
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let candidate = if path.is_dir() {
            newest_file(&path)
        } else {
            entry.metadata().ok()?.modified().ok().map(|t| (t, path))
        };
        if let Some(c) = candidate {
            if newest.as_ref().is_none_or(|n| c.0 > n.0) {
                newest = Some(c);
            }
        }
    }
    newest
}

/// A scratch directory for one scenario's files (config, JSON Lines, logs), under the target dir.
pub fn scratch(name: &str) -> PathBuf {
    let dir = target_profile_dir()
        .unwrap_or_else(|_| std::env::temp_dir())
        .join("outbox-faults")
        .join(format!(
            "{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// A relay (or consumer) child process; killed when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub started: Instant,
}

impl Proc {
    /// Starts `program args` with `env`, stderr to `log` (appended), stdout discarded.
    pub fn spawn(program: &Path, args: &[&str], env: &[(&str, String)], log: &Path) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open log");
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_remove("DATABASE_URL")
            .env_remove("OUTBOX_CONFIG")
            .env_remove("OUTBOX_PROFILE")
            .env("OUTBOX_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Self {
            child,
            log: log.to_path_buf(),
            started: Instant::now(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id().map_or(-1, |p| p as i32)
    }

    #[allow(unsafe_code)]
    pub fn signal(&self, sig: i32) {
        let pid = self.pid();
        if pid > 0 {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }

    /// SIGKILL and reap.
    pub async fn kill9(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// SIGTERM; waits for a clean exit and returns its status code.
    pub async fn terminate(mut self, within: Duration) -> Option<i32> {
        self.signal(libc::SIGTERM);
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(Ok(status)) => status.code(),
            _ => {
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
                None
            }
        }
    }

    /// Whether the process exited (and how) without waiting.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Runs the `outbox` CLI in `dir` with `toml` as its configuration file and only the given
/// environment (no inherited DATABASE_URL / OUTBOX_* / AWS_*), and returns its output.
pub fn run_cli(
    dir: &Path,
    toml: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    let config = dir.join("outbox.toml");
    std::fs::write(&config, toml).expect("write the test configuration");
    let mut cmd = std::process::Command::new(outbox_cli());
    cmd.args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("OUTBOX_CONFIG", &config);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run the outbox CLI")
}

/// A free TCP port on loopback (bound and released; racy only against other port pickers).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A moto server of the scenario's own.
pub struct Emulator {
    pub port: u16,
    proc: Option<Child>,
    log: PathBuf,
}

impl Emulator {
    fn moto() -> PathBuf {
        let bin = repo_root().join(".venv-aws/bin/moto_server");
        if !bin.exists() {
            // The project's script creates the venv (once, about a minute).
            let ok = std::process::Command::new("bash")
                .arg(repo_root().join("scripts/aws-emulator.sh"))
                .arg("start")
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(
                ok,
                "cannot set up moto: run `bash scripts/aws-emulator.sh start`"
            );
        }
        bin
    }

    pub async fn start(dir: &Path) -> Self {
        let mut e = Self {
            port: free_port(),
            proc: None,
            log: dir.join("moto.log"),
        };
        e.up().await;
        e
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Starts moto (again) on the same port; state starts empty.
    pub async fn up(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("moto log");
        let child = Command::new(Self::moto())
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("start moto_server");
        self.proc = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(self.addr()).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "moto did not start; see {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops moto (SIGKILL: a crashed broker); everything it held is gone.
    pub async fn down(&mut self) {
        if let Some(mut child) = self.proc.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
}
