//! Data-plane addresses: where a member's data plane listens, as members announce it in
//! their heartbeats and as peers read it back to connect.
//!
//! The text form is `<transport>/<socket address>`, e.g. `quic/10.0.0.7:4413` or
//! `tcp/[::1]:5000`. One type, [`DataPlaneAddr`], writes it ([`std::fmt::Display`]) and
//! reads it ([`std::str::FromStr`]); on the wire it is that text (so a heartbeat decodes
//! only with a well-formed address, at most [`MAX_DATA_ADDR_LEN`] bytes). A member that
//! listens on an unspecified IP (`0.0.0.0`, `::`) announces it as such; a peer replaces it
//! with the IP it sees that member's connections come from ([`DataPlaneAddr::resolve`]).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// Longest data-plane address text, in bytes. The longest well-formed one (QUIC, an IPv6
/// address with a scope id, port 65535) is 63 bytes; the bound is the one every announced
/// address has (`membership::MAX_ADDR_LEN`).
pub const MAX_DATA_ADDR_LEN: usize = crate::membership::MAX_ADDR_LEN;

/// How members' data planes talk to each other. Every member of a cluster must run the
/// same one. Default: QUIC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// QUIC with libp2p-tls (encrypted). Text form `quic`.
    #[default]
    Quic,
    /// Plain TCP, authenticated at connect time (unencrypted payloads). Text form `tcp`.
    Tcp,
}

impl Transport {
    /// The text form: `quic` or `tcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Transport {
    type Err = AddrError;
    fn from_str(s: &str) -> Result<Self, AddrError> {
        match s {
            "quic" => Ok(Transport::Quic),
            "tcp" => Ok(Transport::Tcp),
            other => Err(AddrError::UnknownTransport(truncated(other))),
        }
    }
}

/// Where a member's data plane listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DataPlaneAddr {
    /// The transport it speaks.
    pub transport: Transport,
    /// The socket it listens on (the IP may be unspecified: see [`DataPlaneAddr::resolve`]).
    pub addr: SocketAddr,
}

/// Why a text is not a [`DataPlaneAddr`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// Longer than [`MAX_DATA_ADDR_LEN`] bytes.
    #[error("data-plane address of {0} bytes, limit {MAX_DATA_ADDR_LEN}")]
    TooLong(usize),
    /// No `/` between transport and socket address.
    #[error("data-plane address is not <transport>/<ip>:<port>")]
    NoTransport,
    /// The transport is neither `quic` nor `tcp` (its first 32 bytes at most).
    #[error("unknown data-plane transport '{0}' (quic or tcp)")]
    UnknownTransport(String),
    /// The part after the transport is not `<ip>:<port>`.
    #[error("data-plane socket address: {0}")]
    Socket(#[from] std::net::AddrParseError),
}

/// At most the first 32 bytes of `s` (on a char boundary), for error messages.
fn truncated(s: &str) -> String {
    let mut end = s.len().min(32);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

impl DataPlaneAddr {
    /// An address.
    pub fn new(transport: Transport, addr: SocketAddr) -> DataPlaneAddr {
        DataPlaneAddr { transport, addr }
    }

    /// The socket address to connect to: the announced one, or, when it was announced
    /// with an unspecified IP (the member listens on every interface), the same port at
    /// `seen`, the IP the member's control-plane connection comes from. `None` when the
    /// IP is unspecified and no such IP is known.
    pub fn resolve(&self, seen: Option<IpAddr>) -> Option<SocketAddr> {
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(seen?);
        }
        Some(addr)
    }
}

impl fmt::Display for DataPlaneAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.transport, self.addr)
    }
}

impl FromStr for DataPlaneAddr {
    type Err = AddrError;
    fn from_str(s: &str) -> Result<Self, AddrError> {
        if s.len() > MAX_DATA_ADDR_LEN {
            return Err(AddrError::TooLong(s.len()));
        }
        let (transport, addr) = s.split_once('/').ok_or(AddrError::NoTransport)?;
        Ok(DataPlaneAddr {
            transport: transport.parse()?,
            addr: addr.parse()?,
        })
    }
}

impl TryFrom<String> for DataPlaneAddr {
    type Error = AddrError;
    fn try_from(s: String) -> Result<Self, AddrError> {
        s.parse()
    }
}

impl From<DataPlaneAddr> for String {
    fn from(a: DataPlaneAddr) -> String {
        a.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};

    #[test]
    fn text_round_trips() {
        let cases = [
            DataPlaneAddr::new(Transport::Quic, "10.0.0.7:4413".parse().unwrap()),
            DataPlaneAddr::new(Transport::Tcp, "[::1]:5000".parse().unwrap()),
            DataPlaneAddr::new(Transport::Tcp, "0.0.0.0:0".parse().unwrap()),
            DataPlaneAddr::new(
                Transport::Quic,
                SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::new(
                        0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff,
                    ),
                    65535,
                    0,
                    u32::MAX,
                )),
            ),
        ];
        for a in cases {
            let text = a.to_string();
            assert!(text.len() <= 63, "{text}");
            assert_eq!(text.parse::<DataPlaneAddr>(), Ok(a), "{text}");
        }
        assert_eq!(cases[0].to_string(), "quic/10.0.0.7:4413");
        assert_eq!(cases[1].to_string(), "tcp/[::1]:5000");
    }

    #[test]
    fn garbage_is_refused_with_its_reason() {
        let parse = |s: &str| s.parse::<DataPlaneAddr>();
        assert_eq!(parse(""), Err(AddrError::NoTransport));
        assert_eq!(parse("10.0.0.7:4413"), Err(AddrError::NoTransport));
        assert_eq!(
            parse("udp/10.0.0.7:4413"),
            Err(AddrError::UnknownTransport("udp".into()))
        );
        assert_eq!(
            parse("QUIC/10.0.0.7:4413"),
            Err(AddrError::UnknownTransport("QUIC".into()))
        );
        for bad in [
            "quic/",
            "quic/10.0.0.7",
            "quic/10.0.0.7:99999",
            "quic/host.example:4413",
            "quic/10.0.0.7:4413/x",
            "tcp/::1:5000",
        ] {
            assert!(matches!(parse(bad), Err(AddrError::Socket(_))), "{bad}");
        }
        let long = format!("{}/1.2.3.4:5", "q".repeat(MAX_DATA_ADDR_LEN));
        assert_eq!(parse(&long), Err(AddrError::TooLong(long.len())));
        // An unknown transport is quoted at most 32 bytes long, cut on a char boundary.
        let wide = format!("{}/1.2.3.4:5", "é".repeat(40));
        match parse(&wide) {
            Err(AddrError::UnknownTransport(t)) => assert_eq!(t, "é".repeat(16)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn wire_form_is_the_text() {
        let a = DataPlaneAddr::new(Transport::Tcp, "127.0.0.1:5000".parse().unwrap());
        let bytes = crate::codec::encode_limited::<_, 1024>(&a).unwrap();
        let text: String = crate::codec::decode_limited::<_, 1024>(&bytes).unwrap();
        assert_eq!(text, "tcp/127.0.0.1:5000");
        assert_eq!(
            crate::codec::decode_limited::<DataPlaneAddr, 1024>(&bytes).unwrap(),
            a
        );
        let garbage = crate::codec::encode_limited::<_, 1024>(&"tcp/nowhere").unwrap();
        assert!(crate::codec::decode_limited::<DataPlaneAddr, 1024>(&garbage).is_err());
    }

    #[test]
    fn unspecified_ip_resolves_to_the_seen_one() {
        let seen = Some(IpAddr::V4(Ipv4Addr::new(192, 168, 1, 9)));
        let any = DataPlaneAddr::new(Transport::Quic, "0.0.0.0:4413".parse().unwrap());
        assert_eq!(any.resolve(seen), Some("192.168.1.9:4413".parse().unwrap()));
        assert_eq!(any.resolve(None), None);
        let any6 = DataPlaneAddr::new(Transport::Quic, "[::]:4413".parse().unwrap());
        assert_eq!(
            any6.resolve(seen),
            Some("192.168.1.9:4413".parse().unwrap())
        );
        let fixed = DataPlaneAddr::new(Transport::Tcp, "10.0.0.7:5000".parse().unwrap());
        assert_eq!(fixed.resolve(seen), Some("10.0.0.7:5000".parse().unwrap()));
        assert_eq!(fixed.resolve(None), Some("10.0.0.7:5000".parse().unwrap()));
    }
}
