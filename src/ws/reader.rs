//! Client messages out of the bytes a socket reads, with every size checked from the
//! frame header before any payload is kept.
//!
//! Bytes are read into a buffer shared by the worker's sockets and parsed in place. A
//! [`Reader`] keeps something only while a frame straddles two reads or a message is
//! fragmented, and then never more than `limit` payload bytes (plus one header): a frame
//! announcing more than the limit, or continuations adding up beyond it, is refused as
//! soon as its header is complete. An idle reader owns no buffer.

use bytes::{Bytes, BytesMut};

use super::frame::{self, FrameError, Header};

/// A complete client message or control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong,
    /// The client's close frame; `None` when it carried no code.
    Close(Option<CloseFrame>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    pub code: u16,
    pub reason: String,
}

/// Why a client's bytes cannot be read further; each maps to a close code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("message larger than {0} bytes")]
    TooBig(usize),
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    #[error("continuation frame without a message to continue")]
    UnexpectedContinuation,
    #[error("new message inside a fragmented one")]
    UnfinishedMessage,
    #[error("close frame with a 1-byte payload")]
    CloseLength,
    #[error("invalid close code {0}")]
    CloseCode(u16),
    #[error("close reason is not valid UTF-8")]
    CloseReasonUtf8,
}

impl ReadError {
    /// The close code RFC 6455 asks for.
    pub fn close_code(&self) -> u16 {
        match self {
            ReadError::TooBig(_) => 1009,
            ReadError::InvalidUtf8 | ReadError::CloseReasonUtf8 => 1007,
            _ => 1002,
        }
    }
}

/// Whether a peer may send this close code (RFC 6455 §7.4 and the IANA registry).
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// The unread part of what one read returned.
pub struct Input<'a> {
    buf: &'a mut [u8],
}

impl<'a> Input<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        Input { buf }
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Removes and returns the first `n` bytes.
    fn take(&mut self, n: usize) -> &'a mut [u8] {
        let buf = std::mem::take(&mut self.buf);
        let (head, tail) = buf.split_at_mut(n);
        self.buf = tail;
        head
    }
}

/// One frame, unmasked.
struct Frame {
    fin: bool,
    opcode: u8,
    payload: Bytes,
}

/// What a reader holds between reads; allocated only when needed.
#[derive(Default)]
struct Pending {
    /// The received part of a frame that straddles reads.
    frame: BytesMut,
    /// A fragmented message so far, and whether it is text.
    message: Option<(bool, BytesMut)>,
}

/// Reassembles one socket's messages.
#[derive(Default)]
pub struct Reader {
    pending: Option<Box<Pending>>,
}

/// What is needed to complete the frame at the start of a buffer.
enum Need {
    /// At least this many bytes, to read the header.
    Bytes(usize),
    /// The header is read and allowed; the frame takes `size + len` bytes.
    Frame(Header),
}

/// Reads the header at the start of `buf` and checks it against the message in
/// progress (`message_len`) and the size limit.
fn need(buf: &[u8], message_len: Option<usize>, limit: usize) -> Result<Need, ReadError> {
    if buf.len() < 2 {
        return Ok(Need::Bytes(2));
    }
    let size = frame::header_size(buf[1]);
    let Some(header) = frame::parse_header(buf)? else {
        return Ok(Need::Bytes(size));
    };
    if header.mask.is_none() {
        return Err(FrameError::Unmasked.into());
    }
    let len = header.len;
    match (header.opcode, message_len) {
        (frame::OP_TEXT | frame::OP_BINARY, Some(_)) => return Err(ReadError::UnfinishedMessage),
        (frame::OP_TEXT | frame::OP_BINARY, None) if len > limit as u64 => {
            return Err(ReadError::TooBig(limit))
        }
        (frame::OP_CONTINUATION, None) => return Err(ReadError::UnexpectedContinuation),
        (frame::OP_CONTINUATION, Some(so_far)) if so_far as u64 + len > limit as u64 => {
            return Err(ReadError::TooBig(limit))
        }
        _ => {}
    }
    Ok(Need::Frame(header))
}

/// Moves up to `want - into.len()` bytes from `input` into `into`; whether it is full.
fn fill(into: &mut BytesMut, input: &mut Input<'_>, want: usize) -> bool {
    let n = want.saturating_sub(into.len()).min(input.buf.len());
    into.extend_from_slice(input.take(n));
    into.len() >= want
}

impl Reader {
    /// Whether nothing is held between reads.
    #[cfg(test)]
    pub fn is_idle(&self) -> bool {
        self.pending.is_none()
    }

    /// Bytes held between reads (a partial frame and a partial message).
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.pending.as_ref().map_or(0, |p| {
            p.frame.capacity() + p.message.as_ref().map_or(0, |(_, m)| m.capacity())
        })
    }

    /// The next complete message in `input` (and what earlier reads left); `Ok(None)`
    /// once `input` is used up, with any incomplete frame kept for the next read.
    pub fn next(
        &mut self,
        input: &mut Input<'_>,
        limit: usize,
    ) -> Result<Option<Message>, ReadError> {
        loop {
            let Some(frame) = self.take_frame(input, limit)? else {
                return Ok(None);
            };
            if let Some(message) = self.on_frame(frame)? {
                return Ok(Some(message));
            }
        }
    }

    fn message_len(&self) -> Option<usize> {
        let pending = self.pending.as_ref()?;
        pending.message.as_ref().map(|(_, m)| m.len())
    }

    fn take_frame(
        &mut self,
        input: &mut Input<'_>,
        limit: usize,
    ) -> Result<Option<Frame>, ReadError> {
        let message_len = self.message_len();
        if let Some(pending) = self.pending.as_mut().filter(|p| !p.frame.is_empty()) {
            let partial = &mut pending.frame;
            let header = loop {
                match need(partial, message_len, limit)? {
                    Need::Bytes(n) => {
                        if !fill(partial, input, n) {
                            return Ok(None);
                        }
                    }
                    Need::Frame(header) => break header,
                }
            };
            let total = header.size + header.len as usize;
            if !fill(partial, input, total) {
                return Ok(None);
            }
            let mut raw = partial.split();
            let payload = raw.split_off(header.size);
            return Ok(Some(self.finish_frame(header, payload)));
        }
        if input.is_empty() {
            return Ok(None);
        }
        let (header, total) = match need(input.buf, message_len, limit)? {
            Need::Frame(h) if input.buf.len() >= h.size + h.len as usize => {
                (h, h.size + h.len as usize)
            }
            _ => {
                // Only what arrived is kept: an announced size reserves nothing.
                let pending = self.pending.get_or_insert_with(Box::default);
                let rest = input.buf.len();
                pending.frame.extend_from_slice(input.take(rest));
                return Ok(None);
            }
        };
        let raw = input.take(total);
        let payload = &mut raw[header.size..];
        if let Some(mask) = header.mask {
            frame::unmask(payload, mask);
        }
        Ok(Some(Frame {
            fin: header.fin,
            opcode: header.opcode,
            payload: Bytes::copy_from_slice(payload),
        }))
    }

    fn finish_frame(&mut self, header: Header, mut payload: BytesMut) -> Frame {
        if let Some(mask) = header.mask {
            frame::unmask(&mut payload, mask);
        }
        self.release_if_empty();
        Frame {
            fin: header.fin,
            opcode: header.opcode,
            payload: payload.freeze(),
        }
    }

    /// Frees the pending state once it holds nothing.
    fn release_if_empty(&mut self) {
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.frame.is_empty() && p.message.is_none())
        {
            self.pending = None;
        }
    }

    fn on_frame(&mut self, frame: Frame) -> Result<Option<Message>, ReadError> {
        match frame.opcode {
            frame::OP_TEXT | frame::OP_BINARY => {
                let text = frame.opcode == frame::OP_TEXT;
                if frame.fin {
                    return complete(text, frame.payload).map(Some);
                }
                let pending = self.pending.get_or_insert_with(Box::default);
                pending.message = Some((text, BytesMut::from(&frame.payload[..])));
                Ok(None)
            }
            frame::OP_CONTINUATION => {
                // unwrap: `need` refused a continuation without a message in progress.
                let pending = self.pending.as_mut().unwrap();
                let (_, message) = pending.message.as_mut().unwrap();
                message.extend_from_slice(&frame.payload);
                if !frame.fin {
                    return Ok(None);
                }
                let (text, message) = pending.message.take().unwrap();
                self.release_if_empty();
                complete(text, message.freeze()).map(Some)
            }
            frame::OP_PING => Ok(Some(Message::Ping(frame.payload))),
            frame::OP_PONG => Ok(Some(Message::Pong)),
            _ => parse_close(&frame.payload).map(|close| Some(Message::Close(close))),
        }
    }
}

fn complete(text: bool, payload: Bytes) -> Result<Message, ReadError> {
    if !text {
        return Ok(Message::Binary(payload));
    }
    std::str::from_utf8(&payload).map_err(|_| ReadError::InvalidUtf8)?;
    Ok(Message::Text(payload))
}

fn parse_close(payload: &[u8]) -> Result<Option<CloseFrame>, ReadError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ReadError::CloseLength),
        [high, low, reason @ ..] => {
            let code = u16::from_be_bytes([*high, *low]);
            if !valid_close_code(code) {
                return Err(ReadError::CloseCode(code));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| ReadError::CloseReasonUtf8)?;
            Ok(Some(CloseFrame {
                code,
                reason: reason.to_string(),
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::{
        encode_masked, MAX_HEADER, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_TEXT,
    };
    use proptest::prelude::*;

    const MASK: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];
    const LIMIT: usize = 64;

    /// Feeds `stream` in pieces cut at `cuts`; returns the messages, or the first error.
    fn read_in_pieces(
        stream: &[u8],
        cuts: &[usize],
        limit: usize,
    ) -> (Vec<Message>, Option<ReadError>, usize) {
        let mut reader = Reader::default();
        let mut messages = Vec::new();
        let mut held = 0;
        let mut start = 0;
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        bounds.sort_unstable();
        bounds.push(stream.len());
        for end in bounds {
            let mut piece = stream[start..end].to_vec();
            start = end;
            let mut input = Input::new(&mut piece);
            loop {
                match reader.next(&mut input, limit) {
                    Ok(Some(m)) => messages.push(m),
                    Ok(None) => break,
                    Err(e) => return (messages, Some(e), held),
                }
            }
            held = held.max(reader.held());
        }
        (messages, None, held)
    }

    fn client(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        encode_masked(fin, opcode, payload, MASK)
    }

    #[test]
    fn fragments_and_interleaved_controls_reassemble() {
        let mut stream = client(false, OP_TEXT, b"hel");
        stream.extend(client(true, OP_PING, b"p"));
        stream.extend(client(false, OP_CONTINUATION, b"lo "));
        stream.extend(client(true, OP_CONTINUATION, "wörld".as_bytes()));
        stream.extend(client(true, OP_BINARY, &[0xFF, 0]));
        let (messages, error, _) = read_in_pieces(&stream, &[], LIMIT);
        assert_eq!(error, None);
        assert_eq!(
            messages,
            [
                Message::Ping(Bytes::from_static(b"p")),
                Message::Text(Bytes::from("hello wörld")),
                Message::Binary(Bytes::from_static(&[0xFF, 0])),
            ]
        );
    }

    #[test]
    fn a_huge_announced_frame_is_refused_from_its_header() {
        let mut header = vec![0x82, 0xFF];
        header.extend_from_slice(&(1u64 << 40).to_be_bytes());
        header.extend_from_slice(&MASK);
        header.extend_from_slice(&[0; 32]);
        let (_, error, held) = read_in_pieces(&header, &[3, 9], LIMIT);
        assert_eq!(error, Some(ReadError::TooBig(LIMIT)));
        assert!(held <= 2 * MAX_HEADER, "held {held} bytes before refusing");
    }

    #[test]
    fn continuations_adding_up_beyond_the_limit_are_refused() {
        let mut stream = client(false, OP_BINARY, &[1; 40]);
        stream.extend(client(false, OP_CONTINUATION, &[1; 20]));
        stream.extend(client(true, OP_CONTINUATION, &[1; 20]));
        let (_, error, _) = read_in_pieces(&stream, &[], LIMIT);
        assert_eq!(error, Some(ReadError::TooBig(LIMIT)));
    }

    #[test]
    fn protocol_errors_map_to_their_close_codes() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (client(true, OP_TEXT, &[0xC0, 0x80]), 1007),
            (encode_masked(true, OP_CLOSE, &[0x03], MASK), 1002),
            (client(true, OP_CLOSE, &1005u16.to_be_bytes()), 1002),
            (client(true, OP_CLOSE, &[0x03, 0xE8, 0xFF]), 1007),
            (client(true, OP_CONTINUATION, b"x"), 1002),
            (
                [client(false, OP_TEXT, b"a"), client(true, OP_TEXT, b"b")].concat(),
                1002,
            ),
            (vec![0x81, 0x01, b'x'], 1002), // unmasked
            (
                {
                    let mut f = client(true, OP_TEXT, b"x");
                    f[0] |= 0x40; // RSV1
                    f
                },
                1002,
            ),
        ];
        for (stream, code) in cases {
            let (_, error, _) = read_in_pieces(&stream, &[], LIMIT);
            let error = error.expect("an error");
            assert_eq!(error.close_code(), code, "{error}");
        }
    }

    #[test]
    fn close_codes_follow_the_registry() {
        for code in [1000, 1001, 1003, 1007, 1010, 1011, 1014, 3000, 4999] {
            assert!(valid_close_code(code), "{code}");
        }
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000] {
            assert!(!valid_close_code(code), "{code}");
        }
    }

    #[test]
    fn an_idle_reader_holds_nothing() {
        let stream = [client(true, OP_TEXT, b"abc"), client(true, OP_PING, b"")].concat();
        let mut reader = Reader::default();
        let mut copy = stream.clone();
        let mut input = Input::new(&mut copy[..5]);
        assert_eq!(reader.next(&mut input, LIMIT), Ok(None));
        assert!(!reader.is_idle());
        let mut input = Input::new(&mut copy[5..]);
        assert!(reader.next(&mut input, LIMIT).unwrap().is_some());
        assert!(reader.next(&mut input, LIMIT).unwrap().is_some());
        assert!(reader.is_idle());
    }

    fn arb_frame() -> impl Strategy<Value = (bool, u8, Vec<u8>)> {
        (
            any::<bool>(),
            prop_oneof![
                Just(OP_BINARY),
                Just(OP_TEXT),
                Just(OP_CONTINUATION),
                Just(OP_PING)
            ],
            proptest::collection::vec(any::<u8>(), 0..200),
        )
    }

    proptest! {
        /// Any split of a stream gives the same messages (or the same error) as reading
        /// it whole, and nothing beyond one frame and one message is ever held.
        #[test]
        fn splits_do_not_change_the_result(
            frames in proptest::collection::vec(arb_frame(), 0..12),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let stream: Vec<u8> = frames
                .iter()
                .flat_map(|(fin, op, payload)| client(*fin || *op == OP_PING, *op, payload))
                .collect();
            let whole = read_in_pieces(&stream, &[], LIMIT);
            let split = read_in_pieces(&stream, &cuts, LIMIT);
            prop_assert_eq!(&whole.0, &split.0);
            prop_assert_eq!(&whole.1, &split.1);
            prop_assert!(split.2 <= 4 * (LIMIT + MAX_HEADER), "held {}", split.2);
        }

        /// Random bytes end in messages or a close code, never a panic, and never more
        /// than one frame's worth held.
        #[test]
        fn random_bytes_never_panic(
            stream in proptest::collection::vec(any::<u8>(), 0..600),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let (_, error, held) = read_in_pieces(&stream, &cuts, LIMIT);
            if let Some(e) = error {
                prop_assert!([1002, 1007, 1009].contains(&e.close_code()));
            }
            prop_assert!(held <= 4 * (LIMIT + MAX_HEADER), "held {}", held);
        }
    }
}
