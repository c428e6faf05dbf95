//! Arbitrary bytes through the protocol's decoders: as one frame of either
//! side's messages, as a stream of length-prefixed frames cut into reads of
//! sizes taken from the input, and wrapped as frames of such a stream under
//! the default cap and under a small one. The checks are
//! `kiwi_protocol::invariants`, which the property tests run too.

#![no_main]

use kiwi_protocol::frame::{DEFAULT_MAX_FRAME, LIVENESS, length_prefixed};
use kiwi_protocol::invariants::{frame_round_trips, stream_splits};
use libfuzzer_sys::fuzz_target;

fn holds(check: Result<(), String>) {
    if let Err(broken) = check {
        panic!("{broken}");
    }
}

fuzz_target!(|data: &[u8]| {
    holds(frame_round_trips(data));
    let chunks: Vec<usize> = data.iter().take(8).map(|b| usize::from(b % 32)).collect();
    holds(stream_splits(data, &chunks, DEFAULT_MAX_FRAME));
    let mut stream = length_prefixed(data);
    stream.extend(LIVENESS);
    stream.extend(length_prefixed(data));
    holds(stream_splits(&stream, &chunks, DEFAULT_MAX_FRAME));
    holds(stream_splits(&stream, &chunks, data.len() / 2));
});
