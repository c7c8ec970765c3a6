//! RFC 6455 frames on the wire: header parsing, masking, and server frame encoding.
//!
//! A server frame is never masked, so its bytes are the same for every socket: a
//! publication is encoded once ([`encode`]) and the same [`Bytes`] go to every socket
//! that receives it. Client frames are always masked (§5.1); [`unmask`] undoes that in
//! place.

use bytes::{BufMut, Bytes, BytesMut};

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The longest payload of a control frame (§5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// The longest close reason: a control payload less the two code bytes.
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;
/// The longest frame header: 2 bytes, a 64-bit length and a mask key.
pub const MAX_HEADER: usize = 14;

/// A frame header as sent by a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    /// Payload length as announced.
    pub len: u64,
    /// Bytes the header itself takes.
    pub size: usize,
}

/// A frame that breaks RFC 6455 framing rules; every one closes the socket with 1002.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    #[error("fragmented control frame")]
    FragmentedControl,
    #[error("control frame payload longer than 125 bytes")]
    ControlTooLong,
    #[error("64-bit length with the most significant bit set")]
    BadLength,
    #[error("client frame is not masked")]
    Unmasked,
}

/// How many bytes the header takes, from its second byte (length field and mask key).
pub fn header_size(second: u8) -> usize {
    let length_bytes = match second & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask_bytes = if second & 0x80 != 0 { 4 } else { 0 };
    2 + length_bytes + mask_bytes
}

/// Parses the header at the start of `buf`; `Ok(None)` while it is incomplete.
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, FrameError> {
    let [first, second, ..] = *buf else {
        return Ok(None);
    };
    let size = header_size(second);
    if buf.len() < size {
        return Ok(None);
    }
    if first & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let fin = first & 0x80 != 0;
    let opcode = first & 0x0F;
    let control = opcode & 0x08 != 0;
    match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG => {}
        other => return Err(FrameError::ReservedOpcode(other)),
    }
    let (len, at) = match second & 0x7F {
        126 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 => {
            // unwrap: `size` covers these 8 bytes.
            let len = u64::from_be_bytes(buf[2..10].try_into().unwrap());
            if len >> 63 != 0 {
                return Err(FrameError::BadLength);
            }
            (len, 10)
        }
        short => (u64::from(short), 2),
    };
    if control && !fin {
        return Err(FrameError::FragmentedControl);
    }
    if control && len > MAX_CONTROL_PAYLOAD as u64 {
        return Err(FrameError::ControlTooLong);
    }
    let mask = (second & 0x80 != 0).then(|| [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        len,
        size,
    }))
}

/// XORs `data` with the mask key, in place (§5.3).
pub fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let word = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        // unwrap: chunks_exact_mut yields exactly 8 bytes.
        let value = u64::from_ne_bytes((*chunk).try_into().unwrap()) ^ word;
        chunk.copy_from_slice(&value.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

/// The header of an unmasked final frame carrying `len` payload bytes.
fn put_header(out: &mut BytesMut, opcode: u8, len: usize) {
    out.put_u8(0x80 | opcode);
    if len < 126 {
        out.put_u8(len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.put_u8(126);
        out.put_u16(len as u16);
    } else {
        out.put_u8(127);
        out.put_u64(len as u64);
    }
}

/// Bytes the header of a server frame with `len` payload bytes takes.
pub fn server_header_size(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// A whole unmasked final frame (header and payload) in one buffer.
pub fn encode(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(server_header_size(payload.len()) + payload.len());
    put_header(&mut out, opcode, payload.len());
    out.put_slice(payload);
    out.freeze()
}

/// A data frame for a payload that carries no type: text when it is valid UTF-8,
/// binary otherwise (ws4redis sent everything as text, which breaks on binary data).
pub fn encode_message(payload: &[u8]) -> Bytes {
    let opcode = match std::str::from_utf8(payload) {
        Ok(_) => OP_TEXT,
        Err(_) => OP_BINARY,
    };
    encode(opcode, payload)
}

/// A close frame with `code` and `reason` (cut at a character boundary to fit §5.5).
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode(OP_CLOSE, &payload)
}

/// A client frame, masked with `mask` (for tests and benchmarks that play the client).
pub fn encode_masked(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = BytesMut::new();
    put_header(&mut out, opcode, payload.len());
    if !fin {
        out[0] &= 0x7F;
    }
    out[1] |= 0x80;
    out.put_slice(&mask);
    let start = out.len();
    out.put_slice(payload);
    unmask(&mut out[start..], mask);
    out.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_use_the_shortest_encoding() {
        for (len, header) in [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            let frame = encode(OP_BINARY, &vec![7; len]);
            assert_eq!(frame.len(), header + len, "{len}");
            assert_eq!(server_header_size(len), header);
        }
    }

    #[test]
    fn masked_frames_parse_back() {
        let raw = encode_masked(true, OP_TEXT, b"hello", [1, 2, 3, 4]);
        let header = parse_header(&raw).unwrap().unwrap();
        assert_eq!(
            header,
            Header {
                fin: true,
                opcode: OP_TEXT,
                mask: Some([1, 2, 3, 4]),
                len: 5,
                size: 6
            }
        );
        let mut payload = raw[header.size..].to_vec();
        unmask(&mut payload, [1, 2, 3, 4]);
        assert_eq!(payload, b"hello");
        for cut in 0..header.size {
            assert_eq!(parse_header(&raw[..cut]), Ok(None));
        }
    }

    #[test]
    fn unmask_matches_the_bytewise_definition() {
        let mask = [0xA1, 0x02, 0xF3, 0x44];
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut fast = data.clone();
            unmask(&mut fast, mask);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(fast, slow);
        }
    }

    #[test]
    fn header_rules_are_enforced() {
        let m = [1, 2, 3, 4];
        assert_eq!(
            parse_header(&[&[0xC1, 0x80][..], &m].concat()),
            Err(FrameError::ReservedBits)
        );
        assert_eq!(
            parse_header(&[&[0x83, 0x80][..], &m].concat()),
            Err(FrameError::ReservedOpcode(3))
        );
        assert_eq!(
            parse_header(&[&[0x09, 0x80][..], &m].concat()),
            Err(FrameError::FragmentedControl)
        );
        assert_eq!(
            parse_header(&[&[0x89, 0xFE, 0, 126][..], &m].concat()),
            Err(FrameError::ControlTooLong)
        );
        let mut huge = vec![0x82, 0xFF];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        huge.extend_from_slice(&m);
        assert_eq!(parse_header(&huge), Err(FrameError::BadLength));
    }

    #[test]
    fn close_reasons_are_cut_to_fit() {
        let long = "é".repeat(100);
        let frame = encode_close(1001, &long);
        assert!(frame.len() <= 2 + MAX_CONTROL_PAYLOAD);
        assert!(std::str::from_utf8(&frame[4..]).is_ok());
    }
}
