//! A TCP proxy on loopback that the test controls: pass traffic through, delay it, hold it
//! (a black hole: nothing forwarded, nothing closed), cut every open connection, or refuse new
//! ones (the far side looks down).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with traffic right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward at once.
    Pass,
    /// Forward every chunk after this many milliseconds.
    Delay(u64),
    /// Accept and keep connections, forward nothing (a network partition).
    Hole,
    /// Close every new connection at once (connection refused/reset: the far side is down).
    Refuse,
}

impl Mode {
    fn encode(self) -> (u8, u64) {
        match self {
            Mode::Pass => (0, 0),
            Mode::Delay(ms) => (1, ms),
            Mode::Hole => (2, 0),
            Mode::Refuse => (3, 0),
        }
    }
}

struct Shared {
    kind: AtomicU8,
    delay_ms: AtomicU64,
    /// Bumped to cut every open connection.
    cut: watch::Sender<u64>,
    pub connections: AtomicU64,
}

impl Shared {
    fn mode(&self) -> Mode {
        match self.kind.load(Ordering::Relaxed) {
            1 => Mode::Delay(self.delay_ms.load(Ordering::Relaxed)),
            2 => Mode::Hole,
            3 => Mode::Refuse,
            _ => Mode::Pass,
        }
    }
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `target` (a loopback address).
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        anyhow::ensure!(
            target.ip().is_loopback(),
            "the proxy only forwards to loopback"
        );
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            kind: AtomicU8::new(0),
            delay_ms: AtomicU64::new(0),
            cut,
            connections: AtomicU64::new(0),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if s.mode() == Mode::Refuse {
                    drop(client);
                    continue;
                }
                s.connections.fetch_add(1, Ordering::Relaxed);
                let s = s.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let mut cut = s.cut.subscribe();
                    cut.borrow_and_update();
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = pump(cr, sw, s.clone()) => {}
                        _ = pump(sr, cw, s.clone()) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Ok(Self { addr, shared, task })
    }

    pub fn set(&self, mode: Mode) {
        let (kind, ms) = mode.encode();
        self.shared.delay_ms.store(ms, Ordering::Relaxed);
        self.shared.kind.store(kind, Ordering::Relaxed);
    }

    /// Closes every open connection (both directions) at once.
    pub fn cut_all(&self) {
        self.shared.cut.send_modify(|g| *g += 1);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut_all();
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    s: Arc<Shared>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            match s.mode() {
                Mode::Hole => tokio::time::sleep(Duration::from_millis(20)).await,
                Mode::Delay(ms) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    break;
                }
                Mode::Pass | Mode::Refuse => break,
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn forwards_delays_and_cuts() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 16];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let proxy = Proxy::start(target).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr).await.unwrap();
        c.write_all(b"hi").await.unwrap();
        let mut b = [0u8; 2];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"hi");

        proxy.set(Mode::Delay(200));
        let t = std::time::Instant::now();
        c.write_all(b"yo").await.unwrap();
        c.read_exact(&mut b).await.unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );

        proxy.set(Mode::Pass);
        proxy.cut_all();
        let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut b))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "a cut connection reads EOF");

        proxy.set(Mode::Refuse);
        let mut r = TcpStream::connect(proxy.addr).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(2), r.read(&mut b))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "a refused connection is closed at once");
    }
}
