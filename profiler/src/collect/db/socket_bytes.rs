//! Bytes each established TCP socket has carried, by socket inode, from the kernel's
//! sock_diag netlink interface (what `ss -ti` prints as `bytes_acked` and `bytes_received`):
//! one dump of the host's established sockets, no probe. The database coverage reads it at a
//! capture's start and end, so a connection no source decoded still shows how much it
//! carried meanwhile.

use std::collections::HashMap;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

/// By inode: (bytes sent and acknowledged by the peer, bytes received), since the
/// connection opened. A connection's SYN counts as one byte acknowledged (the kernel's
/// `bytes_acked` follows the acknowledged sequence number, which the SYN advances).
pub type SocketBytes = HashMap<u64, (u64, u64)>;

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const INET_DIAG_INFO: u16 = 2;
const TCP_ESTABLISHED: u32 = 1;
/// `struct nlmsghdr`, `struct inet_diag_msg`.
const NLMSG_HEADER: usize = 16;
const INET_DIAG_MSG: usize = 72;
/// In `struct tcp_info`: `tcpi_bytes_acked`, `tcpi_bytes_received` (u64 each, since 4.1/4.2).
const BYTES_ACKED_AT: usize = 120;
const BYTES_RECEIVED_AT: usize = 128;

/// The host's established TCP sockets (IPv4 and IPv6, this network namespace); empty when
/// sock_diag is unavailable.
pub fn established() -> SocketBytes {
    let mut out = SocketBytes::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        let _ = dump(family as u8, &mut out);
    }
    out
}

fn dump(family: u8, out: &mut SocketBytes) -> std::io::Result<()> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor we just opened and own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // nlmsghdr + inet_diag_req_v2 (family, protocol, ext, pad, states, an empty sockid).
    let mut request = [0u8; NLMSG_HEADER + 56];
    let len = request.len() as u32;
    request[0..4].copy_from_slice(&len.to_ne_bytes());
    request[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request[8..12].copy_from_slice(&1u32.to_ne_bytes());
    request[16] = family;
    request[17] = libc::IPPROTO_TCP as u8;
    request[18] = 1 << (INET_DIAG_INFO - 1);
    request[20..24].copy_from_slice(&(1u32 << TCP_ESTABLISHED).to_ne_bytes());
    // SAFETY: the buffer is valid for its length.
    let sent = unsafe { libc::send(fd.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: the buffer is valid for its length.
        let got =
            unsafe { libc::recv(fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0) };
        if got < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if got == 0 || parse(&buffer[..got as usize], out) {
            return Ok(());
        }
    }
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// Reads one datagram's messages into `out`; whether the dump is done.
fn parse(mut bytes: &[u8], out: &mut SocketBytes) -> bool {
    while bytes.len() >= NLMSG_HEADER {
        let len = u32_at(bytes, 0).unwrap_or(0) as usize;
        let kind = u16::from_ne_bytes([bytes[4], bytes[5]]);
        if len < NLMSG_HEADER || len > bytes.len() {
            return true;
        }
        match kind {
            NLMSG_DONE | NLMSG_ERROR => return true,
            SOCK_DIAG_BY_FAMILY => {
                let message = &bytes[NLMSG_HEADER..len];
                if let Some((inode, sent_received)) = socket(message) {
                    out.insert(inode, sent_received);
                }
            }
            _ => {}
        }
        bytes = &bytes[align(len).min(bytes.len())..];
    }
    false
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// An `inet_diag_msg` and its attributes: its inode, and its tcp_info's byte counts.
fn socket(message: &[u8]) -> Option<(u64, (u64, u64))> {
    let inode = u64::from(u32_at(message, 68)?);
    let mut attributes = message.get(INET_DIAG_MSG..)?;
    while attributes.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attributes[0], attributes[1]]));
        let kind = u16::from_ne_bytes([attributes[2], attributes[3]]);
        if len < 4 || len > attributes.len() {
            return None;
        }
        if kind == INET_DIAG_INFO {
            let info = &attributes[4..len];
            return Some((
                inode,
                (
                    u64_at(info, BYTES_ACKED_AT)?,
                    u64_at(info, BYTES_RECEIVED_AT)?,
                ),
            ));
        }
        attributes = &attributes[align(len).min(attributes.len())..];
    }
    None
}

/// What `now` carried since `start`, by inode: a socket `start` did not have opened since
/// (its SYN's byte taken off).
pub fn since(start: &SocketBytes, now: &SocketBytes) -> SocketBytes {
    now.iter()
        .map(|(inode, (sent, received))| {
            let (sent0, received0) = start
                .get(inode)
                .copied()
                .unwrap_or((u64::from(*sent > 0), 0));
            (
                *inode,
                (
                    sent.saturating_sub(sent0),
                    received.saturating_sub(received0),
                ),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::os::unix::fs::MetadataExt as _;

    fn inode(stream: &std::net::TcpStream) -> u64 {
        // A socket's fstat gives its inode (the one /proc/PID/fd names).
        let fd = stream.as_raw_fd();
        std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .unwrap()
            .ino()
    }

    /// A loopback connection that sends 1000 bytes and gets 500 back: sock_diag says so on
    /// both ends, and across a start snapshot only what came after it counts.
    #[test]
    fn a_connections_bytes_are_read_from_sock_diag() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let start = established();
        client.write_all(&[7u8; 1000]).unwrap();
        let mut buffer = [0u8; 1000];
        server.read_exact(&mut buffer).unwrap();
        server.write_all(&buffer[..500]).unwrap();
        client.read_exact(&mut buffer[..500]).unwrap();
        // The server's reply acknowledged the request; the client's acknowledgement of the
        // reply may still be on its way.
        let now = established();
        let (c, s) = (inode(&client), inode(&server));
        assert_eq!(now[&c], (1 + 1000, 500), "client: SYN + request, reply");
        assert_eq!(now[&s].1, 1000, "server: the request received");
        assert_eq!(start[&c], (1, 0), "client before: its SYN only");
        let delta = since(&start, &now);
        assert_eq!(delta[&c], (1000, 500));
        let fresh = since(&SocketBytes::new(), &now);
        assert_eq!(fresh[&c], (1000, 500), "opened during the capture: SYN off");
    }
}
