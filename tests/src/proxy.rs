//! A TCP proxy the test controls, to cut one agent off from the controller
//! without closing anything: while partitioned, bytes in both directions
//! are read and dropped, so each side sees silence, not a reset.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct State {
    partitioned: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
}

/// A running proxy to one address.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    state: Arc<State>,
}

fn pump(mut from: TcpStream, mut to: TcpStream, state: &State) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if state.partitioned.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

impl Proxy {
    /// Listen on loopback and forward every connection to `target`.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(State::default());
        let st = Arc::clone(&state);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                if let (Ok(c3), Ok(s3)) = (client.try_clone(), server.try_clone()) {
                    st.conns
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .extend([c3, s3]);
                }
                let (a, b) = (Arc::clone(&st), Arc::clone(&st));
                std::thread::spawn(move || pump(client, s2, &a));
                std::thread::spawn(move || pump(server, c2, &b));
            }
        });
        Proxy { addr, state }
    }

    /// From now on, drop every byte in both directions.
    pub fn partition(&self) {
        self.state.partitioned.store(true, Ordering::SeqCst);
    }

    /// Forward again. Connections that lost bytes are cut, so both ends
    /// notice and the agent dials again, as after a real outage.
    pub fn heal(&self) {
        for c in self
            .state
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
        {
            let _ = c.shutdown(Shutdown::Both);
        }
        self.state.partitioned.store(false, Ordering::SeqCst);
    }
}
