//! A socket's queue of encoded frames, bounded in bytes.
//!
//! Frames are the shared [`Bytes`] of a publication encoded once (header and payload):
//! queuing one for a socket is a reference count, never a copy. The count is a
//! [`Frame`] (an `Rc`): a worker wraps each publication once, and its sockets count
//! their references without atomic operations. Only bytes not yet
//! written count against the bound, so a socket whose kernel buffer takes a frame at
//! once never holds it. A queue that would pass its bound refuses the frame, and its
//! socket is then a slow consumer (see [`crate::conn`]).
//!
//! A frame is written in pieces when the kernel takes only part of it; `offset` is how
//! far the first frame got, and that frame must be finished before anything else
//! (a close frame included) may follow on the wire.

use std::collections::VecDeque;
use std::io::IoSlice;

use std::rc::Rc;

use bytes::Bytes;

/// An encoded frame as a worker's sockets share it.
pub type Frame = Rc<Bytes>;

/// The most frames handed to one vectored write.
pub const MAX_IOVECS: usize = 64;
/// Capacity an emptied queue keeps while the socket is busy (a steady stream reuses it
/// batch after batch); [`Outbox::shrink`] frees it once the socket is idle, and a
/// burst's larger queue is freed as soon as it is written.
const KEEP_CAPACITY: usize = 256;

/// The queue refused a frame: it would pass the bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// Whether `len` more bytes may join `queued` unwritten ones under `limit`: an empty
/// queue takes any one frame (see [`Outbox::push`]).
pub fn fits(queued: usize, len: usize, limit: usize) -> bool {
    queued == 0 || queued + len <= limit
}

/// How many of `frames`, taken in order, fit under `limit` on their own (the first
/// always does): the stored messages [`Outbox::push_front`] queues.
pub fn fitting(frames: &[Bytes], limit: usize) -> usize {
    let mut bytes = 0;
    frames
        .iter()
        .take_while(|frame| {
            let fits = fits(bytes, frame.len(), limit);
            bytes += frame.len();
            fits
        })
        .count()
}

#[derive(Debug, Default)]
pub struct Outbox {
    frames: VecDeque<Frame>,
    /// Bytes of the first frame already written.
    offset: usize,
    /// Bytes queued and not yet written.
    unwritten: usize,
}

impl Outbox {
    /// Queues `frame` (a reference to it: it is cloned only when it fits) unless the
    /// unwritten bytes would pass `limit`. An empty queue takes any one frame: a
    /// publication as large as `queue_bytes` (it is shared, never copied) must not close
    /// an idle subscriber; while it is being written, more is refused.
    pub fn push(&mut self, frame: &Frame, limit: usize) -> Result<(), Full> {
        if !self.fits(frame.len(), limit) {
            return Err(Full);
        }
        self.push_owned(frame.clone());
        Ok(())
    }

    fn fits(&self, len: usize, limit: usize) -> bool {
        fits(self.unwritten, len, limit)
    }

    /// Queues a control frame (pong, heartbeat) under the same bound as publications: a
    /// client that pings without reading fills its own queue, not the gateway's memory.
    pub fn push_control(&mut self, frame: Bytes, limit: usize) -> Result<(), Full> {
        if !self.fits(frame.len(), limit) {
            return Err(Full);
        }
        self.push_owned(Rc::new(frame));
        Ok(())
    }

    /// Queues `frame` whatever the bound: the close frame, and frames already counted
    /// against the bound.
    pub fn push_owned(&mut self, frame: Frame) {
        self.unwritten += frame.len();
        self.frames.push_back(frame);
    }

    /// Queues `frames` ahead of everything not yet started, while they fit under
    /// `limit` on their own (the first always does); returns how many did not. Used
    /// once, for the stored messages, before the socket's first data write: every frame
    /// queued by then is a live publication at least as new, so it must come after.
    pub fn push_front(&mut self, frames: Vec<Bytes>, limit: usize) -> usize {
        let at = usize::from(self.offset > 0);
        let taken = fitting(&frames, limit);
        let skipped = frames.len() - taken;
        for (i, frame) in frames.into_iter().take(taken).enumerate() {
            self.unwritten += frame.len();
            self.frames.insert(at + i, Rc::new(frame));
        }
        skipped
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

    /// Frees the queue's memory if it holds nothing (called when the socket is idle).
    pub fn shrink(&mut self) {
        if self.frames.is_empty() {
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

    fn f(s: &'static str) -> Frame {
        Rc::new(b(s))
    }

    fn pending(outbox: &Outbox) -> Vec<u8> {
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let n = outbox.slices(&mut slices);
        slices[..n].iter().flat_map(|s| s.to_vec()).collect()
    }

    #[test]
    fn the_bound_counts_unwritten_bytes_only() {
        let mut outbox = Outbox::default();
        assert_eq!(outbox.push(&f("12345"), 10), Ok(()));
        assert_eq!(outbox.push(&f("67890"), 10), Ok(()));
        assert_eq!(outbox.push(&f("x"), 10), Err(Full));
        outbox.advance(7);
        assert_eq!(outbox.unwritten(), 3);
        assert_eq!(pending(&outbox), b"890");
        assert_eq!(outbox.push(&f("abcdefg"), 10), Ok(()));
        assert_eq!(outbox.push(&f("h"), 10), Err(Full));
    }

    #[test]
    fn an_empty_queue_takes_one_frame_of_any_size() {
        let mut outbox = Outbox::default();
        assert_eq!(outbox.push(&f("123456"), 4), Ok(()));
        assert_eq!(outbox.push(&f("1"), 4), Err(Full));
        assert_eq!(outbox.push_control(b("p"), 4), Err(Full));
        outbox.advance(6);
        assert_eq!(outbox.push_control(b("pong"), 4), Ok(()));
    }

    #[test]
    fn stored_frames_go_before_unstarted_ones() {
        let mut outbox = Outbox::default();
        outbox.push(&f("live1"), 100).unwrap();
        outbox.push(&f("live2"), 100).unwrap();
        assert_eq!(outbox.push_front(vec![b("a"), b("b")], 100), 0);
        assert_eq!(pending(&outbox), b"ablive1live2");
        // A frame already started is finished first.
        outbox.advance(3);
        outbox.push_front(vec![b("c")], 100);
        assert_eq!(pending(&outbox), b"ive1clive2");
        // Stored messages are bounded on their own; the first always goes.
        let mut outbox = Outbox::default();
        assert_eq!(outbox.push_front(vec![b("12345"), b("678"), b("9")], 4), 2);
        assert_eq!(pending(&outbox), b"12345");
    }

    #[test]
    fn dropping_keeps_a_started_frame() {
        let mut outbox = Outbox::default();
        outbox.push(&f("abc"), 100).unwrap();
        outbox.push(&f("def"), 100).unwrap();
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
            outbox.push(&f("x"), usize::MAX).unwrap();
        }
        outbox.advance(1000);
        assert!(outbox.frames.capacity() <= KEEP_CAPACITY);
        outbox.push(&f("x"), 10).unwrap();
        outbox.advance(1);
        assert!(outbox.frames.capacity() > 0, "kept while busy");
        outbox.shrink();
        assert_eq!(outbox.frames.capacity(), 0);
    }
}
