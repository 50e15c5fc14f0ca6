//! The io_uring loop: one `io_uring_enter` per batch, which submits the batch's sends and
//! receives and waits for the next completions. Single issuer with deferred task-run, so
//! completions are processed only when this thread asks for them (the cheapest setup for a
//! one-thread server).
//!
//! A buffer handed to the kernel must outlive the operation: a pair of connections stays in its
//! slot until none of its operations is in flight, also while it closes (shutting both sockets
//! down makes pending receives complete).

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};

use io_uring::{IoUring, opcode, squeue, types};

use crate::{BUF, connect};

const ACCEPT: u64 = u64::MAX;
const SEND: u64 = 1;

struct Side {
    stream: TcpStream,
    buf: Box<[u8]>,
    /// Bytes of `buf` being sent to the other side.
    sending: u32,
}

struct Pair {
    sides: [Side; 2],
    in_flight: u32,
    closing: bool,
}

/// `user_data`: the pair's slot, which side's buffer the operation uses, and the operation.
fn tag(slot: usize, side: usize, op: u64) -> u64 {
    ((slot as u64) << 2) | ((side as u64) << 1) | op
}

struct Loop {
    ring: IoUring,
    pairs: Vec<Option<Pair>>,
    free: Vec<usize>,
}

impl Loop {
    fn push(&mut self, entry: squeue::Entry) -> Result<(), String> {
        // SAFETY: every entry points into a `Pair` kept in `pairs` until its operations finish,
        // or at the listener, which lives for the whole loop.
        while unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.ring
                .submit()
                .map_err(|e| format!("io_uring submit: {e}"))?;
        }
        Ok(())
    }

    fn recv(&mut self, slot: usize, side: usize) -> Result<(), String> {
        let pair = self.pairs[slot].as_mut().expect("live slot");
        let s = &mut pair.sides[side];
        let entry = opcode::Recv::new(
            types::Fd(s.stream.as_raw_fd()),
            s.buf.as_mut_ptr(),
            BUF as u32,
        )
        .build()
        .user_data(tag(slot, side, 0));
        pair.in_flight += 1;
        self.push(entry)
    }

    fn send(&mut self, slot: usize, side: usize, len: u32) -> Result<(), String> {
        let pair = self.pairs[slot].as_mut().expect("live slot");
        let to = pair.sides[1 - side].stream.as_raw_fd();
        let s = &mut pair.sides[side];
        s.sending = len;
        let entry = opcode::Send::new(types::Fd(to), s.buf.as_ptr(), len)
            .build()
            .user_data(tag(slot, side, SEND));
        pair.in_flight += 1;
        self.push(entry)
    }

    fn open(&mut self, client: TcpStream, upstream: SocketAddr) -> Result<(), String> {
        let Ok(up) = connect(&client, upstream) else {
            return Ok(()); // dropping `client` closes it: the client sees the failure
        };
        let side = |stream| Side {
            stream,
            buf: vec![0; BUF].into_boxed_slice(),
            sending: 0,
        };
        let pair = Pair {
            sides: [side(client), side(up)],
            in_flight: 0,
            closing: false,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.pairs[slot] = Some(pair);
                slot
            }
            None => {
                self.pairs.push(Some(pair));
                self.pairs.len() - 1
            }
        };
        self.recv(slot, 0)?;
        self.recv(slot, 1)
    }

    /// One completion of `slot`'s pair: `ok` says whether it moved the whole message.
    fn complete(&mut self, slot: usize, side: usize, op: u64, res: i32) -> Result<(), String> {
        let Some(pair) = self.pairs[slot].as_mut() else {
            return Ok(());
        };
        pair.in_flight -= 1;
        let ok = res > 0 && (op != SEND || res as u32 == pair.sides[side].sending);
        if !ok || pair.closing {
            if !pair.closing {
                pair.closing = true;
                for s in &pair.sides {
                    let _ = s.stream.shutdown(Shutdown::Both);
                }
            }
            if pair.in_flight == 0 {
                self.pairs[slot] = None;
                self.free.push(slot);
            }
            return Ok(());
        }
        match op {
            // Received on `side`: forward to the other side from the same buffer.
            0 => self.send(slot, side, res as u32),
            // `side`'s buffer is free again: receive the next message into it.
            _ => self.recv(slot, side),
        }
    }
}

pub fn run(listener: TcpListener, upstream: SocketAddr) -> Result<(), String> {
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .build(4096)
        .map_err(|e| format!("io_uring setup (kernel ≥ 6.1 with io_uring enabled): {e}"))?;
    let mut lp = Loop {
        ring,
        pairs: Vec::new(),
        free: Vec::new(),
    };
    let accept = opcode::Accept::new(
        types::Fd(listener.as_raw_fd()),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    )
    .build()
    .user_data(ACCEPT);
    lp.push(accept.clone())?;
    let mut done: Vec<(u64, i32)> = Vec::with_capacity(1024);
    loop {
        match lp.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("io_uring enter: {e}")),
        }
        done.extend(lp.ring.completion().map(|c| (c.user_data(), c.result())));
        for (data, res) in done.drain(..) {
            if data == ACCEPT {
                if res >= 0 {
                    // SAFETY: a successful accept returns a new descriptor that nothing else owns.
                    let client = unsafe { TcpStream::from_raw_fd(res) };
                    lp.open(client, upstream)?;
                }
                lp.push(accept.clone())?;
            } else {
                let slot = (data >> 2) as usize;
                let side = ((data >> 1) & 1) as usize;
                lp.complete(slot, side, data & 1, res)?;
            }
        }
    }
}
