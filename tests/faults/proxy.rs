//! A TCP proxy the test can cut: every connection through it dies at
//! once, and new ones are refused until it is restored. Lets a test take
//! the broker away from one daemon without touching anyone else's
//! connections. It can also hang: connections are cut, and new ones are
//! accepted but never answered until it thaws (a peer that stops talking).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    /// While true, new connections are accepted and left hanging.
    hung: watch::Sender<bool>,
    generation: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let open = Arc::new(AtomicBool::new(true));
        let hung = watch::Sender::new(false);
        let generation = watch::Sender::new(0u64);
        let task = tokio::spawn({
            let open = Arc::clone(&open);
            let generation = generation.clone();
            let hung = hung.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    if !open.load(Ordering::SeqCst) {
                        drop(client); // refused while cut
                        continue;
                    }
                    if *hung.borrow() {
                        // Held, silent, until the proxy thaws.
                        let mut thawed = hung.subscribe();
                        tokio::spawn(async move {
                            let _ = thawed.wait_for(|h| !*h).await;
                            drop(client);
                        });
                        continue;
                    }
                    let mut cut = generation.subscribe();
                    let born = *cut.borrow_and_update();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let (mut c, mut s) = (client, server);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut c, &mut s) => {}
                            _ = cut.wait_for(|g| *g != born) => {}
                        }
                    });
                }
            }
        });
        Proxy {
            addr,
            open,
            hung,
            generation,
            task,
        }
    }

    /// Kill every connection and refuse new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// Cut every connection; new ones are accepted and never answered.
    pub fn hang(&self) {
        self.hung.send_replace(true);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn thaw(&self) {
        self.hung.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
