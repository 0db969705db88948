//! Bytes to one DNS server and back, under one deadline: UDP (with retransmission) and TCP
//! (RFC 1035 §4.2.2 two-byte length framing). Knows nothing of DNS semantics beyond the
//! message ID; the client decides what an answer means.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{timeout_at, Instant};

/// A UDP query is sent again after this long without an answer (at most `UDP_MAX_SENDS` times
/// within the request's timeout): one lost datagram must not cost the whole timeout.
pub const UDP_RETRANSMIT: Duration = Duration::from_millis(1000);
/// Most datagrams sent for one UDP query.
pub const UDP_MAX_SENDS: u32 = 3;
/// Largest UDP answer accepted (and advertised through EDNS): the DNS flag day 2020 size.
pub const UDP_PAYLOAD: u16 = 1232;

/// Why an exchange produced no answer.
#[derive(Debug)]
pub enum Failure {
    Timeout,
    Io(io::Error),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Io(e)
    }
}

/// Resolves `host:port` (a literal address needs no lookup).
pub async fn resolve(server: &str, deadline: Instant) -> Result<Vec<SocketAddr>, Failure> {
    if let Ok(a) = server.parse::<SocketAddr>() {
        return Ok(vec![a]);
    }
    let addrs = timeout_at(deadline, tokio::net::lookup_host(server))
        .await
        .map_err(|_| Failure::Timeout)??;
    let addrs: Vec<SocketAddr> = addrs.collect();
    if addrs.is_empty() {
        return Err(Failure::Io(io::Error::new(
            io::ErrorKind::NotFound,
            "the name has no addresses",
        )));
    }
    Ok(addrs)
}

fn unspecified(addr: &SocketAddr) -> SocketAddr {
    if addr.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    }
}

/// Sends `query` by UDP and returns the first datagram from `addr` carrying the same ID.
/// Datagrams with another ID (late answers, spoofing attempts) are ignored.
pub async fn udp(addr: SocketAddr, query: &[u8], deadline: Instant) -> Result<Vec<u8>, Failure> {
    let id = [query[0], query[1]];
    let sock = UdpSocket::bind(unspecified(&addr)).await?;
    // Connected, so ICMP port-unreachable surfaces as ECONNREFUSED and other senders are dropped.
    sock.connect(addr).await?;
    let mut buf = vec![0u8; usize::from(UDP_PAYLOAD).max(512) + 512];
    let mut sends = 0;
    loop {
        if sends < UDP_MAX_SENDS {
            sock.send(query).await?;
            sends += 1;
        }
        let wait = if sends < UDP_MAX_SENDS {
            deadline.min(Instant::now() + UDP_RETRANSMIT)
        } else {
            deadline
        };
        loop {
            match timeout_at(wait, sock.recv(&mut buf)).await {
                Err(_) if wait >= deadline => return Err(Failure::Timeout),
                Err(_) => break,
                Ok(Err(e)) => return Err(Failure::Io(e)),
                Ok(Ok(n)) if n >= 12 && buf[..2] == id => return Ok(buf[..n].to_vec()),
                Ok(Ok(_)) => continue,
            }
        }
    }
}

/// Sends `msg` over a new TCP connection and reads one length-prefixed answer.
pub async fn tcp(addr: SocketAddr, msg: &[u8], deadline: Instant) -> Result<Vec<u8>, Failure> {
    let len = u16::try_from(msg.len()).map_err(|_| {
        Failure::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            "message too long",
        ))
    })?;
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut out = Vec::with_capacity(msg.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(msg);
        stream.write_all(&out).await?;
        let mut lenbuf = [0u8; 2];
        stream.read_exact(&mut lenbuf).await?;
        let mut answer = vec![0u8; usize::from(u16::from_be_bytes(lenbuf))];
        stream.read_exact(&mut answer).await?;
        Ok::<_, io::Error>(answer)
    };
    timeout_at(deadline, exchange)
        .await
        .map_err(|_| Failure::Timeout)?
        .map_err(Failure::Io)
}
