//! What decodes re-encodes to the same message, and a stream of frames
//! splits the same way however its reads are cut: the checks of
//! [`kiwi_protocol::invariants`], which the fuzz target `protocol_decode`
//! runs too, here over its seeds (`fuzz/seeds/protocol_decode/`) mutated at
//! random and over streams made of them.

use kiwi_protocol::frame::{DEFAULT_MAX_FRAME, LIVENESS, length_prefixed};
use kiwi_protocol::invariants::{frame_round_trips, stream_splits};
use kiwi_protocol::version::CURRENT;
use proptest::prelude::*;
use std::sync::LazyLock;

/// The fuzz target's seeds: a valid frame of every kind of message, with
/// something in each field (the golden frames of `message.rs`), for the
/// mutations to start from.
static SEEDS: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/seeds/protocol_decode");
    let mut seeds: Vec<(std::path::PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list the seeds in {dir}: {e}"))
        .map(|entry| {
            let path = entry.expect("a seed file").path();
            let bytes = std::fs::read(&path).expect("a seed file reads");
            (path, bytes)
        })
        .collect();
    // The same order everywhere, so a failure's seed index means one file.
    seeds.sort();
    assert!(seeds.len() >= 12, "seeds missing in {dir}");
    seeds.into_iter().map(|(_, bytes)| bytes).collect()
});

/// One edit of a frame's bytes.
#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Edit::Set(at, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Edit::Insert(at, b)),
        any::<usize>().prop_map(Edit::Remove),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

/// A seed frame with `edits` applied (positions wrap around its length).
fn mutant(seed: usize, edits: &[Edit]) -> Vec<u8> {
    let mut frame = SEEDS[seed % SEEDS.len()].clone();
    for e in edits {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
        match *e {
            Edit::Set(i, b) if !frame.is_empty() => {
                let i = at(i, frame.len());
                frame[i] = b;
            }
            Edit::Insert(i, b) => {
                let i = at(i, frame.len() + 1);
                frame.insert(i, b);
            }
            Edit::Remove(i) if !frame.is_empty() => {
                let i = at(i, frame.len());
                frame.remove(i);
            }
            Edit::Truncate(i) => frame.truncate(at(i, frame.len() + 1)),
            _ => {}
        }
    }
    frame
}

#[test]
fn every_seed_round_trips() {
    for seed in SEEDS.iter() {
        let seed = seed.as_slice();
        frame_round_trips(seed).unwrap();
        stream_splits(&length_prefixed(seed), &[1], DEFAULT_MAX_FRAME).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn mutated_frames_decode_to_what_they_re_encode_to(
        seed in any::<usize>(),
        edits in proptest::collection::vec(edit(), 1..4),
    ) {
        frame_round_trips(&mutant(seed, &edits)).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn arbitrary_bodies_after_a_header_round_trip(
        body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut frame = b"KIWI".to_vec();
        frame.extend([CURRENT.major, CURRENT.minor]);
        frame.extend(body);
        frame_round_trips(&frame).map_err(TestCaseError::fail)?;
    }

    /// Streams of valid, mutated and empty frames (liveness markers), then
    /// possibly garbage, cut into reads of random sizes, under the default
    /// cap and under one small enough that some frames exceed it.
    #[test]
    fn streams_split_alike_however_they_are_read(
        frames in proptest::collection::vec(
            (any::<usize>(), proptest::collection::vec(edit(), 0..3), any::<bool>()),
            0..6,
        ),
        tail in proptest::collection::vec(any::<u8>(), 0..12),
        chunks in proptest::collection::vec(0usize..40, 1..8),
        small_cap in 0usize..120,
    ) {
        let mut stream = Vec::new();
        for (seed, edits, marker) in &frames {
            if *marker {
                stream.extend(LIVENESS);
            }
            stream.extend(length_prefixed(&mutant(*seed, edits)));
        }
        stream.extend(&tail);
        for max in [DEFAULT_MAX_FRAME, small_cap] {
            stream_splits(&stream, &chunks, max).map_err(TestCaseError::fail)?;
        }
    }

    #[test]
    fn arbitrary_streams_split_alike_however_they_are_read(
        stream in proptest::collection::vec(any::<u8>(), 0..512),
        chunks in proptest::collection::vec(0usize..40, 0..8),
    ) {
        stream_splits(&stream, &chunks, DEFAULT_MAX_FRAME).map_err(TestCaseError::fail)?;
    }
}
