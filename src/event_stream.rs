//! Server-Sent Events (`text/event-stream`, the wire of `EventSource`): how messages,
//! control messages and heartbeats are written, and the answer's head.
//!
//! An event stream is a socket that only receives: after its head the gateway writes
//! events on the raw stream, through the same queue, fan-out and timers as a WebSocket
//! ([`crate::conn`]); only the encoding differs. A message is one event whose `data:`
//! lines are the payload, so `EventSource.onmessage` gets exactly what was published;
//! a payload that is not UTF-8 goes as base64 in an event named `binary`. On keys with
//! history each event carries `id: <label>:<id>`, which the browser sends back as
//! `Last-Event-ID` when it reconnects. Control messages (the envelope's `subscribed`,
//! `resumed`, `reset`, `gap`, and `close` before the gateway ends a stream) are events
//! named `wsrelay`, which `onmessage` does not see.

use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};

use crate::history::{envelope, StreamId};

/// How long a browser waits before it reconnects on its own (the `retry:` field).
pub const RETRY_MS: u32 = 2000;
/// A comment line: keeps proxies and the browser from timing an idle stream out.
pub const HEARTBEAT: &[u8] = b": heartbeat\n\n";
/// The name of control-message events.
pub const CONTROL_EVENT: &str = "wsrelay";

/// One message as an event: `id:` when it has one (`<label>:<id>`), `data:` lines.
pub fn message(id: Option<(&str, StreamId)>, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 32);
    if let Some((label, id)) = id {
        out.put_slice(format!("id: {label}:{id}\n").as_bytes());
    }
    match std::str::from_utf8(payload) {
        Ok(text) => data_lines(&mut out, text),
        Err(_) => {
            out.put_slice(b"event: binary\ndata: ");
            let encoded = base64::engine::general_purpose::STANDARD.encode(payload);
            out.put_slice(encoded.as_bytes());
            out.put_u8(b'\n');
        }
    }
    out.put_u8(b'\n');
    out.freeze()
}

/// A control message (envelope JSON, one line) as a `wsrelay` event.
pub fn control(json: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(json.len() + 24);
    out.put_slice(format!("event: {CONTROL_EVENT}\n").as_bytes());
    data_lines(&mut out, json);
    out.put_u8(b'\n');
    out.freeze()
}

/// `data: ` before every line of `text` (any of `\r\n`, `\r`, `\n` ends a line, as the
/// browser reads them), so that the browser joins them back with `\n`.
fn data_lines(out: &mut BytesMut, text: &str) {
    let mut rest = text;
    loop {
        let end = rest.find(['\r', '\n']).unwrap_or(rest.len());
        out.put_slice(b"data: ");
        out.put_slice(&rest.as_bytes()[..end]);
        out.put_u8(b'\n');
        if end == rest.len() {
            return;
        }
        let skip = if rest[end..].starts_with("\r\n") {
            2
        } else {
            1
        };
        rest = &rest[end + skip..];
    }
}

/// The answer's head and the stream's first bytes. `origin`: the request's `Origin`
/// when the policy allowed it, echoed for CORS with credentials.
pub fn response_head(origin: Option<&str>) -> Vec<u8> {
    head(origin, RETRY_MS.into())
}

/// An event stream's head, then `retry:` (ms) as its first bytes.
fn head(origin: Option<&str>, retry: u128) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
         x-accel-buffering: no\r\nconnection: close\r\n{}\r\nretry: {retry}\n\n",
        cors_headers(origin)
    )
    .into_bytes()
}

/// The answer to a stream refused for a while (the gateway stopping or full, a store
/// unavailable, too many connections from the address): `EventSource` gives up for good
/// on any status but 200, so a page would not come back after a restart. It gets an
/// empty stream instead, whose `retry:` (random, 2 to 10 s, so that refused browsers do
/// not return together) makes it reconnect on its own, and a `close` control message
/// with code 1013 and the refusal's reason.
///
/// `origin`: the request's `Origin` when the policy allows it: a cross-origin page that
/// cannot read the answer would give up as well.
pub fn try_again_later(reason: &str, origin: Option<&str>) -> Vec<u8> {
    let retry = 2000 + uuid::Uuid::new_v4().as_u128() % 8000;
    let mut answer = head(origin, retry);
    answer.extend_from_slice(&control(&envelope::close(TRY_AGAIN_LATER, reason)));
    answer
}

/// The close code of a stream refused for a while (a WebSocket's "try again later").
pub const TRY_AGAIN_LATER: u16 = 1013;

/// CORS headers for a request from `origin` that the policy allowed (none without one).
pub fn cors_headers(origin: Option<&str>) -> String {
    match origin {
        Some(origin) => format!(
            "access-control-allow-origin: {origin}\r\naccess-control-allow-credentials: true\r\nvary: origin\r\n"
        ),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(b: Bytes) -> String {
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn a_message_is_one_event_whose_data_lines_are_the_payload() {
        assert_eq!(text(message(None, b"hello")), "data: hello\n\n");
        assert_eq!(
            text(message(None, b"a\nb\r\nc\rd")),
            "data: a\ndata: b\ndata: c\ndata: d\n\n"
        );
        assert_eq!(text(message(None, b"")), "data: \n\n");
        assert_eq!(text(message(None, b"x\n")), "data: x\ndata: \n\n");
        let id = StreamId { ms: 17, seq: 2 };
        assert_eq!(
            text(message(Some(("group:staff", id)), b"m")),
            "id: group:staff:17-2\ndata: m\n\n"
        );
    }

    #[test]
    fn binary_payloads_go_in_base64_as_binary_events() {
        assert_eq!(
            text(message(None, &[0xFF, 0, 1])),
            "event: binary\ndata: /wAB\n\n"
        );
    }

    #[test]
    fn control_messages_are_wsrelay_events_and_cors_is_only_for_a_given_origin() {
        assert_eq!(
            text(control(r#"{"type":"gap"}"#)),
            "event: wsrelay\ndata: {\"type\":\"gap\"}\n\n"
        );
        let head = String::from_utf8(response_head(None)).unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(head.ends_with("\r\n\r\nretry: 2000\n\n"));
        assert!(!head.contains("access-control"));
        let head = String::from_utf8(response_head(Some("https://a.example"))).unwrap();
        assert!(head.contains("access-control-allow-origin: https://a.example\r\n"));
        assert!(head.contains("access-control-allow-credentials: true\r\n"));
    }
}
