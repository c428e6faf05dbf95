//! The durable, bounded outbox of reports: every report the agent makes is
//! numbered and written to disk before it is sent, and kept until the
//! controller acknowledges it, so nothing reported is lost across a network
//! cut, a controller restart or an agent crash.
//!
//! Layout in `<state_dir>/outbox/`:
//!
//! - `log`: records of `[len: u32 LE][crc32 of body: u32 LE][body]`, the body
//!   a postcard-encoded [`Report`]; appended and `sync_data`ed before
//!   [`Outbox::push`] returns, rewritten (compacted) once the settled prefix
//!   is large;
//! - `marks.json`: the highest acknowledged seq and the highest seq no longer
//!   held (acknowledged or dropped), replaced atomically.
//!
//! Invariants: seqs are assigned from 1 without gaps and never reused (the
//! next seq is derived from the log and the marks, so it survives restarts);
//! pending reports are in seq order; at most `capacity` are held.

use crate::state::{sync_dir, write_atomic};
use kiwi_protocol::message::Report;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const LOG_FILE: &str = "log";
const MARKS_FILE: &str = "marks.json";
const RECORD_HEADER: usize = 8;
/// A record body larger than this is corruption: a report must fit a frame.
const MAX_RECORD: usize = kiwi_protocol::DEFAULT_MAX_FRAME;
/// Compact once at least this many settled records sit in the log (and they
/// outnumber the pending ones).
pub const DEFAULT_COMPACT_THRESHOLD: usize = 1024;

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Marks {
    /// The highest seq the controller acknowledged.
    acked: u64,
    /// The highest seq no longer held: `max(acked, last dropped)`.
    settled: u64,
}

/// Why the outbox cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox I/O in {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("report {seq} cannot be encoded: {message}")]
    Encode { seq: u64, message: String },
}

/// The outbox of one agent. Not shared: its owner serialises access.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    /// The log is opened for each append, not held: an agent appends a
    /// report every few seconds at most, and a simulator holding ten
    /// thousand outboxes would otherwise hold ten thousand files open.
    log_len: u64,
    capacity: usize,
    compact_threshold: usize,
    pending: VecDeque<Report>,
    marks: Marks,
    next_seq: u64,
    /// Records in the log that are no longer pending.
    settled_records: usize,
    dropped_total: u64,
}

impl Outbox {
    /// Opens (or creates) the outbox in `<state_dir>/outbox/`, holding at
    /// most `capacity` unacknowledged reports (at least 1). A torn or corrupt
    /// tail of the log is truncated with a warning.
    pub fn open(state_dir: &Path, capacity: usize) -> Result<Self, OutboxError> {
        let dir = state_dir.join("outbox");
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| OutboxError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let marks_path = dir.join(MARKS_FILE);
        let marks = read_marks(&marks_path).map_err(io_err(&marks_path))?;
        let log_path = dir.join(LOG_FILE);
        let bytes = match std::fs::read(&log_path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err(&log_path)(e)),
        };
        let scan = scan_log(&bytes);
        if let Some(problem) = &scan.problem {
            tracing::warn!(
                path = %log_path.display(),
                offset = scan.valid_len,
                dropped_bytes = bytes.len() - scan.valid_len,
                problem = %problem,
                "outbox log has a torn or corrupt tail; truncating it"
            );
            let f = OpenOptions::new()
                .write(true)
                .open(&log_path)
                .map_err(io_err(&log_path))?;
            f.set_len(scan.valid_len as u64)
                .and_then(|()| f.sync_data())
                .map_err(io_err(&log_path))?;
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(&log_path))?;
        sync_dir(&dir).map_err(io_err(&dir))?;

        let last_in_log = scan.reports.last().map_or(0, |r| r.seq);
        let total = scan.reports.len();
        let pending: VecDeque<Report> = scan
            .reports
            .into_iter()
            .filter(|r| r.seq > marks.settled)
            .collect();
        let mut outbox = Self {
            dir,
            log_len: scan.valid_len as u64,
            capacity: capacity.max(1),
            compact_threshold: DEFAULT_COMPACT_THRESHOLD,
            settled_records: total - pending.len(),
            pending,
            marks,
            next_seq: last_in_log.max(marks.settled) + 1,
            dropped_total: 0,
        };
        outbox.enforce_capacity()?;
        outbox.maybe_compact()?;
        Ok(outbox)
    }

    /// Changes how many settled records trigger a compaction (tests use a
    /// small number).
    pub fn with_compact_threshold(mut self, records: usize) -> Self {
        self.compact_threshold = records.max(1);
        self
    }

    /// Numbers `report` (its `seq` is assigned here), appends it to the log
    /// and syncs it before returning the stored report. When `capacity`
    /// reports are already held, the oldest is dropped with a warning.
    pub fn push(&mut self, mut report: Report) -> Result<Report, OutboxError> {
        report.seq = self.next_seq;
        let body = postcard::to_stdvec(&report).map_err(|e| OutboxError::Encode {
            seq: report.seq,
            message: e.to_string(),
        })?;
        if body.len() > MAX_RECORD {
            return Err(OutboxError::Encode {
                seq: report.seq,
                message: format!("{} bytes exceed the cap of {MAX_RECORD}", body.len()),
            });
        }
        let mut record = Vec::with_capacity(RECORD_HEADER + body.len());
        // The cap above keeps the length far inside u32.
        record.extend_from_slice(&(body.len() as u32).to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        record.extend_from_slice(&body);
        let path = self.log_path();
        let mut log = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|source| OutboxError::Io {
                path: path.clone(),
                source,
            })?;
        let written = log.write_all(&record).and_then(|()| log.sync_data());
        if let Err(source) = written {
            // Cut a partial record off again, so later appends do not land
            // behind garbage that the next open would truncate with them.
            if let Err(e) = log.set_len(self.log_len) {
                tracing::warn!(error = %e, "could not cut a failed outbox append");
            }
            return Err(OutboxError::Io { path, source });
        }
        self.log_len += record.len() as u64;
        self.next_seq += 1;
        self.pending.push_back(report.clone());
        self.enforce_capacity()?;
        Ok(report)
    }

    /// Records the controller's acknowledgement of everything up to `seq`
    /// and drops those reports. Stale acks are ignored. An ack beyond the
    /// last assigned seq (the controller remembers more than this outbox,
    /// e.g. after the state directory was wiped) moves numbering past it, so
    /// new reports are not taken for duplicates.
    pub fn ack(&mut self, seq: u64) -> Result<(), OutboxError> {
        if seq <= self.marks.acked {
            return Ok(());
        }
        if seq >= self.next_seq {
            tracing::warn!(
                acked = seq,
                last_assigned = self.next_seq - 1,
                "controller acknowledged a seq this agent never assigned; numbering continues after it"
            );
            self.next_seq = seq + 1;
        }
        self.marks.acked = seq;
        self.marks.settled = self.marks.settled.max(seq);
        while self.pending.front().is_some_and(|r| r.seq <= seq) {
            self.pending.pop_front();
            self.settled_records += 1;
        }
        self.save_marks()?;
        self.maybe_compact()
    }

    /// The unacknowledged reports, in seq order.
    pub fn pending(&self) -> Vec<Report> {
        self.pending.iter().cloned().collect()
    }

    /// How many unacknowledged reports are held.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The highest seq the controller acknowledged (0: none).
    pub fn acked(&self) -> u64 {
        self.marks.acked
    }

    /// The highest seq this outbox no longer holds (acknowledged or dropped):
    /// what `Hello.last_acked_seq` carries, since everything above it is
    /// resent and nothing at or below it can be.
    pub fn settled(&self) -> u64 {
        self.marks.settled
    }

    /// The seq the next report will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Reports dropped for lack of room since this outbox was opened.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    fn enforce_capacity(&mut self) -> Result<(), OutboxError> {
        if self.pending.len() <= self.capacity {
            return Ok(());
        }
        let excess = self.pending.len() - self.capacity;
        let first = self.pending.front().map_or(0, |r| r.seq);
        let mut last = first;
        for _ in 0..excess {
            if let Some(r) = self.pending.pop_front() {
                last = r.seq;
                self.settled_records += 1;
            }
        }
        self.dropped_total += excess as u64;
        self.marks.settled = self.marks.settled.max(last);
        tracing::warn!(
            first_dropped_seq = first,
            last_dropped_seq = last,
            dropped = excess,
            dropped_total = self.dropped_total,
            capacity = self.capacity,
            "outbox full: dropped the oldest unacknowledged reports (seq {first}..={last})"
        );
        self.save_marks()?;
        self.maybe_compact()
    }

    fn save_marks(&self) -> Result<(), OutboxError> {
        let path = self.dir.join(MARKS_FILE);
        let bytes = serde_json::to_vec(&self.marks).map_err(|e| OutboxError::Io {
            path: path.clone(),
            source: e.into(),
        })?;
        write_atomic(&path, &bytes).map_err(|source| OutboxError::Io { path, source })
    }

    fn maybe_compact(&mut self) -> Result<(), OutboxError> {
        if self.settled_records < self.compact_threshold
            || self.settled_records < self.pending.len()
        {
            return Ok(());
        }
        self.compact()
    }

    /// Rewrites the log with only the pending records. The marks are saved
    /// before any compaction, so a crash at any point leaves either the old
    /// log (whose settled records the marks skip) or the new one.
    fn compact(&mut self) -> Result<(), OutboxError> {
        let path = self.log_path();
        let mut bytes = Vec::new();
        for r in &self.pending {
            let body = postcard::to_stdvec(r).map_err(|e| OutboxError::Encode {
                seq: r.seq,
                message: e.to_string(),
            })?;
            bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
            bytes.extend_from_slice(&body);
        }
        let io = |source| OutboxError::Io {
            path: path.clone(),
            source,
        };
        write_atomic(&path, &bytes).map_err(io)?;
        tracing::debug!(
            settled = self.settled_records,
            pending = self.pending.len(),
            "compacted the outbox log"
        );
        self.log_len = bytes.len() as u64;
        self.settled_records = 0;
        Ok(())
    }
}

fn read_marks(path: &Path) -> io::Result<Marks> {
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice::<Marks>(&bytes) {
            Ok(mut m) => {
                m.settled = m.settled.max(m.acked);
                Ok(m)
            }
            Err(e) => {
                // Losing the marks only means resending reports the
                // controller already has; it deduplicates them.
                tracing::warn!(path = %path.display(), error = %e, "unreadable outbox marks; starting from 0");
                Ok(Marks::default())
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Marks::default()),
        Err(e) => Err(e),
    }
}

/// The reports in the outbox log of `state_dir`, oldest first, read
/// without changing anything (a torn tail, such as an append under way, is
/// left out): what another process, a test, may look at while the agent
/// runs. Acknowledged reports not yet compacted away are included.
pub fn read_log(state_dir: &Path) -> io::Result<Vec<Report>> {
    match std::fs::read(state_dir.join("outbox").join(LOG_FILE)) {
        Ok(bytes) => Ok(scan_log(&bytes).reports),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

struct Scan {
    reports: Vec<Report>,
    /// Bytes of whole, valid records from the start.
    valid_len: usize,
    problem: Option<String>,
}

/// Reads records until the end or the first torn or corrupt one.
fn scan_log(bytes: &[u8]) -> Scan {
    let mut reports: Vec<Report> = Vec::new();
    let mut at = 0;
    let problem = loop {
        let rest = &bytes[at..];
        if rest.is_empty() {
            break None;
        }
        if rest.len() < RECORD_HEADER {
            break Some(format!("torn record header ({} bytes)", rest.len()));
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len > MAX_RECORD {
            break Some(format!("record length {len} exceeds {MAX_RECORD}"));
        }
        let Some(body) = rest.get(RECORD_HEADER..RECORD_HEADER + len) else {
            break Some(format!(
                "torn record ({} of {len} body bytes)",
                rest.len() - RECORD_HEADER
            ));
        };
        if crc32fast::hash(body) != crc {
            break Some("record checksum mismatch".to_string());
        }
        let report: Report = match postcard::from_bytes(body) {
            Ok(r) => r,
            Err(e) => break Some(format!("undecodable record: {e}")),
        };
        if let Some(prev) = reports.last()
            && report.seq <= prev.seq
        {
            break Some(format!(
                "record seq {} does not follow seq {}",
                report.seq, prev.seq
            ));
        }
        reports.push(report);
        at += RECORD_HEADER + len;
    };
    Scan {
        reports,
        valid_len: at,
        problem,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiwi_protocol::message::{AgentHealth, HealthStatus, Telemetry, WorkloadState};
    use proptest::prelude::*;

    fn report(time_ms: i64) -> Report {
        Report {
            seq: 0,
            time_ms,
            health: AgentHealth {
                status: HealthStatus::Healthy,
                reasons: Vec::new(),
            },
            workload: WorkloadState::Running,
            maintenance: false,
            telemetry: Telemetry::default(),
        }
    }

    fn seqs(o: &Outbox) -> Vec<u64> {
        o.pending().iter().map(|r| r.seq).collect()
    }

    #[test]
    fn restart_keeps_pending_and_numbering() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 100).unwrap();
        for t in 0..3 {
            let r = o.push(report(t)).unwrap();
            assert_eq!(r.seq, t as u64 + 1);
        }
        drop(o);
        let mut o = Outbox::open(dir.path(), 100).unwrap();
        assert_eq!(seqs(&o), vec![1, 2, 3]);
        assert_eq!(o.pending()[2].time_ms, 2);
        assert_eq!(o.push(report(9)).unwrap().seq, 4);
    }

    #[test]
    fn ack_then_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 100).unwrap();
        for t in 0..5 {
            o.push(report(t)).unwrap();
        }
        o.ack(3).unwrap();
        assert_eq!(seqs(&o), vec![4, 5]);
        o.ack(2).unwrap(); // stale: ignored
        assert_eq!(o.acked(), 3);
        drop(o);
        let mut o = Outbox::open(dir.path(), 100).unwrap();
        assert_eq!(seqs(&o), vec![4, 5]);
        assert_eq!(o.acked(), 3);
        o.ack(5).unwrap();
        drop(o);
        let mut o = Outbox::open(dir.path(), 100).unwrap();
        assert!(o.is_empty());
        assert_eq!(o.push(report(0)).unwrap().seq, 6);
    }

    #[test]
    fn the_log_is_read_without_being_touched() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_log(dir.path()).unwrap().is_empty(), "no outbox yet");
        let mut o = Outbox::open(dir.path(), 100).unwrap();
        for t in 0..3 {
            o.push(report(t)).unwrap();
        }
        o.ack(1).unwrap();
        let log = dir.path().join("outbox").join(LOG_FILE);
        let full = std::fs::read(&log).unwrap();
        // An append under way: a torn record at the end.
        std::fs::write(&log, &full[..full.len() - 3]).unwrap();
        let read = read_log(dir.path()).unwrap();
        assert_eq!(read.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(read[1].time_ms, 1);
        assert_eq!(
            std::fs::read(&log).unwrap(),
            &full[..full.len() - 3],
            "the torn tail is left as it is"
        );
    }

    #[test]
    fn torn_and_corrupt_tails_are_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 100).unwrap();
        for t in 0..3 {
            o.push(report(t)).unwrap();
        }
        drop(o);
        let log = dir.path().join("outbox").join(LOG_FILE);
        let full = std::fs::read(&log).unwrap();
        let one = full.len() / 3;

        // A crash in the middle of the third record.
        std::fs::write(&log, &full[..full.len() - 3]).unwrap();
        let mut o = Outbox::open(dir.path(), 100).unwrap();
        assert_eq!(seqs(&o), vec![1, 2]);
        assert_eq!(std::fs::metadata(&log).unwrap().len() as usize, 2 * one);
        // Numbering continues after what survived; the new record is intact.
        assert_eq!(o.push(report(7)).unwrap().seq, 3);
        drop(o);
        assert_eq!(seqs(&Outbox::open(dir.path(), 100).unwrap()), vec![1, 2, 3]);

        // A flipped bit in the last record's body.
        let mut bytes = std::fs::read(&log).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 0x40;
        std::fs::write(&log, &bytes).unwrap();
        assert_eq!(seqs(&Outbox::open(dir.path(), 100).unwrap()), vec![1, 2]);

        // A torn header and pure garbage.
        let mut bytes = std::fs::read(&log).unwrap();
        bytes.extend_from_slice(&[1, 2, 3]);
        std::fs::write(&log, &bytes).unwrap();
        assert_eq!(seqs(&Outbox::open(dir.path(), 100).unwrap()), vec![1, 2]);
        std::fs::write(&log, [0xff; 64]).unwrap();
        let o = Outbox::open(dir.path(), 100).unwrap();
        assert!(o.is_empty());
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);

        std::fs::write(dir.path().join("outbox").join(MARKS_FILE), b"garbage").unwrap();
        assert!(Outbox::open(dir.path(), 100).unwrap().is_empty());
    }

    #[test]
    fn capacity_drops_the_oldest_durably() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 3).unwrap();
        for t in 0..5 {
            o.push(report(t)).unwrap();
        }
        assert_eq!(seqs(&o), vec![3, 4, 5]);
        assert_eq!(o.dropped_total(), 2);
        assert_eq!(o.settled(), 2);
        assert_eq!(o.acked(), 0);
        drop(o);
        // Dropped reports stay dropped; a smaller capacity drops more.
        let o = Outbox::open(dir.path(), 2).unwrap();
        assert_eq!(seqs(&o), vec![4, 5]);
        assert_eq!(o.settled(), 3);
        assert_eq!(o.next_seq(), 6);
    }

    #[test]
    fn compaction_rewrites_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 100)
            .unwrap()
            .with_compact_threshold(4);
        for t in 0..10 {
            o.push(report(t)).unwrap();
        }
        let log = dir.path().join("outbox").join(LOG_FILE);
        let before = std::fs::metadata(&log).unwrap().len();
        o.ack(8).unwrap();
        let after = std::fs::metadata(&log).unwrap().len();
        assert_eq!(after, before / 10 * 2);
        o.push(report(10)).unwrap();
        drop(o);
        let o = Outbox::open(dir.path(), 100).unwrap();
        assert_eq!(seqs(&o), vec![9, 10, 11]);
    }

    #[test]
    fn ack_beyond_numbering_moves_it_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 100).unwrap();
        o.push(report(0)).unwrap();
        o.ack(500).unwrap();
        assert!(o.is_empty());
        assert_eq!(o.push(report(1)).unwrap().seq, 501);
        drop(o);
        assert_eq!(Outbox::open(dir.path(), 100).unwrap().next_seq(), 502);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push,
        /// Acknowledge `n` past the first pending report's predecessor (0: a
        /// stale ack; large: beyond what was assigned).
        Ack(u64),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => Just(Op::Push),
            2 => (0u64..8).prop_map(Op::Ack),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn behaves_like_a_bounded_queue(ops in proptest::collection::vec(op(), 1..40)) {
            const CAP: usize = 5;
            let dir = tempfile::tempdir().unwrap();
            let mut o = Outbox::open(dir.path(), CAP).unwrap().with_compact_threshold(3);
            let mut model: VecDeque<u64> = VecDeque::new();
            let mut next = 1u64;
            let mut acked = 0u64;
            for op in ops {
                match op {
                    Op::Push => {
                        let r = o.push(report(next as i64)).unwrap();
                        prop_assert_eq!(r.seq, next);
                        model.push_back(next);
                        next += 1;
                        while model.len() > CAP {
                            model.pop_front();
                        }
                    }
                    Op::Ack(n) => {
                        let front = model.front().copied().unwrap_or(next);
                        let seq = acked.max(front - 1) + n;
                        o.ack(seq).unwrap();
                        if seq > acked {
                            acked = seq;
                            while model.front().is_some_and(|&s| s <= seq) {
                                model.pop_front();
                            }
                            next = next.max(seq + 1);
                        }
                    }
                    Op::Reopen => {
                        drop(o);
                        o = Outbox::open(dir.path(), CAP).unwrap().with_compact_threshold(3);
                    }
                }
                prop_assert_eq!(seqs(&o), model.iter().copied().collect::<Vec<_>>());
                prop_assert_eq!(o.next_seq(), next);
                prop_assert_eq!(o.acked(), acked);
                for r in o.pending() {
                    prop_assert_eq!(r.time_ms as u64, r.seq);
                }
            }
        }
    }
}
