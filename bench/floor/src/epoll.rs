//! The epoll loop: level-triggered, one `epoll_wait` per batch of ready sockets, one `recv` and
//! one `send` per message.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};

use crate::{BUF, connect};

struct Half {
    stream: TcpStream,
    peer: RawFd,
}

pub fn run(listener: TcpListener, upstream: SocketAddr) -> Result<(), String> {
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("listener: {e}"))?;
    // SAFETY: plain syscall; the result is checked.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(format!(
            "epoll_create1: {}",
            std::io::Error::last_os_error()
        ));
    }
    let watch = |fd: RawFd| -> Result<(), String> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: fd as u64,
        };
        // SAFETY: `ev` outlives the call; both descriptors are open.
        if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(format!("epoll_ctl: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    };
    watch(listener.as_raw_fd())?;
    let mut halves: HashMap<RawFd, Half> = HashMap::new();
    let mut buf = vec![0u8; BUF];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    loop {
        // SAFETY: `events` has room for the 256 entries the kernel may write.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("epoll_wait: {e}"));
        }
        for ev in &events[..n as usize] {
            let fd = ev.u64 as RawFd;
            if fd == listener.as_raw_fd() {
                while let Ok((client, _)) = listener.accept() {
                    let Ok(up) = connect(&client, upstream) else {
                        continue; // the client sees its connection closed
                    };
                    for s in [&client, &up] {
                        s.set_nonblocking(true)
                            .map_err(|e| format!("socket: {e}"))?;
                        watch(s.as_raw_fd())?;
                    }
                    let (c, u) = (client.as_raw_fd(), up.as_raw_fd());
                    halves.insert(
                        c,
                        Half {
                            stream: client,
                            peer: u,
                        },
                    );
                    halves.insert(
                        u,
                        Half {
                            stream: up,
                            peer: c,
                        },
                    );
                }
                continue;
            }
            // A descriptor closed earlier in this batch has no half any more.
            let Some(half) = halves.get(&fd) else {
                continue;
            };
            let keep = match (&half.stream).read(&mut buf) {
                Ok(0) => false,
                Ok(len) => halves
                    .get(&half.peer)
                    .is_some_and(|p| (&p.stream).write(&buf[..len]).is_ok_and(|w| w == len)),
                Err(e) => e.kind() == ErrorKind::WouldBlock,
            };
            if !keep && let Some(half) = halves.remove(&fd) {
                halves.remove(&half.peer);
            }
        }
    }
}
