//! The envelope every message travels in, and its codec.
//!
//! A frame is `b"KIWI"`, the protocol version (major, minor: one byte each)
//! and a postcard-encoded body. The size cap is checked before anything is
//! decoded, decoding never panics, and a frame must be consumed exactly
//! (trailing bytes are an error, since a minor version may only append enum
//! variants and never lengthens a message).
//!
//! Message transports (WebSocket) carry one frame per message. Stream
//! transports prefix each frame with its length as a big-endian `u32`;
//! [`StreamDecoder`] splits such a stream without I/O.

use crate::version::{self, ProtocolVersion};
use serde::{Serialize, de::DeserializeOwned};

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"KIWI";

/// Length of the fixed header: magic and version.
pub const HEADER_LEN: usize = 6;

/// The default cap on a frame, header included.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;

/// The most memory decoding one frame of at most [`DEFAULT_MAX_FRAME`] bytes
/// may take. Length prefixes inside a frame are never trusted beyond the
/// bytes that remain (postcard bounds its pre-allocation by them), so memory
/// is bounded by the frame's size times the largest ratio of in-memory to
/// encoded size of any element (an empty `String` is 24 bytes in memory and 1
/// on the wire). A property test with a counting allocator checks it.
pub const MAX_DECODE_ALLOCATION: usize = 32 * DEFAULT_MAX_FRAME;

/// Why a frame was refused. Every variant closes only the connection that
/// sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the cap of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("frame of {len} bytes is shorter than the {HEADER_LEN}-byte header")]
    Truncated { len: usize },
    #[error("bad magic {found:02x?} (expected \"KIWI\")")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported protocol version {found}")]
    UnsupportedVersion { found: ProtocolVersion },
    #[error("malformed body: {0}")]
    Malformed(String),
    #[error("{extra} trailing bytes after the message")]
    TrailingBytes { extra: usize },
    #[error("message cannot be encoded: {0}")]
    Encode(String),
}

impl FrameError {
    /// A short stable label for metrics (`reason` label values).
    pub fn kind(&self) -> &'static str {
        match self {
            FrameError::TooLarge { .. } => "too_large",
            FrameError::Truncated { .. } => "truncated",
            FrameError::BadMagic { .. } => "bad_magic",
            FrameError::UnsupportedVersion { .. } => "unsupported_version",
            FrameError::Malformed(_) => "malformed",
            FrameError::TrailingBytes { .. } => "trailing_bytes",
            FrameError::Encode(_) => "encode",
        }
    }
}

/// Encodes `message` as one frame stamped with `version`, refusing to
/// produce a frame larger than `max` bytes.
pub fn encode_frame<T: Serialize>(
    version: ProtocolVersion,
    message: &T,
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(&MAGIC);
    out.push(version.major);
    out.push(version.minor);
    let out = postcard::to_extend(message, out).map_err(|e| FrameError::Encode(e.to_string()))?;
    if out.len() > max {
        return Err(FrameError::TooLarge {
            len: out.len(),
            max,
        });
    }
    Ok(out)
}

/// Reads and checks a frame's header without decoding its body.
pub fn decode_header(bytes: &[u8], max: usize) -> Result<ProtocolVersion, FrameError> {
    if bytes.len() > max {
        return Err(FrameError::TooLarge {
            len: bytes.len(),
            max,
        });
    }
    if bytes.len() < HEADER_LEN {
        return Err(FrameError::Truncated { len: bytes.len() });
    }
    let found = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if found != MAGIC {
        return Err(FrameError::BadMagic { found });
    }
    let v = ProtocolVersion::new(bytes[4], bytes[5]);
    if !version::can_decode(v) {
        return Err(FrameError::UnsupportedVersion { found: v });
    }
    Ok(v)
}

/// Decodes one frame: size cap first, then header, then the body, which must
/// be consumed exactly.
pub fn decode_frame<T: DeserializeOwned>(
    bytes: &[u8],
    max: usize,
) -> Result<(ProtocolVersion, T), FrameError> {
    let version = decode_header(bytes, max)?;
    let (message, rest) = postcard::take_from_bytes::<T>(&bytes[HEADER_LEN..])
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes { extra: rest.len() });
    }
    Ok((version, message))
}

/// Prefixes a frame with its length for stream transports.
pub fn length_prefixed(frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len() + 4);
    // Frames are capped far below 4 GiB; saturate rather than wrap if a
    // caller ever passes more, so the peer refuses it as too large.
    let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(frame);
    out
}

/// Splits a byte stream of length-prefixed frames, sans I/O: feed it what
/// the socket gave, then take whole frames. The declared length is checked
/// against the cap before any of the frame is buffered.
#[derive(Debug)]
pub struct StreamDecoder {
    max: usize,
    buf: Vec<u8>,
}

impl StreamDecoder {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            buf: Vec::new(),
        }
    }

    /// Appends received bytes. Fails (and must then be discarded) when the
    /// next frame declares a length above the cap.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        self.buf.extend_from_slice(bytes);
        self.check_declared()
    }

    fn check_declared(&self) -> Result<(), FrameError> {
        if self.buf.len() >= 4 {
            let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if len > self.max {
                return Err(FrameError::TooLarge { len, max: self.max });
            }
        }
        Ok(())
    }

    /// Takes the next whole frame (without its length prefix), if one has
    /// arrived.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        self.check_declared()?;
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let frame = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(frame))
    }
}

// ------------------------------------------------ stream records (QUIC)

/// Stream transports (QUIC) carry records: a big-endian `u32` length, then
/// that many bytes, a protocol frame. A record of length 0 is a liveness
/// marker, never a frame (a frame has at least its header).
///
/// A record's length prefix.
pub const RECORD_HEADER: usize = 4;

/// The liveness marker: a record of length 0.
pub const LIVENESS: [u8; RECORD_HEADER] = [0; RECORD_HEADER];

/// One record read off the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Record {
    /// A record of length 0.
    Alive,
    Frame(Vec<u8>),
}

/// Buffers above this are let go once empty, so that one large frame does
/// not keep its memory for the life of the connection.
pub const KEEP_BUFFER: usize = 4 * 1024;

/// The records of one stream, split as its bytes arrive (the splitting is
/// [`StreamDecoder`]'s, which checks each declared length against the cap
/// before buffering the record).
#[derive(Debug)]
pub struct Records {
    max_frame: usize,
    decoder: StreamDecoder,
    /// Bytes pushed and not yet taken as records.
    buffered: usize,
    /// The most bytes buffered since the decoder was last replaced.
    high_water: usize,
}

impl Records {
    pub fn new(max_frame: usize) -> Self {
        Records {
            max_frame,
            decoder: StreamDecoder::new(max_frame),
            buffered: 0,
            high_water: 0,
        }
    }

    /// Appends bytes read off the stream; fails (for good) when a record
    /// declares a length over the cap.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        self.buffered += bytes.len();
        self.high_water = self.high_water.max(self.buffered);
        self.decoder.push(bytes)
    }

    /// The next whole record, if one has arrived.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Record>, FrameError> {
        let Some(frame) = self.decoder.next_frame()? else {
            return Ok(None);
        };
        self.buffered -= RECORD_HEADER + frame.len();
        if self.buffered == 0 && self.high_water > KEEP_BUFFER {
            self.decoder = StreamDecoder::new(self.max_frame);
            self.high_water = 0;
        }
        Ok(Some(if frame.is_empty() {
            Record::Alive
        } else {
            Record::Frame(frame)
        }))
    }
}

/// The length prefix of a record of `len` bytes (`None` beyond what a
/// `u32` says).
pub fn record_header(len: usize) -> Option<[u8; RECORD_HEADER]> {
    u32::try_from(len).ok().map(u32::to_be_bytes)
}

/// A whole record: the prefix, then `frame`.
pub fn encode_record(frame: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(RECORD_HEADER + frame.len());
    record.extend_from_slice(&record_header(frame.len()).unwrap_or([0xff; RECORD_HEADER]));
    record.extend_from_slice(frame);
    record
}

/// QUIC application close codes, both sides.
pub mod close {
    /// A normal close.
    pub const CLOSE_NORMAL: u32 = 0x00;
    /// The peer broke the protocol; the close reason says how.
    pub const CLOSE_VIOLATION: u32 = 0x01;
    /// The controller is shutting down.
    pub const CLOSE_SHUTDOWN: u32 = 0x02;
    /// The controller refused the robot's certificate; the close reason is
    /// `<reason>: <sentence>` (e.g. `revoked: the robot's certificate was
    /// revoked`).
    pub const CLOSE_REFUSED: u32 = 0x10;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{AgentMessage, Heartbeat};
    use crate::version::CURRENT;

    #[test]
    fn round_trip() {
        let msg = AgentMessage::Heartbeat(Heartbeat { time_ms: 42 });
        let bytes = encode_frame(CURRENT, &msg, DEFAULT_MAX_FRAME).unwrap();
        let (v, back): (_, AgentMessage) = decode_frame(&bytes, DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(v, CURRENT);
        assert_eq!(back, msg);
    }

    #[test]
    fn refuses_bad_header_and_trailing_bytes() {
        let msg = AgentMessage::Heartbeat(Heartbeat { time_ms: 1 });
        let good = encode_frame(CURRENT, &msg, DEFAULT_MAX_FRAME).unwrap();

        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        assert!(matches!(
            decode_frame::<AgentMessage>(&bad_magic, DEFAULT_MAX_FRAME),
            Err(FrameError::BadMagic { .. })
        ));

        let mut bad_version = good.clone();
        bad_version[4] = 9;
        assert_eq!(
            decode_frame::<AgentMessage>(&bad_version, DEFAULT_MAX_FRAME).unwrap_err(),
            FrameError::UnsupportedVersion {
                found: ProtocolVersion::new(9, CURRENT.minor)
            }
        );

        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(
            decode_frame::<AgentMessage>(&trailing, DEFAULT_MAX_FRAME).unwrap_err(),
            FrameError::TrailingBytes { extra: 1 }
        );

        assert_eq!(
            decode_frame::<AgentMessage>(&good[..3], DEFAULT_MAX_FRAME).unwrap_err(),
            FrameError::Truncated { len: 3 }
        );
        assert!(matches!(
            decode_frame::<AgentMessage>(&good, 4),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn encoder_refuses_oversized_messages() {
        let msg = AgentMessage::Goodbye(crate::message::Goodbye {
            reason: "x".repeat(200),
            back_in_s: None,
        });
        assert!(matches!(
            encode_frame(CURRENT, &msg, 100),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn stream_decoder_splits_and_caps() {
        let a = encode_frame(
            CURRENT,
            &AgentMessage::Heartbeat(Heartbeat { time_ms: 1 }),
            1024,
        )
        .unwrap();
        let b = encode_frame(
            CURRENT,
            &AgentMessage::Heartbeat(Heartbeat { time_ms: 2 }),
            1024,
        )
        .unwrap();
        let mut stream = length_prefixed(&a);
        stream.extend(length_prefixed(&b));
        let mut dec = StreamDecoder::new(1024);
        // Byte by byte, as a slow socket would deliver it.
        let mut frames = Vec::new();
        for byte in &stream {
            dec.push(std::slice::from_ref(byte)).unwrap();
            while let Some(f) = dec.next_frame().unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(frames, vec![a, b]);

        let mut dec = StreamDecoder::new(1024);
        assert!(matches!(
            dec.push(&(1_000_000u32).to_be_bytes()),
            Err(FrameError::TooLarge { len: 1_000_000, .. })
        ));
    }

    #[test]
    fn records_split_across_reads_come_out_whole() {
        let mut stream = encode_record(b"first frame");
        stream.extend(encode_record(b""));
        stream.extend(encode_record(&[7; 300]));
        let mut records = Records::new(1024);
        let mut out = Vec::new();
        // Byte by byte, as the slowest network would deliver them.
        for byte in &stream {
            records.push(std::slice::from_ref(byte)).unwrap();
            while let Some(r) = records.next().unwrap() {
                out.push(r);
            }
        }
        assert_eq!(
            out,
            [
                Record::Frame(b"first frame".to_vec()),
                Record::Alive,
                Record::Frame(vec![7; 300]),
            ]
        );
        assert_eq!(records.buffered, 0);

        // All at once.
        let mut records = Records::new(1024);
        records.push(&stream).unwrap();
        assert_eq!(
            records.next().unwrap(),
            Some(Record::Frame(b"first frame".to_vec()))
        );
        assert_eq!(records.next().unwrap(), Some(Record::Alive));
        assert!(matches!(records.next().unwrap(), Some(Record::Frame(_))));
        assert_eq!(records.next().unwrap(), None);
    }

    #[test]
    fn an_oversized_record_is_refused_from_its_length() {
        let mut records = Records::new(1024);
        records.push(&encode_record(b"ok")).unwrap();
        // Only the length has arrived: refused before any of it is read.
        assert!(
            records.push(&1025u32.to_be_bytes()).is_ok(),
            "first record still pending"
        );
        assert_eq!(records.next().unwrap(), Some(Record::Frame(b"ok".to_vec())));
        assert!(matches!(
            records.next(),
            Err(FrameError::TooLarge {
                len: 1025,
                max: 1024
            })
        ));
        // For good: the stream cannot be resynchronised.
        assert!(records.next().is_err());

        let mut records = Records::new(1024);
        assert!(matches!(
            records.push(&u32::MAX.to_be_bytes()),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_large_frame_does_not_keep_its_buffer() {
        let mut records = Records::new(64 * 1024);
        records.push(&encode_record(&[1; 60_000])).unwrap();
        assert!(matches!(records.next().unwrap(), Some(Record::Frame(_))));
        assert_eq!((records.buffered, records.high_water), (0, 0));
    }
}
