//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): a delivery's `traceparent`
//! application header continues into the HTTP request to the worker.
//!
//! The sidecar is a hop of its own: the request carries the publisher's trace-id with a new
//! parent-id (the sidecar's span-id), so the worker's span is a child of the sidecar's, and
//! the sidecar's a child of the publisher's. `tracestate` goes along unchanged. A
//! `traceparent` that does not parse is dropped, with its `tracestate`, as §3.2.2 and §3.3
//! of the spec say, and no new trace is started for it; the request still goes. The
//! original values stay available to the worker as `X-Amqp-Header-traceparent` and
//! `X-Amqp-Header-tracestate`.

use rand::Rng;

/// The header names (§3.2 and §3.3).
pub const TRACEPARENT: &str = "traceparent";
/// See [`TRACEPARENT`].
pub const TRACESTATE: &str = "tracestate";

/// A parsed `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace-id, 16 bytes, not all zero.
    pub trace_id: [u8; 16],
    /// The parent-id (the caller's span-id), 8 bytes, not all zero.
    pub parent_id: [u8; 8],
    /// The trace-flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` value (§3.2.2): `version-traceid-parentid-flags` in lowercase
    /// hex. Version 00 must be exactly 55 characters; a higher version may carry more
    /// fields after a `-`, which are ignored (§3.2.4, forward compatibility); version `ff`
    /// is invalid. `None` when it does not parse.
    #[must_use]
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim_matches(|c| c == ' ' || c == '\t');
        let bytes = value.as_bytes();
        if bytes.len() < 55 {
            return None;
        }
        let version = hex::<1>(&value[0..2])?[0];
        if version == 0xff || (version == 0 && bytes.len() != 55) {
            return None;
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        if bytes.len() > 55 && bytes[55] != b'-' {
            return None;
        }
        let trace_id = hex::<16>(&value[3..35])?;
        let parent_id = hex::<8>(&value[36..52])?;
        let flags = hex::<1>(&value[53..55])?[0];
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// A new trace (`tracing.start_traces`): a random trace-id, sampled.
    #[must_use]
    pub fn start<R: Rng + ?Sized>(rng: &mut R) -> Self {
        Self {
            trace_id: nonzero(rng),
            parent_id: nonzero(rng),
            flags: 0x01,
        }
    }

    /// The `traceparent` for the next hop: the same trace-id and flags, with a new span-id
    /// (the sidecar's) as the parent-id. Always version 00, the version this code knows.
    #[must_use]
    pub fn child<R: Rng + ?Sized>(&self, rng: &mut R) -> Self {
        Self {
            parent_id: nonzero(rng),
            ..*self
        }
    }

    /// The header value, version 00.
    #[must_use]
    pub fn to_header(&self) -> String {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        push_hex(&mut s, &self.trace_id);
        s.push('-');
        push_hex(&mut s, &self.parent_id);
        s.push('-');
        push_hex(&mut s, &[self.flags]);
        s
    }

    /// The trace-id in lowercase hex (for logs).
    #[must_use]
    pub fn trace_id_hex(&self) -> String {
        let mut s = String::with_capacity(32);
        push_hex(&mut s, &self.trace_id);
        s
    }
}

fn nonzero<const N: usize, R: Rng + ?Sized>(rng: &mut R) -> [u8; N] {
    loop {
        let mut b = [0u8; N];
        rng.fill(&mut b[..]);
        if b != [0; N] {
            return b;
        }
    }
}

/// Lowercase hex only (§3.2.2: uppercase is invalid).
fn hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let bytes = s.as_bytes();
    if bytes.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_spec_example_and_keeps_the_trace_in_a_child() {
        let p = TraceParent::parse(VALID).expect("valid");
        assert_eq!(p.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(p.flags, 1);
        assert_eq!(p.to_header(), VALID, "round trip");
        let child = p.child(&mut StdRng::seed_from_u64(1));
        assert_eq!(child.trace_id, p.trace_id);
        assert_eq!(child.flags, p.flags);
        assert_ne!(child.parent_id, p.parent_id, "a new span-id");
        let header = child.to_header();
        assert!(header.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert_eq!(TraceParent::parse(&header), Some(child));
    }

    /// §3.2.2: each malformed form is dropped.
    #[test]
    fn rejects_what_the_spec_rejects() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "0-4bf92f3577b34da6a3ce929d0e0e47366-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    /// §3.2.4: a later version may add fields; the first four are read.
    #[test]
    fn a_later_version_with_more_fields_is_read() {
        let v = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future";
        let p = TraceParent::parse(v).expect("forward compatible");
        assert_eq!(p.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x"),
            None
        );
    }

    #[test]
    fn a_started_trace_is_valid_and_sampled() {
        let p = TraceParent::start(&mut StdRng::seed_from_u64(9));
        assert_eq!(p.flags, 1);
        assert_eq!(TraceParent::parse(&p.to_header()), Some(p));
    }
}
