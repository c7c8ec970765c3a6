//! The per-connection outbound queue, bounded in bytes.
//!
//! The fan-out ([`crate::registry::Registry::dispatch`]) pushes into an [`Outbox`] without
//! ever waiting: a push either fits under the byte bound or marks the outbox as
//! overflowed. The connection task is the only reader and the only thing that waits on
//! its socket. When a client reads too slowly, its outbox overflows and the connection
//! closes with [`crate::conn::CloseReason::SlowConsumer`]; nothing grows without bound.
//!
//! Bytes count from the push until the connection task has handed the frame to the
//! socket writer, so a socket whose writes are stuck still holds at most the bound.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use bytestring::ByteString;
use tokio::sync::Notify;
use tokio::time::Instant;

/// A message on its way to sockets. Cloning shares the payload (no copy per socket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Text(ByteString),
    Binary(Bytes),
}

impl Frame {
    /// A payload from the broker carries no type: valid UTF-8 goes out as a text frame,
    /// anything else as binary. The check runs once per message, not once per socket.
    pub fn from_payload(payload: Bytes) -> Frame {
        // The clone is a reference count, kept for the binary case.
        match ByteString::try_from(payload.clone()) {
            Ok(text) => Frame::Text(text),
            Err(_) => Frame::Binary(payload),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Frame::Text(t) => t.as_bytes(),
            Frame::Binary(b) => b,
        }
    }

    /// The payload as shared bytes.
    pub fn payload(&self) -> Bytes {
        match self {
            Frame::Text(t) => t.as_bytes().clone(),
            Frame::Binary(b) => b.clone(),
        }
    }

    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A frame in an outbox, with the time the broker received it (for the latency metric).
#[derive(Debug, Clone)]
pub struct Queued {
    pub frame: Frame,
    pub received: Instant,
}

/// What [`Outbox::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The bound was hit now: the connection must close as a slow consumer.
    Overflowed,
    /// The outbox had already overflowed or closed; the frame was dropped.
    Refused,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Queued>,
    /// Bytes queued plus bytes taken but not yet written (see [`Outbox::written`]).
    bytes: usize,
    overflowed: bool,
}

/// A bounded queue of frames for one socket.
pub struct Outbox {
    state: Mutex<State>,
    ready: Notify,
    limit: usize,
}

impl Outbox {
    pub fn new(limit: usize) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            limit,
        }
    }

    /// Queues `frame` without waiting. Never blocks on the socket.
    pub fn push(&self, frame: &Frame, received: Instant) -> Pushed {
        let mut state = self.lock();
        if state.overflowed {
            return Pushed::Refused;
        }
        let len = frame.len();
        // One frame is always accepted when nothing is pending, so a message larger than
        // the bound does not close every subscriber; the bound applies to a backlog.
        if state.bytes > 0 && state.bytes + len > self.limit {
            state.overflowed = true;
            state.frames.clear();
            drop(state);
            self.ready.notify_one();
            return Pushed::Overflowed;
        }
        state.bytes += len;
        state.frames.push_back(Queued {
            frame: frame.clone(),
            received,
        });
        drop(state);
        self.ready.notify_one();
        Pushed::Queued
    }

    /// Queues `frames` ahead of everything already queued, whatever the bound. Used once,
    /// before the socket's first write, for the stored messages: everything queued by
    /// then is a live publication at least as new, so it must come after them.
    pub fn push_front(&self, frames: Vec<Frame>) {
        let received = Instant::now();
        let mut state = self.lock();
        for frame in frames.into_iter().rev() {
            state.bytes += frame.len();
            state.frames.push_front(Queued { frame, received });
        }
        drop(state);
        self.ready.notify_one();
    }

    /// Wakes the reader as a push would.
    pub fn wake(&self) {
        self.ready.notify_one();
    }

    /// Waits until frames are queued or the outbox overflowed.
    pub async fn ready(&self) {
        self.ready.notified().await
    }

    /// Moves every queued frame into `batch` (which keeps its capacity between calls).
    /// Returns `false` once the outbox has overflowed.
    pub fn take_into(&self, batch: &mut VecDeque<Queued>) -> bool {
        let mut state = self.lock();
        if state.overflowed {
            return false;
        }
        std::mem::swap(&mut state.frames, batch);
        true
    }

    /// Whether the bound was hit; the connection must then close.
    pub fn overflowed(&self) -> bool {
        self.lock().overflowed
    }

    /// Reports that `len` bytes taken by [`Outbox::take_into`] reached the socket writer.
    pub fn written(&self, len: usize) {
        let mut state = self.lock();
        state.bytes = state.bytes.saturating_sub(len);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // unwrap: the critical sections above cannot panic, so the lock is never poisoned.
        self.state.lock().unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_typed_by_utf8_validity() {
        assert_eq!(
            Frame::from_payload(Bytes::from_static(b"hi")),
            Frame::Text("hi".into())
        );
        let raw = Bytes::from_static(b"\xff\x00");
        assert_eq!(Frame::from_payload(raw.clone()), Frame::Binary(raw));
    }

    #[test]
    fn push_is_bounded_in_bytes_and_overflow_is_sticky() {
        let outbox = Outbox::new(10);
        let f = Frame::Text("12345".into());
        assert_eq!(outbox.push(&f, Instant::now()), Pushed::Queued);
        assert_eq!(outbox.push(&f, Instant::now()), Pushed::Queued);
        let mut batch = VecDeque::new();
        assert!(outbox.take_into(&mut batch));
        assert_eq!(batch.len(), 2);
        // Taken but not written still counts against the bound.
        assert_eq!(outbox.push(&f, Instant::now()), Pushed::Overflowed);
        assert_eq!(outbox.push(&f, Instant::now()), Pushed::Refused);
        assert!(!outbox.take_into(&mut batch));
    }

    #[test]
    fn one_oversized_frame_passes_when_nothing_is_pending() {
        let outbox = Outbox::new(4);
        let big = Frame::Text("123456".into());
        assert_eq!(outbox.push(&big, Instant::now()), Pushed::Queued);
        assert_eq!(
            outbox.push(&Frame::Text("1".into()), Instant::now()),
            Pushed::Overflowed
        );
    }

    #[test]
    fn stored_frames_go_first() {
        let outbox = Outbox::new(100);
        outbox.push(&Frame::Text("live".into()), Instant::now());
        outbox.push_front(vec![Frame::Text("a".into()), Frame::Text("b".into())]);
        let mut batch = VecDeque::new();
        outbox.take_into(&mut batch);
        let texts: Vec<_> = batch.iter().map(|q| q.frame.as_bytes().to_vec()).collect();
        assert_eq!(texts, [b"a".to_vec(), b"b".to_vec(), b"live".to_vec()]);
    }

    #[test]
    fn written_bytes_free_room() {
        let outbox = Outbox::new(10);
        let f = Frame::Binary(Bytes::from_static(b"1234567890"));
        assert_eq!(outbox.push(&f, Instant::now()), Pushed::Queued);
        let mut batch = VecDeque::new();
        outbox.take_into(&mut batch);
        outbox.written(10);
        assert_eq!(outbox.push(&f, Instant::now()), Pushed::Queued);
    }
}
