//! Mapping a delivery to HTTP request headers.
//!
//! | AMQP | HTTP header |
//! |---|---|
//! | content-type (default `application/octet-stream`) | `Content-Type` |
//! | content-encoding | `Content-Encoding` |
//! | message-id, correlation-id, type, reply-to, app-id | `X-Amqp-Message-Id`, `X-Amqp-Correlation-Id`, `X-Amqp-Type`, `X-Amqp-Reply-To`, `X-Amqp-App-Id` |
//! | routing key, exchange, redelivered | `X-Amqp-Routing-Key`, `X-Amqp-Exchange`, `X-Amqp-Redelivered` (`true`/`false`) |
//! | timestamp (seconds since the Unix epoch) | `X-Amqp-Timestamp` (the same integer) |
//! | the attempt number, 1-based | `X-Amqp-Attempt` |
//! | application header `name` with a string, number or boolean value | `X-Amqp-Header-<name>` |
//! | application headers `traceparent`, `tracestate` (W3C Trace Context, see [`crate::trace`]) | `traceparent` (same trace-id, the sidecar's span-id as parent-id), `tracestate` |
//!
//! A value that is not a legal HTTP header value (CR, LF or another control byte, RFC 9110
//! §5.5), a header name that is not an HTTP token, and a value of another type (table, array,
//! bytes, void) are left out and logged. They are never injected, and the request still goes.

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use reqwest::header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};

use crate::trace::{TRACEPARENT, TRACESTATE, TraceParent};

/// Prefix of the headers that carry AMQP application headers.
pub const APP_HEADER_PREFIX: &str = "x-amqp-header-";

/// The delivery fields the mapping reads.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    /// Exchange the message was published to ("" for the default exchange).
    pub exchange: &'a str,
    /// Routing key it was published with.
    pub routing_key: &'a str,
    /// The broker's redelivered flag.
    pub redelivered: bool,
    /// The message properties, application headers included.
    pub properties: &'a BasicProperties,
    /// This attempt, 1-based.
    pub attempt: u32,
    /// `tracing.start_traces`: a delivery without a `traceparent` starts a new trace.
    pub start_traces: bool,
}

/// A header that was left out, and why (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The AMQP property or header name.
    pub name: String,
    /// Why it was left out.
    pub reason: &'static str,
}

/// Builds the request headers; returns them with the list of what was left out.
#[must_use]
pub fn headers(env: &Envelope<'_>) -> (HeaderMap, Vec<Skipped>) {
    let mut map = HeaderMap::with_capacity(16);
    let mut skipped = Vec::new();
    let p = env.properties;

    if let Some(ct) = p.content_type() {
        put_str(
            &mut map,
            &mut skipped,
            CONTENT_TYPE,
            "content-type",
            ct.as_str(),
        );
    }
    // No content-type, or one that is not a legal header value: the documented default.
    if !map.contains_key(CONTENT_TYPE) {
        map.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
    }
    if let Some(v) = p.content_encoding() {
        put_str(
            &mut map,
            &mut skipped,
            CONTENT_ENCODING,
            "content-encoding",
            v.as_str(),
        );
    }
    let props = [
        ("x-amqp-message-id", "message-id", p.message_id()),
        (
            "x-amqp-correlation-id",
            "correlation-id",
            p.correlation_id(),
        ),
        ("x-amqp-type", "type", p.kind()),
        ("x-amqp-reply-to", "reply-to", p.reply_to()),
        ("x-amqp-app-id", "app-id", p.app_id()),
    ];
    for (header, prop, value) in props {
        if let Some(v) = value {
            put_str(
                &mut map,
                &mut skipped,
                HeaderName::from_static(header),
                prop,
                v.as_str(),
            );
        }
    }
    put_str(
        &mut map,
        &mut skipped,
        HeaderName::from_static("x-amqp-routing-key"),
        "routing-key",
        env.routing_key,
    );
    put_str(
        &mut map,
        &mut skipped,
        HeaderName::from_static("x-amqp-exchange"),
        "exchange",
        env.exchange,
    );
    map.insert(
        HeaderName::from_static("x-amqp-redelivered"),
        HeaderValue::from_static(if env.redelivered { "true" } else { "false" }),
    );
    if let Some(ts) = p.timestamp() {
        map.insert(
            HeaderName::from_static("x-amqp-timestamp"),
            HeaderValue::from(*ts),
        );
    }
    map.insert(
        HeaderName::from_static("x-amqp-attempt"),
        HeaderValue::from(env.attempt),
    );
    if let Some(table) = p.headers() {
        app_headers(table, &mut map, &mut skipped);
    }
    trace_context(p.headers().as_ref(), env.start_traces, &mut map);
    (map, skipped)
}

/// The W3C Trace Context headers of the request (see [`crate::trace`]): the delivery's
/// `traceparent` continued with a new span-id, its `tracestate` along with it; a malformed
/// `traceparent` is dropped with its `tracestate`; none at all starts a trace only with
/// `start_traces`.
fn trace_context(table: Option<&FieldTable>, start_traces: bool, map: &mut HeaderMap) {
    let get = |name: &str| {
        table
            .and_then(|t| t.inner().get(&lapin::types::ShortString::from(name)))
            .and_then(scalar_text)
    };
    let incoming = get(TRACEPARENT);
    let parent = match incoming.as_deref().map(TraceParent::parse) {
        Some(Some(parent)) => parent.child(&mut rand::rng()),
        Some(None) => return,
        None if start_traces => TraceParent::start(&mut rand::rng()),
        None => return,
    };
    if let Ok(v) = HeaderValue::from_str(&parent.to_header()) {
        map.insert(HeaderName::from_static(TRACEPARENT), v);
    }
    if incoming.is_some()
        && let Some(state) = get(TRACESTATE)
        && let Ok(v) = HeaderValue::from_str(&state)
    {
        map.insert(HeaderName::from_static(TRACESTATE), v);
    }
}

/// Why a value that was not UTF-8 on the wire is left out. The AMQP client decodes such a
/// short string lossily (U+FFFD for each bad sequence; see vendor/README.md), so the value
/// the worker would get is not the one that was published.
const NOT_UTF8: &str = "value was not valid UTF-8 on the wire";

fn put_str(
    map: &mut HeaderMap,
    skipped: &mut Vec<Skipped>,
    name: HeaderName,
    prop: &str,
    value: &str,
) {
    if value.contains(char::REPLACEMENT_CHARACTER) {
        skipped.push(Skipped {
            name: prop.to_owned(),
            reason: NOT_UTF8,
        });
        return;
    }
    match HeaderValue::from_str(value) {
        Ok(v) => {
            map.insert(name, v);
        }
        Err(_) => skipped.push(Skipped {
            name: prop.to_owned(),
            reason: "value has control characters (CR, LF, ...) or is not visible ASCII",
        }),
    }
}

fn app_headers(table: &FieldTable, map: &mut HeaderMap, skipped: &mut Vec<Skipped>) {
    for (key, value) in table.inner() {
        let text = match scalar_text(value) {
            Some(t) if t.contains(char::REPLACEMENT_CHARACTER) => {
                skipped.push(Skipped {
                    name: key.to_string(),
                    reason: NOT_UTF8,
                });
                continue;
            }
            Some(t) => t,
            None if matches!(value, AMQPValue::LongString(_)) => {
                skipped.push(Skipped {
                    name: key.to_string(),
                    reason: NOT_UTF8,
                });
                continue;
            }
            None => {
                skipped.push(Skipped {
                    name: key.to_string(),
                    reason: "value is not a string, number or boolean",
                });
                continue;
            }
        };
        let name =
            match HeaderName::from_bytes(format!("{APP_HEADER_PREFIX}{}", key.as_str()).as_bytes())
            {
                Ok(n) => n,
                Err(_) => {
                    skipped.push(Skipped {
                        name: key.to_string(),
                        reason: "name is not a valid HTTP header name",
                    });
                    continue;
                }
            };
        match HeaderValue::from_str(&text) {
            // from_str accepts only visible ASCII, space and tab: no CR, LF or NUL.
            Ok(v) => {
                map.append(name, v);
            }
            Err(_) => skipped.push(Skipped {
                name: key.to_string(),
                reason: "value has control characters (CR, LF, ...) or is not visible ASCII",
            }),
        }
    }
}

/// The text of a string, number or boolean value; `None` for anything else.
fn scalar_text(v: &AMQPValue) -> Option<String> {
    Some(match v {
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::DecimalValue(d) => {
            let value = i128::from(d.value);
            let scale = u32::from(d.scale);
            if scale == 0 {
                value.to_string()
            } else {
                let div = 10i128.pow(scale);
                format!(
                    "{}{}.{:0width$}",
                    if value < 0 { "-" } else { "" },
                    (value / div).abs(),
                    (value % div).abs(),
                    width = scale as usize
                )
            }
        }
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok()?,
        AMQPValue::FieldArray(_)
        | AMQPValue::FieldTable(_)
        | AMQPValue::ByteArray(_)
        | AMQPValue::Void => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{LongString, ShortString};

    /// A header table of `(name, value)` pairs.
    fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert(k.into(), v);
        }
        t
    }

    fn text(v: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(v))
    }

    fn props_with(headers: FieldTable) -> BasicProperties {
        BasicProperties::default()
            .with_message_id(ShortString::from("m-1"))
            .with_timestamp(1_700_000_000)
            .with_headers(headers)
    }

    #[test]
    fn maps_properties_and_headers() {
        let p = props_with(table(vec![
            ("tenant", text("acme")),
            ("n", AMQPValue::LongInt(-4)),
            ("ok", AMQPValue::Boolean(true)),
            ("nested", AMQPValue::FieldTable(FieldTable::default())),
        ]));
        let (h, skipped) = headers(&Envelope {
            exchange: "ex",
            routing_key: "rk",
            redelivered: true,
            properties: &p,
            attempt: 2,
            start_traces: false,
        });
        assert_eq!(h["content-type"], "application/octet-stream");
        assert_eq!(h["x-amqp-message-id"], "m-1");
        assert_eq!(h["x-amqp-timestamp"], "1700000000");
        assert_eq!(h["x-amqp-attempt"], "2");
        assert_eq!(h["x-amqp-redelivered"], "true");
        assert_eq!(h["x-amqp-header-tenant"], "acme");
        assert_eq!(h["x-amqp-header-n"], "-4");
        assert_eq!(h["x-amqp-header-ok"], "true");
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].name, "nested");
    }

    #[test]
    fn never_injects_crlf() {
        let t = table(vec![
            ("evil", text("a\r\nX-Injected: yes")),
            ("bad name", text("v")),
        ]);
        let p = props_with(t).with_correlation_id(ShortString::from("c\nd"));
        let (h, skipped) = headers(&Envelope {
            exchange: "",
            routing_key: "rk",
            redelivered: false,
            properties: &p,
            attempt: 1,
            start_traces: false,
        });
        assert!(h.get("x-injected").is_none());
        assert!(h.get("x-amqp-header-evil").is_none());
        assert!(h.get("x-amqp-correlation-id").is_none());
        let names: Vec<_> = skipped.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["correlation-id", "bad name", "evil"]);
    }

    #[test]
    fn lossy_and_illegal_values_are_left_out_and_content_type_defaults() {
        let t = table(vec![
            (
                "raw",
                AMQPValue::LongString(LongString::from(b"\xff\xfe".to_vec())),
            ),
            ("x-\u{FFFD}", text("v")),
        ]);
        let p = props_with(t)
            .with_message_id(ShortString::from("\u{FFFD}\u{FFFD}"))
            .with_content_type(ShortString::from("text/plain\r\nX-Injected: 1"));
        let (h, skipped) = headers(&Envelope {
            exchange: "",
            routing_key: "rk\u{FFFD}",
            redelivered: false,
            properties: &p,
            attempt: 1,
            start_traces: false,
        });
        assert_eq!(h["content-type"], "application/octet-stream");
        assert!(h.get("x-amqp-message-id").is_none());
        assert!(h.get("x-amqp-routing-key").is_none());
        assert!(h.get("x-amqp-header-raw").is_none());
        let mut names: Vec<_> = skipped
            .iter()
            .map(|s| (s.name.as_str(), s.reason))
            .collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                (
                    "content-type",
                    "value has control characters (CR, LF, ...) or is not visible ASCII"
                ),
                ("message-id", NOT_UTF8),
                ("raw", NOT_UTF8),
                ("routing-key", NOT_UTF8),
                ("x-\u{FFFD}", "name is not a valid HTTP header name"),
            ]
        );
    }

    #[test]
    fn decimal_values_render() {
        use lapin::types::DecimalValue;
        assert_eq!(
            scalar_text(&AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 12345
            }))
            .as_deref(),
            Some("123.45")
        );
    }

    fn with_headers(pairs: &[(&str, &str)], start_traces: bool) -> HeaderMap {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert(
                lapin::types::ShortString::from(*k),
                AMQPValue::LongString((*v).into()),
            );
        }
        let props = BasicProperties::default().with_headers(t);
        headers(&Envelope {
            exchange: "",
            routing_key: "q",
            redelivered: false,
            properties: &props,
            attempt: 1,
            start_traces,
        })
        .0
    }

    /// W3C Trace Context: the trace continues with a new parent-id, tracestate goes along,
    /// and the originals stay as X-Amqp-Header-*.
    #[test]
    fn a_traceparent_is_continued_with_a_new_span() {
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let h = with_headers(
            &[("traceparent", incoming), ("tracestate", "vendor=opaque")],
            false,
        );
        let out = h["traceparent"].to_str().expect("ascii");
        let parsed = crate::trace::TraceParent::parse(out).expect("valid");
        assert_eq!(parsed.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(out, incoming, "the sidecar's own span-id is the parent");
        assert_eq!(h["tracestate"], "vendor=opaque");
        assert_eq!(h["x-amqp-header-traceparent"], incoming);
    }

    #[test]
    fn a_malformed_traceparent_is_dropped_with_its_tracestate() {
        let h = with_headers(
            &[("traceparent", "00-not-a-trace-01"), ("tracestate", "a=b")],
            true,
        );
        assert!(!h.contains_key("traceparent"), "no new trace either");
        assert!(!h.contains_key("tracestate"));
        assert_eq!(h["x-amqp-header-traceparent"], "00-not-a-trace-01");
    }

    #[test]
    fn no_traceparent_starts_a_trace_only_when_asked() {
        assert!(!with_headers(&[], false).contains_key("traceparent"));
        let h = with_headers(&[("tracestate", "a=b")], true);
        let started = h["traceparent"].to_str().expect("ascii");
        assert!(crate::trace::TraceParent::parse(started).is_some());
        assert!(
            !h.contains_key("tracestate"),
            "a tracestate without its traceparent belongs to no trace"
        );
    }
}
