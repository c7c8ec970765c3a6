//! A socket's queue of encoded frames, bounded in bytes.
//!
//! Frames are the shared [`Bytes`] of a publication encoded once (header and payload):
//! queuing one for a socket is a reference count, never a copy. Only bytes not yet
//! written count against the bound, so a socket whose kernel buffer takes a frame at
//! once never holds it. A queue that would pass its bound refuses the frame, and its
//! socket is then a slow consumer (see [`crate::conn`]).
//!
//! A frame is written in pieces when the kernel takes only part of it; `offset` is how
//! far the first frame got, and that frame must be finished before anything else
//! (a close frame included) may follow on the wire.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::Bytes;

/// The most frames handed to one vectored write.
pub const MAX_IOVECS: usize = 64;
/// Capacity kept by an empty queue; a burst's larger queue is freed once written.
const KEEP_CAPACITY: usize = 8;

/// The queue refused a frame: it would pass the bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

#[derive(Debug, Default)]
pub struct Outbox {
    frames: VecDeque<Bytes>,
    /// Bytes of the first frame already written.
    offset: usize,
    /// Bytes queued and not yet written.
    unwritten: usize,
}

impl Outbox {
    /// Queues `frame` unless the unwritten bytes would pass `limit`.
    pub fn push(&mut self, frame: Bytes, limit: usize) -> Result<(), Full> {
        if self.unwritten + frame.len() > limit {
            return Err(Full);
        }
        self.unwritten += frame.len();
        self.frames.push_back(frame);
        Ok(())
    }

    /// Queues `frame` whatever the bound: for control frames, which are tiny and must
    /// not be lost (pongs, heartbeats, the close frame).
    pub fn push_control(&mut self, frame: Bytes) {
        self.unwritten += frame.len();
        self.frames.push_back(frame);
    }

    /// Queues `frames` ahead of everything not yet started. Used once, for the stored
    /// messages, before the socket's first data write: every frame queued by then is a
    /// live publication at least as new, so it must come after them.
    pub fn push_front(&mut self, frames: Vec<Bytes>) {
        let at = usize::from(self.offset > 0);
        for (i, frame) in frames.into_iter().enumerate() {
            self.unwritten += frame.len();
            self.frames.insert(at + i, frame);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn unwritten(&self) -> usize {
        self.unwritten
    }

    /// Fills `out` with the unwritten bytes, first frame first; returns how many slices.
    pub fn slices<'a>(&'a self, out: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (i, frame) in self.frames.iter().take(out.len()).enumerate() {
            let start = if i == 0 { self.offset } else { 0 };
            out[i] = IoSlice::new(&frame[start..]);
            n += 1;
        }
        n
    }

    /// Records that `written` bytes went out.
    pub fn advance(&mut self, mut written: usize) {
        self.unwritten -= written;
        while written > 0 {
            // unwrap: the writer never reports more bytes than were handed to it.
            let left = self.frames.front().unwrap().len() - self.offset;
            if written < left {
                self.offset += written;
                return;
            }
            written -= left;
            self.offset = 0;
            self.frames.pop_front();
        }
        if self.frames.is_empty() && self.frames.capacity() > KEEP_CAPACITY {
            self.frames = VecDeque::new();
        }
    }

    /// Drops every frame not yet started, keeping a partly written first frame (it must
    /// be finished before a close frame can follow).
    pub fn drop_unstarted(&mut self) {
        let keep = usize::from(self.offset > 0);
        for frame in self.frames.drain(keep..) {
            self.unwritten -= frame.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    fn pending(outbox: &Outbox) -> Vec<u8> {
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let n = outbox.slices(&mut slices);
        slices[..n].iter().flat_map(|s| s.to_vec()).collect()
    }

    #[test]
    fn the_bound_counts_unwritten_bytes_only() {
        let mut outbox = Outbox::default();
        assert_eq!(outbox.push(b("12345"), 10), Ok(()));
        assert_eq!(outbox.push(b("67890"), 10), Ok(()));
        assert_eq!(outbox.push(b("x"), 10), Err(Full));
        outbox.advance(7);
        assert_eq!(outbox.unwritten(), 3);
        assert_eq!(pending(&outbox), b"890");
        assert_eq!(outbox.push(b("abcdefg"), 10), Ok(()));
        assert_eq!(outbox.push(b("h"), 10), Err(Full));
    }

    #[test]
    fn a_frame_larger_than_the_bound_is_refused_even_when_empty() {
        let mut outbox = Outbox::default();
        assert_eq!(outbox.push(b("123456"), 4), Err(Full));
        assert!(outbox.is_empty());
    }

    #[test]
    fn stored_frames_go_before_unstarted_ones() {
        let mut outbox = Outbox::default();
        outbox.push(b("live1"), 100).unwrap();
        outbox.push(b("live2"), 100).unwrap();
        outbox.push_front(vec![b("a"), b("b")]);
        assert_eq!(pending(&outbox), b"ablive1live2");
        // A frame already started is finished first.
        outbox.advance(3);
        outbox.push_front(vec![b("c")]);
        assert_eq!(pending(&outbox), b"ive1clive2");
    }

    #[test]
    fn dropping_keeps_a_started_frame() {
        let mut outbox = Outbox::default();
        outbox.push(b("abc"), 100).unwrap();
        outbox.push(b("def"), 100).unwrap();
        outbox.advance(1);
        outbox.drop_unstarted();
        assert_eq!(pending(&outbox), b"bc");
        assert_eq!(outbox.unwritten(), 2);
        outbox.advance(2);
        outbox.drop_unstarted();
        assert!(outbox.is_empty());
        assert_eq!(outbox.unwritten(), 0);
    }

    #[test]
    fn a_burst_queue_is_freed_once_written() {
        let mut outbox = Outbox::default();
        for _ in 0..1000 {
            outbox.push(b("x"), usize::MAX).unwrap();
        }
        outbox.advance(1000);
        assert!(outbox.frames.capacity() <= KEEP_CAPACITY);
    }
}
