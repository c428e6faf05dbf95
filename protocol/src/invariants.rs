//! What the codec promises for any input, as checks that both the property
//! tests (`protocol/tests/`) and the fuzz target `protocol_decode` (`fuzz/`)
//! run, so the two cannot drift apart.
//!
//! Each check returns `Err` with a sentence saying which promise broke;
//! a panic inside the codec is a broken promise too, left to the caller's
//! harness to catch.

use crate::frame::{
    self, DEFAULT_MAX_FRAME, FrameError, Record, Records, StreamDecoder, decode_frame,
    decode_header, encode_frame,
};
use crate::message::{AgentMessage, ControllerMessage};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;

/// One frame decoded both as an agent and as a controller message under the
/// default cap; see [`frame_round_trips_as`] for what is checked.
pub fn frame_round_trips(bytes: &[u8]) -> Result<(), String> {
    frame_round_trips_as::<AgentMessage>(bytes)?;
    frame_round_trips_as::<ControllerMessage>(bytes)
}

/// Decodes `bytes` as one frame of `T` under [`DEFAULT_MAX_FRAME`]:
///
/// - a frame over the cap is refused as too large, whatever it holds;
/// - what decodes passes the header check on its own, with the same
///   version;
/// - what decodes re-encodes under the same cap, into no more bytes than it
///   came in (the encoder writes the shortest form), and that encoding
///   decodes to the same version and message and re-encodes to itself.
///
/// Messages are compared by their `Debug` text, since a float field may
/// hold NaN, which is not equal to itself.
pub fn frame_round_trips_as<T>(bytes: &[u8]) -> Result<(), String>
where
    T: Serialize + DeserializeOwned + Debug,
{
    let max = DEFAULT_MAX_FRAME;
    let (version, message) = match decode_frame::<T>(bytes, max) {
        Ok(decoded) => decoded,
        Err(FrameError::TooLarge { .. }) if bytes.len() > max => return Ok(()),
        Err(e) if bytes.len() > max => {
            return Err(format!(
                "a frame of {} bytes over the cap was refused as {e:?}, not as too large",
                bytes.len()
            ));
        }
        Err(_) => return Ok(()),
    };
    if bytes.len() > max {
        return Err(format!(
            "a frame of {} bytes over the cap of {max} decoded",
            bytes.len()
        ));
    }
    match decode_header(bytes, max) {
        Ok(v) if v == version => {}
        other => {
            return Err(format!(
                "the frame decoded at version {version} but its header checks as {other:?}"
            ));
        }
    }
    let encoded = encode_frame(version, &message, max)
        .map_err(|e| format!("{message:?} decoded but does not re-encode: {e}"))?;
    if encoded.len() > bytes.len() {
        return Err(format!(
            "{message:?} decoded from {} bytes but re-encodes into {}",
            bytes.len(),
            encoded.len()
        ));
    }
    let (again_version, again) = decode_frame::<T>(&encoded, max)
        .map_err(|e| format!("the re-encoding of {message:?} does not decode: {e}"))?;
    let (before, after) = (format!("{message:?}"), format!("{again:?}"));
    if again_version != version || before != after {
        return Err(format!(
            "{version} {before} re-encoded and decoded as {again_version} {after}"
        ));
    }
    let reencoded = encode_frame(again_version, &again, max)
        .map_err(|e| format!("{again:?} decoded but does not re-encode: {e}"))?;
    if reencoded != encoded {
        return Err(format!(
            "{again:?} is not a fixed point of decoding and encoding: {encoded:02x?} became \
             {reencoded:02x?}"
        ));
    }
    Ok(())
}

/// What one way of splitting a stream gave: the frames taken, in order, and
/// the error that ended the stream, if one did.
#[derive(Debug, PartialEq, Eq)]
struct Split {
    frames: Vec<Vec<u8>>,
    error: Option<FrameError>,
}

/// Feeds `stream` to a [`StreamDecoder`] capped at `max` in the chunks
/// `chunks` says (sizes, used in turn and cycled; a zero is an empty read),
/// taking every whole frame after each chunk, until the stream ends or the
/// decoder fails:
///
/// - no frame is longer than the cap;
/// - the frames taken, each with its length prefix again, are the start of
///   the stream, and a stream that ends without error was split whole;
/// - how the stream is cut into reads changes nothing: all at once gives the
///   same frames and the same error;
/// - [`Records`] over the same reads gives the same records (a liveness
///   marker for each empty frame) and the same error;
/// - every frame taken keeps [`frame_round_trips`].
pub fn stream_splits(stream: &[u8], chunks: &[usize], max: usize) -> Result<(), String> {
    let whole = split(stream, &[stream.len()], max);
    let chunked = split(stream, chunks, max);
    if chunked != whole {
        return Err(format!(
            "reads of {chunks:?} split the stream into {chunked:?}, all at once into {whole:?}"
        ));
    }
    let mut rebuilt = Vec::with_capacity(stream.len());
    for f in &whole.frames {
        if f.len() > max {
            return Err(format!(
                "the decoder yielded a frame of {} bytes over the cap of {max}",
                f.len()
            ));
        }
        rebuilt.extend(frame::length_prefixed(f));
    }
    if !stream.starts_with(&rebuilt) {
        return Err("the frames taken are not the start of the stream".into());
    }
    if whole.error.is_none() && stream.len() - rebuilt.len() >= 4 {
        let declared = u32::from_be_bytes([
            stream[rebuilt.len()],
            stream[rebuilt.len() + 1],
            stream[rebuilt.len() + 2],
            stream[rebuilt.len() + 3],
        ]);
        if stream.len() - rebuilt.len() - 4 >= declared as usize {
            return Err(format!(
                "a whole frame of {declared} bytes was left in the decoder"
            ));
        }
    }
    let records = records(stream, chunks, max);
    let expected: Vec<Record> = whole
        .frames
        .iter()
        .map(|f| {
            if f.is_empty() {
                Record::Alive
            } else {
                Record::Frame(f.clone())
            }
        })
        .collect();
    if records != (expected, whole.error.clone()) {
        return Err(format!(
            "records over reads of {chunks:?} gave {records:?}, the decoder {whole:?}"
        ));
    }
    whole.frames.iter().try_for_each(|f| frame_round_trips(f))
}

/// The reads `chunks` describes, cut from `stream` (the rest in one read if
/// the sizes never advance).
fn reads<'a>(stream: &'a [u8], chunks: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = stream;
    let mut sizes = chunks.iter().cycle();
    while !rest.is_empty() {
        // Give up cutting after a full cycle of empty reads.
        let size = match sizes.next() {
            Some(&n) if out.len() <= stream.len() + chunks.len() => n,
            _ => rest.len(),
        };
        let (read, tail) = rest.split_at(size.min(rest.len()));
        out.push(read);
        rest = tail;
    }
    out
}

fn split(stream: &[u8], chunks: &[usize], max: usize) -> Split {
    let mut decoder = StreamDecoder::new(max);
    let mut frames = Vec::new();
    for read in reads(stream, chunks) {
        if let Err(e) = decoder.push(read) {
            return Split {
                frames,
                error: Some(e),
            };
        }
        loop {
            match decoder.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    return Split {
                        frames,
                        error: Some(e),
                    };
                }
            }
        }
    }
    Split {
        frames,
        error: None,
    }
}

fn records(stream: &[u8], chunks: &[usize], max: usize) -> (Vec<Record>, Option<FrameError>) {
    let mut records = Records::new(max);
    let mut out = Vec::new();
    for read in reads(stream, chunks) {
        if let Err(e) = records.push(read) {
            return (out, Some(e));
        }
        loop {
            match records.next() {
                Ok(Some(r)) => out.push(r),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}
