//! Batched UDP I/O (`recvmmsg`/`sendmmsg` on Linux) for the TURN relay's hot path.
//!
//! Nearly all of a relayed datagram's cost is the kernel's, so the relay cuts kernel crossings: one
//! `recvmmsg` reads up to [`BATCH`] datagrams, one `sendmmsg` sends a burst of frames
//! to clients, and a short read tells the caller the socket is drained (no extra `EAGAIN` read per
//! wake-up). Linux only, like the rest of the deployment.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;

/// Datagrams read or written with one system call.
pub const BATCH: usize = 32;

/// Receive buffers for up to `slots` datagrams of at most `slot_len` bytes each.
pub struct RecvBufs {
    data: Box<[u8]>,
    slot_len: usize,
    /// Slot, length and source of each datagram of the last read.
    meta: Vec<(usize, usize, SocketAddr)>,
}

impl RecvBufs {
    pub fn new(slots: usize, slot_len: usize) -> RecvBufs {
        let slots = slots.clamp(1, BATCH);
        RecvBufs {
            // Zeroed allocations of this size are mapped lazily: untouched slots cost no memory.
            data: vec![0u8; slots * slot_len].into_boxed_slice(),
            slot_len,
            meta: Vec::with_capacity(slots),
        }
    }

    /// Forget the datagrams of the last read.
    pub fn clear(&mut self) {
        self.meta.clear();
    }

    fn slots(&self) -> usize {
        self.data.len() / self.slot_len
    }

    /// The datagrams of the last [`recv`](Self::recv).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], SocketAddr)> {
        self.meta
            .iter()
            .map(|&(slot, n, from)| (&self.data[slot * self.slot_len..][..n], from))
    }

    /// Read what is queued on `socket`, up to the number of slots, without blocking. `Ok(true)`
    /// when the socket may hold more (every slot was filled); `Ok(false)` when it was drained.
    /// Truncated datagrams are dropped: one longer than `slot_len` cannot be valid here.
    pub fn recv(&mut self, socket: &impl std::os::fd::AsRawFd) -> io::Result<bool> {
        use std::mem::MaybeUninit;
        self.meta.clear();
        let slots = self.slots();
        // Only the first `slots` entries are initialised and passed to the kernel.
        let mut names = [const { MaybeUninit::<libc::sockaddr_storage>::uninit() }; BATCH];
        let mut iovs = [const { MaybeUninit::<libc::iovec>::uninit() }; BATCH];
        let mut msgs = [const { MaybeUninit::<libc::mmsghdr>::uninit() }; BATCH];
        let base = self.data.as_mut_ptr();
        for i in 0..slots {
            iovs[i].write(libc::iovec {
                // SAFETY: slot i lies within `data` (slots * slot_len bytes).
                iov_base: unsafe { base.add(i * self.slot_len) }.cast(),
                iov_len: self.slot_len,
            });
            msgs[i].write(header(
                names[i].as_mut_ptr().cast(),
                size_of::<libc::sockaddr_storage>() as libc::socklen_t,
                iovs[i].as_mut_ptr(),
            ));
        }
        // SAFETY: every header points at live buffers of the stated sizes.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                slots as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (slot, msg) in msgs.iter().enumerate().take(n) {
            // SAFETY: the kernel filled in the first `n` headers.
            let msg = unsafe { msg.assume_init_ref() };
            if msg.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                continue;
            }
            // SAFETY: the kernel wrote a socket address of `msg_namelen` bytes into `names[slot]`.
            let from = unsafe { sockaddr_of(names[slot].as_ptr(), msg.msg_hdr.msg_namelen) };
            if let Some(from) = from {
                self.meta.push((slot, msg.msg_len as usize, from));
            }
        }
        Ok(n == slots)
    }
}

/// A one-buffer message header for `recvmmsg`/`sendmmsg`.
fn header(
    name: *mut libc::c_void,
    namelen: libc::socklen_t,
    iov: *mut libc::iovec,
) -> libc::mmsghdr {
    // SAFETY: msghdr is plain old data; all-zero is a valid value.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_name = name;
    hdr.msg_namelen = namelen;
    hdr.msg_iov = iov;
    hdr.msg_iovlen = 1;
    libc::mmsghdr {
        msg_hdr: hdr,
        msg_len: 0,
    }
}

/// # Safety
/// `name` points at a socket address of `len` bytes written by the kernel.
unsafe fn sockaddr_of(
    name: *const libc::sockaddr_storage,
    len: libc::socklen_t,
) -> Option<SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    let len = len as usize;
    // SAFETY (all three reads): the family says which structure the kernel wrote, and `len`
    // confirms it is complete.
    match i32::from(unsafe { (*name).ss_family }) {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            let a = unsafe { &*name.cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            let a = unsafe { &*name.cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Frames queued for one UDP socket, sent together with [`SendQueue::flush`].
#[derive(Default)]
pub struct SendQueue {
    data: Vec<u8>,
    frames: Vec<(SocketAddr, Range<usize>)>,
    /// Destination addresses of one `sendmmsg`, kept to reuse the allocation.
    names: Vec<socket2::SockAddr>,
}

impl SendQueue {
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn push(&mut self, to: SocketAddr, frame: &[u8]) {
        let start = self.data.len();
        self.data.extend_from_slice(frame);
        self.frames.push((to, start..self.data.len()));
    }

    /// Move `other`'s frames behind these.
    pub fn append(&mut self, other: &mut SendQueue) {
        let base = self.data.len();
        self.data.append(&mut other.data);
        self.frames.extend(
            other
                .frames
                .drain(..)
                .map(|(to, r)| (to, r.start + base..r.end + base)),
        );
    }

    /// Send every queued frame, [`BATCH`] per system call; returns how many could not be sent (a
    /// full socket buffer drops them, as the network would). The queue is empty afterwards.
    pub fn flush(&mut self, socket: &impl std::os::fd::AsRawFd) -> usize {
        let mut dropped = 0;
        let mut next = 0;
        while next < self.frames.len() {
            let end = (next + BATCH).min(self.frames.len());
            match self.send_some(socket, next..end) {
                Ok(n) => next += n.max(1),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    dropped += self.frames.len() - next;
                    break;
                }
                // One bad destination: skip that frame, keep the rest.
                Err(_) => {
                    dropped += 1;
                    next += 1;
                }
            }
        }
        self.data.clear();
        self.frames.clear();
        dropped
    }

    fn send_some(
        &mut self,
        socket: &impl std::os::fd::AsRawFd,
        range: Range<usize>,
    ) -> io::Result<usize> {
        use std::mem::MaybeUninit;
        let count = range.len();
        self.names.clear();
        self.names.extend(
            self.frames[range.clone()]
                .iter()
                .map(|(to, _)| socket2::SockAddr::from(*to)),
        );
        let mut iovs = [const { MaybeUninit::<libc::iovec>::uninit() }; BATCH];
        let mut msgs = [const { MaybeUninit::<libc::mmsghdr>::uninit() }; BATCH];
        for (i, (_, bytes)) in self.frames[range].iter().enumerate() {
            iovs[i].write(libc::iovec {
                iov_base: self.data[bytes.clone()].as_ptr().cast_mut().cast(),
                iov_len: bytes.len(),
            });
            msgs[i].write(header(
                self.names[i].as_ptr().cast_mut().cast(),
                self.names[i].len(),
                iovs[i].as_mut_ptr(),
            ));
        }
        // SAFETY: the first `count` headers point at live buffers and addresses of the stated
        // sizes; the kernel only reads them.
        let n = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                count as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_roundtrip_over_loopback() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let mut q = SendQueue::default();
        for i in 0..40u8 {
            q.push(to, &vec![i; 1 + i as usize]);
        }
        assert_eq!(q.len(), 40);
        assert_eq!(q.flush(&tx), 0);
        assert!(q.is_empty());

        let mut bufs = RecvBufs::new(BATCH, 2048);
        let mut seen = Vec::new();
        // 40 datagrams: one full batch (more may follow), then a short one (drained).
        assert!(bufs.recv(&rx).unwrap());
        seen.extend(bufs.iter().map(|(d, from)| (d.to_vec(), from)));
        assert!(!bufs.recv(&rx).unwrap());
        seen.extend(bufs.iter().map(|(d, from)| (d.to_vec(), from)));
        assert_eq!(seen.len(), 40);
        for (i, (d, from)) in seen.iter().enumerate() {
            assert_eq!(*d, vec![i as u8; 1 + i]);
            assert_eq!(*from, tx.local_addr().unwrap());
        }
        assert_eq!(
            bufs.recv(&rx).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn truncated_datagrams_are_dropped() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        tx.send_to(&[1u8; 100], to).unwrap();
        tx.send_to(&[2u8; 10], to).unwrap();
        let mut bufs = RecvBufs::new(4, 50);
        assert!(!bufs.recv(&rx).unwrap());
        let got: Vec<_> = bufs.iter().map(|(d, _)| d.to_vec()).collect();
        assert_eq!(got, vec![vec![2u8; 10]]);
    }
}
