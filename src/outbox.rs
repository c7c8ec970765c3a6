//! A socket's queue of encoded frames, bounded in bytes.
//!
//! Frames are the shared [`Bytes`] of a publication encoded once (header and payload):
//! queuing one for a socket is a reference count, never a copy. The count is a
//! [`Frame`] (an `Rc`): a worker wraps each publication once, and its sockets count
//! their references without atomic operations. Only bytes not yet
//! written count against the bound, so a socket whose kernel buffer takes a frame at
//! once never holds it. A queue that would pass its bound refuses the frame, and its
//! socket is then a slow consumer (see [`crate::conn`]), unless it conflates.
//!
//! **Conflation** (`slow_consumer = "conflate"` on the socket's facility): each entry
//! is tagged with a [`KeyIndex`], the position of its publication's key in the socket's
//! subscriptions ([`CONTROL`] for pongs, heartbeats, pings and the close frame). When a
//! publication does not fit, [`Outbox::push_conflating`] drops unstarted publication
//! frames instead of refusing it: first the older ones of the same key, then every one
//! that a newer frame of its key supersedes, then the oldest ones, until it fits; the
//! new frame is queued in any case. A partly written frame and control frames are never
//! dropped. So the queue stays within `limit` (or one publication over it, when control
//! frames and a partly written frame alone fill it), and the client ends with the
//! newest message of each key. The tag costs the hot path nothing but its two bytes.
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

/// Which of its socket's subscribe keys a queued frame belongs to (see [`key_index`]).
pub type KeyIndex = u16;
/// The tag of control frames (pong, heartbeat, ping, close): never dropped.
pub const CONTROL: KeyIndex = KeyIndex::MAX;
/// The tag of publications whose key is not known (stored messages, keys past
/// [`MAX_KEYED`]): dropped oldest first, never as superseded.
pub const UNKEYED: KeyIndex = KeyIndex::MAX - 1;
/// Marks an entry to drop during one conflation pass; never left in the queue.
const DROP: KeyIndex = KeyIndex::MAX - 2;
/// Key indices from here on are tagged [`UNKEYED`].
pub const MAX_KEYED: usize = DROP as usize;
/// Key indices a conflation pass can tell apart without allocating (one bit each);
/// frames of keys past it are only dropped oldest first.
const SUPERSEDED_BITS: usize = u128::BITS as usize;

/// The tag of the `i`th subscribe key of a socket.
pub fn key_index(i: usize) -> KeyIndex {
    if i < MAX_KEYED {
        i as KeyIndex
    } else {
        UNKEYED
    }
}

/// A queued frame and the key it belongs to.
#[derive(Debug)]
struct Entry {
    frame: Frame,
    key: KeyIndex,
}

impl Entry {
    fn is_publication(&self) -> bool {
        self.key != CONTROL
    }
}

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
    frames: VecDeque<Entry>,
    /// Bytes of the first frame already written.
    offset: usize,
    /// Bytes queued and not yet written.
    unwritten: usize,
}

impl Outbox {
    /// Queues `frame`, a publication of `key` (a reference to it: it is cloned only
    /// when it fits), unless the unwritten bytes would pass `limit`. An empty queue
    /// takes any one frame: a publication as large as `queue_bytes` (it is shared,
    /// never copied) must not close an idle subscriber; while it is being written, more
    /// is refused.
    pub fn push(&mut self, frame: &Frame, key: KeyIndex, limit: usize) -> Result<(), Full> {
        if !self.fits(frame.len(), limit) {
            return Err(Full);
        }
        self.push_counted(frame.clone(), key);
        Ok(())
    }

    /// Queues `frame`, a publication of `key`, on a conflating socket: when it does
    /// not fit under `limit`, unstarted publication frames are dropped to make room
    /// (see the module docs), and it is queued in any case. Returns how many frames
    /// were dropped.
    pub fn push_conflating(&mut self, frame: &Frame, key: KeyIndex, limit: usize) -> usize {
        let dropped = self.make_room(Some(key), frame.len(), limit);
        self.push_counted(frame.clone(), key);
        dropped
    }

    /// Drops unstarted publication frames until `len` more bytes fit under `limit`:
    /// the older frames of `key` (all of them: the new frame supersedes them), then
    /// the frames a newer one of the same key supersedes, then the oldest. Returns how
    /// many were dropped; control frames and a partly written frame stay, so `len` may
    /// still not fit.
    pub fn make_room(&mut self, key: Option<KeyIndex>, len: usize, limit: usize) -> usize {
        if self.fits(len, limit) {
            return 0;
        }
        let mut dropped = 0;
        if let Some(key) = key.filter(|&k| (k as usize) < MAX_KEYED) {
            dropped += self.drop_unstarted_where(|entry| entry.key == key);
            if self.fits(len, limit) {
                return dropped;
            }
        }
        self.mark_superseded();
        dropped += self.drop_unstarted_where(|entry| entry.key == DROP);
        let (mut unwritten, mut oldest) = (self.unwritten, 0);
        let over = |unwritten: usize| !fits(unwritten, len, limit);
        for entry in self.unstarted() {
            if !over(unwritten) {
                break;
            }
            if entry.is_publication() {
                unwritten -= entry.frame.len();
                entry.key = DROP;
                oldest += 1;
            }
        }
        if oldest > 0 {
            dropped += self.drop_unstarted_where(|entry| entry.key == DROP);
        }
        dropped
    }

    /// Tags [`DROP`] every unstarted publication frame that a later frame of the same
    /// key supersedes (keys past [`SUPERSEDED_BITS`] excepted).
    fn mark_superseded(&mut self) {
        let mut seen: u128 = 0;
        for entry in self.unstarted().rev() {
            let key = entry.key as usize;
            if key >= SUPERSEDED_BITS {
                continue;
            }
            if seen & (1 << key) != 0 {
                entry.key = DROP;
            } else {
                seen |= 1 << key;
            }
        }
    }

    /// The frames not yet started (a partly written first frame excluded).
    fn unstarted(&mut self) -> impl DoubleEndedIterator<Item = &mut Entry> {
        let started = usize::from(self.offset > 0);
        self.frames.iter_mut().skip(started)
    }

    /// Drops the unstarted publication frames `drop` picks; returns how many.
    fn drop_unstarted_where(&mut self, mut drop: impl FnMut(&Entry) -> bool) -> usize {
        let started = usize::from(self.offset > 0);
        let (mut i, mut dropped, mut bytes) = (0, 0, 0);
        self.frames.retain(|entry| {
            i += 1;
            let gone = i > started && entry.is_publication() && drop(entry);
            if gone {
                dropped += 1;
                bytes += entry.frame.len();
            }
            !gone
        });
        self.unwritten -= bytes;
        dropped
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

    /// Queues a control frame whatever the bound: the close frame.
    pub fn push_owned(&mut self, frame: Frame) {
        self.push_counted(frame, CONTROL);
    }

    /// Queues `frame` of `key` whatever the bound: a frame already counted against it.
    pub fn push_counted(&mut self, frame: Frame, key: KeyIndex) {
        self.unwritten += frame.len();
        self.frames.push_back(Entry { frame, key });
    }

    /// Moves every frame of `other` (never written to: the frames held during setup)
    /// behind this queue's, whatever the bound: they were counted against it already.
    pub fn append(&mut self, other: &mut Outbox) {
        debug_assert_eq!(other.offset, 0);
        self.unwritten += std::mem::take(&mut other.unwritten);
        self.frames.append(&mut other.frames);
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
            let entry = Entry {
                frame: Rc::new(frame),
                key: UNKEYED,
            };
            self.frames.insert(at + i, entry);
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
        for (i, entry) in self.frames.iter().take(out.len()).enumerate() {
            let start = if i == 0 { self.offset } else { 0 };
            out[i] = IoSlice::new(&entry.frame[start..]);
            n += 1;
        }
        n
    }

    /// Records that `written` bytes went out.
    pub fn advance(&mut self, mut written: usize) {
        self.unwritten -= written;
        while written > 0 {
            // unwrap: the writer never reports more bytes than were handed to it.
            let left = self.frames.front().unwrap().frame.len() - self.offset;
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
        for entry in self.frames.drain(keep..) {
            self.unwritten -= entry.frame.len();
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
        assert_eq!(outbox.push(&f("12345"), 0, 10), Ok(()));
        assert_eq!(outbox.push(&f("67890"), 0, 10), Ok(()));
        assert_eq!(outbox.push(&f("x"), 0, 10), Err(Full));
        outbox.advance(7);
        assert_eq!(outbox.unwritten(), 3);
        assert_eq!(pending(&outbox), b"890");
        assert_eq!(outbox.push(&f("abcdefg"), 0, 10), Ok(()));
        assert_eq!(outbox.push(&f("h"), 0, 10), Err(Full));
    }

    #[test]
    fn an_empty_queue_takes_one_frame_of_any_size() {
        let mut outbox = Outbox::default();
        assert_eq!(outbox.push(&f("123456"), 0, 4), Ok(()));
        assert_eq!(outbox.push(&f("1"), 0, 4), Err(Full));
        assert_eq!(outbox.push_control(b("p"), 4), Err(Full));
        outbox.advance(6);
        assert_eq!(outbox.push_control(b("pong"), 4), Ok(()));
    }

    #[test]
    fn stored_frames_go_before_unstarted_ones() {
        let mut outbox = Outbox::default();
        outbox.push(&f("live1"), 0, 100).unwrap();
        outbox.push(&f("live2"), 0, 100).unwrap();
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
        outbox.push(&f("abc"), 0, 100).unwrap();
        outbox.push(&f("def"), 0, 100).unwrap();
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
            outbox.push(&f("x"), 0, usize::MAX).unwrap();
        }
        outbox.advance(1000);
        assert!(outbox.frames.capacity() <= KEEP_CAPACITY);
        outbox.push(&f("x"), 0, 10).unwrap();
        outbox.advance(1);
        assert!(outbox.frames.capacity() > 0, "kept while busy");
        outbox.shrink();
        assert_eq!(outbox.frames.capacity(), 0);
    }

    /// Pushes `frame` of `key` on a conflating queue; returns how many were dropped.
    fn conflate(outbox: &mut Outbox, frame: &'static str, key: KeyIndex, limit: usize) -> usize {
        outbox.push_conflating(&f(frame), key, limit)
    }

    #[test]
    fn conflation_keeps_the_newest_frame_of_the_same_key() {
        let mut outbox = Outbox::default();
        assert_eq!(conflate(&mut outbox, "a1", 0, 6), 0);
        assert_eq!(conflate(&mut outbox, "b1", 1, 6), 0);
        assert_eq!(conflate(&mut outbox, "a2", 0, 6), 0);
        // Full: the older frame of the same key goes, the other key's stays.
        assert_eq!(conflate(&mut outbox, "a3", 0, 6), 2);
        assert_eq!(pending(&outbox), b"b1a3");
        assert_eq!(outbox.unwritten(), 4);
    }

    #[test]
    fn conflation_drops_superseded_then_oldest_frames_of_other_keys() {
        let mut outbox = Outbox::default();
        for (frame, key) in [("a1", 0), ("b1", 1), ("a2", 0), ("c1", 2), ("b2", 1)] {
            assert_eq!(conflate(&mut outbox, frame, key, 10), 0);
        }
        // A new key: first what a newer frame of its key supersedes (a1, b1).
        assert_eq!(conflate(&mut outbox, "d1", 3, 10), 2);
        assert_eq!(pending(&outbox), b"a2c1b2d1");
        // Still full: then the oldest, one by one, until the new frame fits.
        assert_eq!(conflate(&mut outbox, "e1e1", 4, 10), 1);
        assert_eq!(pending(&outbox), b"c1b2d1e1e1");
        assert_eq!(outbox.unwritten(), 10);
    }

    #[test]
    fn conflation_keeps_started_and_control_frames() {
        let mut outbox = Outbox::default();
        outbox.push(&f("a1"), 0, 8).unwrap();
        outbox.push_control(b("pp"), 8).unwrap();
        outbox.push(&f("a2"), 0, 8).unwrap();
        outbox.advance(1);
        // a1 is partly written and the pong is a control frame: only a2 may go.
        assert_eq!(conflate(&mut outbox, "a3a3", 0, 8), 1);
        assert_eq!(pending(&outbox), b"1ppa3a3");
        outbox.push_control(b("q"), 8).unwrap();
        assert_eq!(conflate(&mut outbox, "b1b1", 1, 8), 1);
        assert_eq!(pending(&outbox), b"1ppqb1b1");
        // Nothing left to drop but its predecessor: the newest frame is queued anyway,
        // over the bound by one publication at most.
        assert_eq!(conflate(&mut outbox, "b2b2b2", 1, 8), 1);
        assert_eq!(pending(&outbox), b"1ppqb2b2b2");
        assert_eq!(outbox.unwritten(), 10);
    }

    #[test]
    fn room_for_a_control_frame_is_made_from_publications_only() {
        let mut outbox = Outbox::default();
        outbox.push(&f("a1"), 0, 6).unwrap();
        outbox.push(&f("b1"), 1, 6).unwrap();
        outbox.push(&f("a2"), 0, 6).unwrap();
        assert_eq!(outbox.make_room(None, 2, 6), 1);
        outbox.push_control(b("pp"), 6).unwrap();
        assert_eq!(pending(&outbox), b"b1a2pp");
        assert_eq!(outbox.make_room(None, 4, 6), 2);
        assert_eq!(outbox.push_control(b("qqqq"), 6), Ok(()));
        assert_eq!(outbox.make_room(None, 1, 6), 0);
        assert_eq!(outbox.push_control(b("r"), 6), Err(Full));
    }

    #[test]
    fn stored_frames_are_publications_of_no_known_key() {
        let mut outbox = Outbox::default();
        outbox.push_front(vec![b("s1"), b("s2")], 100);
        assert_eq!(conflate(&mut outbox, "a1", 0, 6), 0);
        assert_eq!(conflate(&mut outbox, "a2", 0, 6), 1);
        assert_eq!(pending(&outbox), b"s1s2a2");
        assert_eq!(conflate(&mut outbox, "b1", 1, 6), 1);
        assert_eq!(pending(&outbox), b"s2a2b1");
    }

    #[test]
    fn key_indices_past_the_range_are_unkeyed() {
        assert_eq!(key_index(0), 0);
        assert_eq!(key_index(MAX_KEYED - 1), (MAX_KEYED - 1) as KeyIndex);
        assert_eq!(key_index(MAX_KEYED), UNKEYED);
        assert_eq!(key_index(usize::MAX), UNKEYED);
        // Unkeyed frames never count as superseded; they go oldest first.
        let mut outbox = Outbox::default();
        assert_eq!(conflate(&mut outbox, "u1", UNKEYED, 4), 0);
        assert_eq!(conflate(&mut outbox, "u2", UNKEYED, 4), 0);
        assert_eq!(conflate(&mut outbox, "u3", UNKEYED, 4), 1);
        assert_eq!(pending(&outbox), b"u2u3");
    }
}
