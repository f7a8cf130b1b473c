//! A minimal raw AMQP 0-9-1 publisher, for messages that no client library will build: short
//! strings (message-id, type, header keys) that are not UTF-8. The broker accepts them (AMQP
//! short strings are octets, spec §4.2.5.3), and the sidecar must survive them.
//!
//! Frames as in the AMQP 0-9-1 spec §2.3.5 and §4.2.3: type, channel, size, payload, 0xCE.
//! It speaks just enough of the protocol to publish one message with confirms.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Basic properties given as raw bytes where the protocol has short strings.
#[derive(Default)]
pub struct RawProperties {
    pub message_id: Option<Vec<u8>>,
    pub kind: Option<Vec<u8>>,
    /// Application headers: (raw key, long-string value).
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
}

fn short(out: &mut Vec<u8>, s: &[u8]) {
    out.push(u8::try_from(s.len()).expect("short string <= 255 bytes"));
    out.extend_from_slice(s);
}

fn long(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&u32::try_from(s.len()).expect("size").to_be_bytes());
    out.extend_from_slice(s);
}

fn method(class: u16, method: u16, args: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + args.len());
    p.extend_from_slice(&class.to_be_bytes());
    p.extend_from_slice(&method.to_be_bytes());
    p.extend_from_slice(args);
    p
}

async fn send(s: &mut TcpStream, kind: u8, channel: u16, payload: &[u8]) {
    let mut f = Vec::with_capacity(8 + payload.len());
    f.push(kind);
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(&u32::try_from(payload.len()).expect("size").to_be_bytes());
    f.extend_from_slice(payload);
    f.push(0xCE);
    s.write_all(&f).await.expect("write frame");
}

/// Reads frames until a method frame of `(class, method)`; returns its arguments.
async fn expect(s: &mut TcpStream, class: u16, meth: u16) -> Vec<u8> {
    loop {
        let mut head = [0u8; 7];
        s.read_exact(&mut head).await.expect("frame header");
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut payload = vec![0u8; size + 1];
        s.read_exact(&mut payload).await.expect("frame payload");
        if head[0] != 1 {
            continue;
        }
        let got = (
            u16::from_be_bytes([payload[0], payload[1]]),
            u16::from_be_bytes([payload[2], payload[3]]),
        );
        assert_ne!(
            got,
            (10, 50),
            "the broker closed the connection: {:?}",
            String::from_utf8_lossy(&payload)
        );
        if got == (class, meth) {
            payload.truncate(size);
            return payload.split_off(4);
        }
    }
}

/// Publishes `body` to the default exchange with routing key `queue`, persistent, with the
/// raw properties, and waits for the publisher confirm. `url` is an `amqp://` URL.
pub async fn publish(url: &str, queue: &str, body: &[u8], props: &RawProperties) {
    let uri: lapin::uri::AMQPUri = url.parse().expect("AMQP URL");
    let addr = format!("{}:{}", uri.authority.host, uri.authority.port);
    let work = async {
        let mut s = TcpStream::connect(&addr).await.expect("connect");
        s.write_all(b"AMQP\x00\x00\x09\x01").await.expect("header");
        expect(&mut s, 10, 10).await; // connection.start
        let mut args = Vec::new();
        args.extend_from_slice(&0u32.to_be_bytes()); // client-properties: empty table
        short(&mut args, b"PLAIN");
        let creds = format!(
            "\0{}\0{}",
            uri.authority.userinfo.username, uri.authority.userinfo.password
        );
        long(&mut args, creds.as_bytes());
        short(&mut args, b"en_US");
        send(&mut s, 1, 0, &method(10, 11, &args)).await; // start-ok
        let tune = expect(&mut s, 10, 30).await;
        let mut args = tune[..6].to_vec(); // channel-max, frame-max as offered
        args.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
        send(&mut s, 1, 0, &method(10, 31, &args)).await; // tune-ok
        let mut args = Vec::new();
        short(&mut args, uri.vhost.as_bytes());
        short(&mut args, b"");
        args.push(0);
        send(&mut s, 1, 0, &method(10, 40, &args)).await; // connection.open
        expect(&mut s, 10, 41).await;
        send(&mut s, 1, 1, &method(20, 10, &[0])).await; // channel.open
        expect(&mut s, 20, 11).await;
        send(&mut s, 1, 1, &method(85, 10, &[0])).await; // confirm.select
        expect(&mut s, 85, 11).await;
        let mut args = 0u16.to_be_bytes().to_vec();
        short(&mut args, b"");
        short(&mut args, queue.as_bytes());
        args.push(0);
        send(&mut s, 1, 1, &method(60, 40, &args)).await; // basic.publish
        // Content header: class, weight, body size, property flags, properties in flag order.
        let mut flags = 1u16 << 12; // delivery-mode
        let mut list = Vec::new();
        if !props.headers.is_empty() {
            flags |= 1 << 13;
            let mut table = Vec::new();
            for (k, v) in &props.headers {
                short(&mut table, k);
                table.push(b'S');
                long(&mut table, v);
            }
            long(&mut list, &table);
        }
        list.push(2);
        if let Some(id) = &props.message_id {
            flags |= 1 << 7;
            short(&mut list, id);
        }
        if let Some(kind) = &props.kind {
            flags |= 1 << 5;
            short(&mut list, kind);
        }
        let mut header = 60u16.to_be_bytes().to_vec();
        header.extend_from_slice(&0u16.to_be_bytes());
        header.extend_from_slice(&(body.len() as u64).to_be_bytes());
        header.extend_from_slice(&flags.to_be_bytes());
        header.extend_from_slice(&list);
        send(&mut s, 2, 1, &header).await;
        send(&mut s, 3, 1, body).await;
        expect(&mut s, 60, 80).await; // basic.ack: confirmed
        let mut args = 200u16.to_be_bytes().to_vec();
        short(&mut args, b"bye");
        args.extend_from_slice(&[0, 0, 0, 0]);
        send(&mut s, 1, 0, &method(10, 50, &args)).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), expect(&mut s, 10, 51)).await;
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .expect("raw publish within 10 s");
}
