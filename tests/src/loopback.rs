//! Ports on 127.0.0.1 for the servers a test starts, and stand-ins for
//! servers that must not be reached.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use nix::sys::socket::{bind, getsockname, socket, AddressFamily, SockFlag, SockType, SockaddrIn};

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
///
/// Another process may take it before the caller binds it, so server
/// start-up retries with a new port when the server fails to bind.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .expect("binding 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("reading the bound address")
        .port()
}

/// A port on 127.0.0.1 that refuses every connection.
///
/// The socket is bound but never listens, so the kernel rejects each
/// connection attempt with a reset and no other server can take the port
/// while this value lives.
pub struct ClosedPort {
    port: u16,
    _socket: OwnedFd,
}

impl ClosedPort {
    pub fn new() -> ClosedPort {
        let socket = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("creating a TCP socket");
        let any_port = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        bind(socket.as_raw_fd(), &any_port).expect("binding 127.0.0.1:0");
        let bound: SockaddrIn = getsockname(socket.as_raw_fd()).expect("reading the bound address");

        ClosedPort {
            port: bound.port(),
            _socket: socket,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Returns an `http://` URL at this port.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Default for ClosedPort {
    fn default() -> Self {
        ClosedPort::new()
    }
}

/// A listener on 127.0.0.1 that accepts connections, closes them at once
/// and counts them, to show that a run opened none.
pub struct ConnectionCounter {
    port: u16,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ConnectionCounter {
    pub fn start() -> ConnectionCounter {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("making the listener non-blocking");
        let port = listener
            .local_addr()
            .expect("reading the bound address")
            .port();

        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let accepted = Arc::clone(&accepted);
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((connection, _)) => {
                            accepted.fetch_add(1, Ordering::SeqCst);
                            drop(connection);
                        }
                        Err(error) if error.kind() == ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(10));
                        }
                        Err(error) => panic!("accepting on port {port} failed: {error}"),
                    }
                }
            })
        };

        ConnectionCounter {
            port,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Returns an `http://` URL at this listener.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for ConnectionCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
