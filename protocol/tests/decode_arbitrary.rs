//! Decoding arbitrary bytes never panics, and never allocates more than a
//! fixed multiple of the frame-size cap, whatever the lengths inside a frame
//! claim.
//!
//! A counting global allocator measures the peak bytes live during each
//! decode on the test's own thread.

#![allow(
    unsafe_code,
    reason = "a counting global allocator needs `unsafe impl GlobalAlloc`"
)]

use kiwi_protocol::frame::{DEFAULT_MAX_FRAME, MAX_DECODE_ALLOCATION, decode_frame, encode_frame};
use kiwi_protocol::message::{Goodbye, Heartbeat};
use kiwi_protocol::version::CURRENT;
use kiwi_protocol::{AgentMessage, ControllerMessage};
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    // `try_with`: thread-local storage may be gone while a thread exits.
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add_signed(delta);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        track(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        track(-(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        track(new_size as isize - layout.size() as isize);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Peak bytes allocated (above what was live before) while running `f`.
fn peak_during(f: impl FnOnce()) -> usize {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    f();
    PEAK.with(Cell::get) - base
}

fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
    let decoded = decode_frame::<AgentMessage>(bytes, DEFAULT_MAX_FRAME);
    prop_assert_eq!(
        AgentMessage::is_heartbeat_frame(bytes, DEFAULT_MAX_FRAME),
        matches!(decoded, Ok((_, AgentMessage::Heartbeat(_)))),
        "the heartbeat check disagrees with decoding"
    );
    let peak = peak_during(|| {
        let _ = decode_frame::<AgentMessage>(bytes, DEFAULT_MAX_FRAME);
    });
    prop_assert!(
        peak <= MAX_DECODE_ALLOCATION,
        "agent decode peaked at {peak} bytes"
    );
    let peak = peak_during(|| {
        let _ = decode_frame::<ControllerMessage>(bytes, DEFAULT_MAX_FRAME);
    });
    prop_assert!(
        peak <= MAX_DECODE_ALLOCATION,
        "controller decode peaked at {peak} bytes"
    );
    Ok(())
}

fn header() -> Vec<u8> {
    let mut h = b"KIWI".to_vec();
    h.push(CURRENT.major);
    h.push(CURRENT.minor);
    h
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        check(&bytes)?;
    }

    #[test]
    fn valid_header_arbitrary_body(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut frame = header();
        frame.extend(body);
        check(&frame)?;
    }

    /// Bodies made of small varints: every length prefix claims many
    /// elements, the worst case for pre-allocation.
    #[test]
    fn length_bombs(variant in 0u8..5, fill in 1u8..0x7f, len in 0usize..DEFAULT_MAX_FRAME) {
        let mut frame = header();
        frame.push(variant);
        frame.resize(len.max(7), fill);
        check(&frame)?;
    }
}

#[test]
fn a_heartbeat_is_recognised_without_allocating() {
    for time_ms in [0, -1, 1_780_000_000_000, i64::MIN, i64::MAX] {
        let frame = encode_frame(
            CURRENT,
            &AgentMessage::Heartbeat(Heartbeat { time_ms }),
            DEFAULT_MAX_FRAME,
        )
        .expect("encode");
        let peak = peak_during(|| {
            assert!(AgentMessage::is_heartbeat_frame(&frame, DEFAULT_MAX_FRAME));
        });
        assert_eq!(peak, 0, "recognising a heartbeat allocated {peak} bytes");
        let mut longer = frame.clone();
        longer.push(0);
        assert!(!AgentMessage::is_heartbeat_frame(
            &longer,
            DEFAULT_MAX_FRAME
        ));
        assert!(!AgentMessage::is_heartbeat_frame(
            &frame[..frame.len() - 1],
            DEFAULT_MAX_FRAME
        ));
    }
    let goodbye = encode_frame(
        CURRENT,
        &AgentMessage::Goodbye(Goodbye {
            reason: "stop".into(),
            back_in_s: None,
        }),
        DEFAULT_MAX_FRAME,
    )
    .expect("encode");
    assert!(!AgentMessage::is_heartbeat_frame(
        &goodbye,
        DEFAULT_MAX_FRAME
    ));
}

#[test]
fn oversized_frames_are_refused_before_decoding() {
    let mut frame = header();
    frame.resize(DEFAULT_MAX_FRAME + 1, 0);
    let peak = peak_during(|| {
        let err = decode_frame::<AgentMessage>(&frame, DEFAULT_MAX_FRAME).unwrap_err();
        assert!(matches!(err, kiwi_protocol::FrameError::TooLarge { .. }));
    });
    assert!(
        peak < 1024,
        "refusing an oversized frame allocated {peak} bytes"
    );
}

#[test]
fn a_claimed_huge_length_allocates_little() {
    // A Goodbye whose reason claims u32::MAX bytes in a 16-byte frame.
    let mut frame = header();
    frame.push(4);
    frame.extend([0xff, 0xff, 0xff, 0xff, 0x0f]);
    frame.extend(b"abc");
    let peak = peak_during(|| {
        assert!(decode_frame::<AgentMessage>(&frame, DEFAULT_MAX_FRAME).is_err());
    });
    assert!(peak < 1024, "a length bomb allocated {peak} bytes");
}
