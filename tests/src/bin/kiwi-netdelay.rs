//! `kiwi-netdelay`: Wi-Fi-like delay and jitter for the simulated LAN
//! (`kiwi_tests::lan`), where `tc netem` does not exist. An iptables
//! `NFQUEUE --queue-bypass` rule sends packets to a netfilter queue; this
//! program binds that queue (in the network namespace it runs in: queues
//! are per namespace), holds every packet for `--delay` plus a uniform
//! jitter in `[-jitter, +jitter]` milliseconds, and then accepts it.
//!
//! ```text
//! ip netns exec NS kiwi-netdelay --queue 0 --delay 50 --jitter 10
//! ```
//!
//! - Order: packets of one flow (IPv4 addresses, protocol and ports) never
//!   overtake each other (a packet waits at least until the one before it
//!   in its flow has gone, as Wi-Fi's link layer delivers in order);
//!   packets of different flows may be reordered by the jitter. Verdicts
//!   go to the kernel out of order by packet id, which NFQUEUE allows.
//! - Memory is bounded: at most `--max-held` packets are held (each keeps
//!   only its first [`COPY_RANGE`] bytes here; the packet itself waits in
//!   the kernel's queue). A packet beyond that is accepted at once and
//!   counted, and the kernel queue fails open as well.
//! - It never blocks: the netlink socket is read without blocking and the
//!   loop sleeps at most [`POLL_INTERVAL`] at a time (the `nfq` crate does
//!   not expose its socket for `poll`), so a packet's delay may come out
//!   up to about a millisecond longer than drawn.
//! - SIGTERM, SIGINT or SIGHUP: it accepts every held packet, unbinds,
//!   prints its counts and exits 0. If it dies instead, the kernel drops
//!   the packets still held and `--queue-bypass` lets new ones through.
//!
//! Once the queue is bound, it prints `kiwi-netdelay: queue N bound` to
//! stderr (the harness waits for that line before it installs the rules).

use std::collections::{BTreeMap, HashMap};
use std::io::ErrorKind;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Parser;
use nfq::{Message, Queue, Verdict};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use rand::Rng;

/// The longest the loop sleeps before it looks at the socket again.
const POLL_INTERVAL: Duration = Duration::from_millis(1);

/// How many bytes of each packet the kernel copies to us: enough for an
/// IPv4 header with options and the ports after it.
const COPY_RANGE: u16 = 128;

/// How many packets one turn of the loop takes from the socket before it
/// releases those that are due.
const RECV_BATCH: usize = 256;

/// Held packets the kernel's queue may hold on top of `--max-held` (those
/// not yet read from the socket).
const KERNEL_QUEUE_SLACK: u32 = 1024;

/// Delays every packet of an NFQUEUE queue, like a Wi-Fi link.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The queue number to bind (the iptables rule's `--queue-num`).
    #[arg(long, default_value_t = 0)]
    queue: u16,
    /// The mean delay of each packet, in milliseconds.
    #[arg(long, value_name = "MS")]
    delay: f64,
    /// The jitter, in milliseconds: each packet's delay is drawn uniformly
    /// from `[delay - jitter, delay + jitter]`. At most `--delay`.
    #[arg(long, value_name = "MS", default_value_t = 0.0)]
    jitter: f64,
    /// The most packets held at once; beyond it, packets pass undelayed.
    #[arg(long, default_value_t = 4096)]
    max_held: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.delay.is_finite() && args.delay >= 0.0,
        "--delay must be a number of milliseconds ≥ 0, not {}",
        args.delay
    );
    ensure!(
        args.jitter.is_finite() && (0.0..=args.delay).contains(&args.jitter),
        "--jitter must be between 0 and --delay ({}), not {}",
        args.delay,
        args.jitter
    );
    ensure!(args.max_held > 0, "--max-held must be at least 1");
    let delay = Delay {
        mean: Duration::from_secs_f64(args.delay / 1000.0),
        jitter: Duration::from_secs_f64(args.jitter / 1000.0),
    };

    // Blocked, the signals stay pending until the loop looks for them.
    let mut stop_signals = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        stop_signals.add(signal);
    }
    stop_signals
        .thread_block()
        .context("cannot block the stop signals")?;
    let stop = SignalFd::with_flags(
        &stop_signals,
        SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
    )
    .context("cannot make a signalfd")?;

    let mut queue = Queue::open().context("cannot open a netfilter queue socket")?;
    let q = args.queue;
    queue
        .bind(q)
        .with_context(|| format!("cannot bind queue {q} (is another program bound to it?)"))?;
    queue
        .set_copy_range(q, COPY_RANGE)
        .context("cannot set the copy range")?;
    let kernel_max = u32::try_from(args.max_held)
        .unwrap_or(u32::MAX)
        .saturating_add(KERNEL_QUEUE_SLACK);
    queue
        .set_queue_max_len(q, kernel_max)
        .context("cannot set the queue length")?;
    queue
        .set_fail_open(q, true)
        .context("cannot make the queue fail open")?;
    queue.set_nonblocking(true);
    eprintln!(
        "kiwi-netdelay: queue {q} bound, delay {} ms ± {} ms, at most {} held",
        args.delay, args.jitter, args.max_held
    );

    let mut delayer = Delayer::new(delay, args.max_held);
    let mut rng = rand::rng();
    let outcome = run(&mut queue, &mut delayer, &mut rng, &stop);

    // Whatever ended the loop, nothing stays held.
    let now = Instant::now();
    for msg in delayer.drain() {
        accept(&mut queue, msg, &mut delayer.stats);
    }
    let _ = queue.unbind(q);
    let stats = &delayer.stats;
    eprintln!(
        "kiwi-netdelay: queue {q} done: {} delayed, {} passed undelayed (over {} held), \
         {} released early at exit, {} verdicts failed (ran {:?})",
        stats.delayed,
        stats.overflowed,
        args.max_held,
        stats.flushed,
        stats.verdict_errors,
        now.duration_since(delayer.started)
    );
    outcome
}

/// The main loop: until a stop signal, read what the kernel queued, then
/// release what is due, then sleep a little.
fn run(
    queue: &mut Queue,
    delayer: &mut Delayer,
    rng: &mut impl Rng,
    stop: &SignalFd,
) -> anyhow::Result<()> {
    loop {
        if let Some(info) = stop.read_signal().context("cannot read the signalfd")? {
            let signal = Signal::try_from(i32::try_from(info.ssi_signo).unwrap_or_default())
                .map_or_else(|_| info.ssi_signo.to_string(), |s| s.to_string());
            eprintln!("kiwi-netdelay: {signal} received, stopping");
            return Ok(());
        }
        for _ in 0..RECV_BATCH {
            let msg = match queue.recv() {
                Ok(msg) => msg,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("cannot read from the netfilter queue"),
            };
            let now = Instant::now();
            let offset = delayer.delay.draw(rng);
            if let Some(msg) = delayer.hold(msg, now, offset) {
                accept(queue, msg, &mut delayer.stats);
            }
        }
        let now = Instant::now();
        while let Some(msg) = delayer.pop_due(now) {
            accept(queue, msg, &mut delayer.stats);
        }
        let sleep = delayer
            .next_release()
            .map_or(POLL_INTERVAL, |at| {
                at.saturating_duration_since(Instant::now())
            })
            .min(POLL_INTERVAL);
        std::thread::sleep(sleep);
    }
}

fn accept(queue: &mut Queue, mut msg: Message, stats: &mut Stats) {
    msg.set_verdict(Verdict::Accept);
    if let Err(e) = queue.verdict(msg) {
        // The packet stays in the kernel's queue until we unbind (then it
        // is dropped); TCP resends it. Say so once, count the rest.
        if stats.verdict_errors == 0 {
            eprintln!("kiwi-netdelay: a verdict failed: {e}");
        }
        stats.verdict_errors += 1;
    }
}

/// The delay distribution: uniform in `[mean - jitter, mean + jitter]`.
#[derive(Debug, Clone, Copy)]
struct Delay {
    mean: Duration,
    /// At most `mean`.
    jitter: Duration,
}

impl Delay {
    /// One packet's delay.
    fn draw(&self, rng: &mut impl Rng) -> Duration {
        if self.jitter.is_zero() {
            return self.mean;
        }
        let low = self.mean.saturating_sub(self.jitter);
        low + self.jitter.mul_f64(2.0 * rng.random::<f64>())
    }
}

/// What happened to the packets, printed at exit.
#[derive(Debug, Default)]
struct Stats {
    delayed: u64,
    overflowed: u64,
    flushed: u64,
    verdict_errors: u64,
}

/// Where packets wait: the I/O-free part of the program, so that the
/// ordering and the bound can be tested without a kernel queue.
#[derive(Debug)]
struct Delayer<P = Message> {
    delay: Delay,
    max_held: usize,
    /// Held packets by release time (and arrival number, which keeps
    /// packets with equal times in arrival order).
    held: BTreeMap<(Instant, u64), P>,
    /// The release time of the last held packet of each flow; only flows
    /// with a packet still held (bounded by `max_held`, pruned as it grows).
    flows: HashMap<Flow, Instant>,
    arrivals: u64,
    stats: Stats,
    started: Instant,
}

impl<P: Packet> Delayer<P> {
    fn new(delay: Delay, max_held: usize) -> Self {
        Delayer {
            delay,
            max_held,
            held: BTreeMap::new(),
            flows: HashMap::new(),
            arrivals: 0,
            stats: Stats::default(),
            started: Instant::now(),
        }
    }

    /// Holds `packet`, which arrived at `now`, for `delay` (but not past
    /// the previous packet of its flow), or hands it back to be accepted
    /// at once if `max_held` packets are held already.
    fn hold(&mut self, packet: P, now: Instant, delay: Duration) -> Option<P> {
        if self.held.len() >= self.max_held {
            self.stats.overflowed += 1;
            return Some(packet);
        }
        if self.flows.len() >= self.max_held {
            self.flows.retain(|_, last| *last > now);
        }
        let flow = Flow::of(packet.bytes());
        let mut release = now + delay;
        if let Some(last) = self.flows.get(&flow) {
            release = release.max(*last);
        }
        self.flows.insert(flow, release);
        self.held.insert((release, self.arrivals), packet);
        self.arrivals += 1;
        self.stats.delayed += 1;
        None
    }

    /// The next packet whose release time is at or before `now`.
    fn pop_due(&mut self, now: Instant) -> Option<P> {
        let entry = self.held.first_entry()?;
        if entry.key().0 > now {
            return None;
        }
        Some(entry.remove())
    }

    /// When the next held packet is due.
    fn next_release(&self) -> Option<Instant> {
        self.held.keys().next().map(|(at, _)| *at)
    }

    /// Every held packet, in release order (at exit).
    fn drain(&mut self) -> Vec<P> {
        self.flows.clear();
        let held = std::mem::take(&mut self.held);
        self.stats.flushed += held.len() as u64;
        held.into_values().collect()
    }
}

/// A queued packet's bytes (its first [`COPY_RANGE`] bytes).
trait Packet {
    fn bytes(&self) -> &[u8];
}

impl Packet for Message {
    fn bytes(&self) -> &[u8] {
        self.get_payload()
    }
}

/// A flow: IPv4 source and destination, protocol, and for TCP and UDP the
/// ports. Anything unparsable is one flow of its own (`Flow::Other`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Flow {
    Ipv4 {
        src: [u8; 4],
        dst: [u8; 4],
        protocol: u8,
        ports: [u8; 4],
    },
    Other,
}

impl Flow {
    fn of(packet: &[u8]) -> Flow {
        const TCP: u8 = 6;
        const UDP: u8 = 17;
        let Some(&first) = packet.first() else {
            return Flow::Other;
        };
        if first >> 4 != 4 || packet.len() < 20 {
            return Flow::Other;
        }
        let header_len = usize::from(first & 0x0f) * 4;
        let protocol = packet[9];
        let ports = match protocol {
            TCP | UDP => packet
                .get(header_len..header_len + 4)
                .and_then(|p| <[u8; 4]>::try_from(p).ok())
                .unwrap_or_default(),
            _ => [0; 4],
        };
        Flow::Ipv4 {
            src: packet[12..16].try_into().expect("4 bytes"),
            dst: packet[16..20].try_into().expect("4 bytes"),
            protocol,
            ports,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Packet for Vec<u8> {
        fn bytes(&self) -> &[u8] {
            self
        }
    }

    /// A TCP packet from 10.88.0.1:`port` to 10.88.0.2:7000, with `tag`
    /// after the header so tests can tell packets apart.
    fn tcp(port: u16, tag: u8) -> Vec<u8> {
        let mut p = vec![0u8; 41];
        p[0] = 0x45;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 88, 0, 1]);
        p[16..20].copy_from_slice(&[10, 88, 0, 2]);
        p[20..22].copy_from_slice(&port.to_be_bytes());
        p[22..24].copy_from_slice(&7000u16.to_be_bytes());
        p[40] = tag;
        p
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn delayer(max_held: usize) -> Delayer<Vec<u8>> {
        let delay = Delay {
            mean: ms(50),
            jitter: ms(10),
        };
        Delayer::new(delay, max_held)
    }

    fn released(d: &mut Delayer<Vec<u8>>, at: Instant) -> Vec<u8> {
        std::iter::from_fn(|| d.pop_due(at))
            .map(|p| p[40])
            .collect()
    }

    #[test]
    fn packets_wait_for_their_delay() {
        let t0 = Instant::now();
        let mut d = delayer(10);
        assert!(d.hold(tcp(1, 1), t0, ms(45)).is_none());
        assert_eq!(d.next_release(), Some(t0 + ms(45)));
        assert_eq!(released(&mut d, t0 + ms(44)), Vec::<u8>::new());
        assert_eq!(released(&mut d, t0 + ms(45)), [1]);
        assert_eq!(d.next_release(), None);
    }

    #[test]
    fn a_flow_keeps_its_order_and_flows_may_overtake_each_other() {
        let t0 = Instant::now();
        let mut d = delayer(10);
        d.hold(tcp(1, 1), t0, ms(60));
        // Drawn shorter, but its flow's previous packet goes first.
        d.hold(tcp(1, 2), t0 + ms(1), ms(40));
        // Another flow is not held back.
        d.hold(tcp(2, 3), t0 + ms(1), ms(40));
        assert_eq!(released(&mut d, t0 + ms(41)), [3]);
        assert_eq!(released(&mut d, t0 + ms(60)), [1, 2]);
    }

    #[test]
    fn beyond_the_cap_packets_pass_at_once_and_are_counted() {
        let t0 = Instant::now();
        let mut d = delayer(2);
        assert!(d.hold(tcp(1, 1), t0, ms(50)).is_none());
        assert!(d.hold(tcp(2, 2), t0, ms(50)).is_none());
        assert_eq!(d.hold(tcp(3, 3), t0, ms(50)).map(|p| p[40]), Some(3));
        assert_eq!(d.stats.overflowed, 1);
        assert_eq!(d.drain().len(), 2);
        assert_eq!(d.stats.flushed, 2);
        // Flows are pruned, so they stay bounded too.
        for port in 10..100 {
            let now = t0 + ms(u64::from(port));
            d.hold(tcp(port, 0), now, ms(1));
            released(&mut d, now + ms(1));
            assert!(d.flows.len() <= 2, "{} flows remembered", d.flows.len());
        }
    }

    #[test]
    fn delays_stay_within_the_jitter() {
        let delay = Delay {
            mean: ms(50),
            jitter: ms(10),
        };
        let mut rng = rand::rng();
        let drawn: Vec<Duration> = (0..1000).map(|_| delay.draw(&mut rng)).collect();
        assert!(drawn.iter().all(|d| (ms(40)..=ms(60)).contains(d)));
        assert!(drawn.iter().any(|d| *d < ms(45)) && drawn.iter().any(|d| *d > ms(55)));
    }

    #[test]
    fn flows_are_told_apart_by_addresses_protocol_and_ports() {
        assert_eq!(Flow::of(&tcp(1, 1)), Flow::of(&tcp(1, 2)));
        assert_ne!(Flow::of(&tcp(1, 1)), Flow::of(&tcp(2, 1)));
        assert_eq!(Flow::of(&[]), Flow::Other);
        assert_eq!(Flow::of(&[0x60; 40]), Flow::Other);
        // A truncated TCP header still has a flow (ports unknown).
        assert!(matches!(Flow::of(&tcp(1, 1)[..20]), Flow::Ipv4 { .. }));
    }
}
