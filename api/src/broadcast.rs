//! A bounded broadcast queue that holds only what some receiver has not read yet.
//!
//! `tokio::sync::broadcast` allocates every slot of its capacity when the channel is made, so a
//! node with one channel per subscribed bucket paid `ws.queue` slots for each bucket even when
//! nothing was ever sent on it: a client subscribing to many made-up bucket names grew the
//! node's memory without a single write. This queue has the same semantics where the hub uses
//! them (a receiver starts at the next value sent; one that falls more than `capacity` values
//! behind is told how many it missed and resumes at the oldest kept), but it keeps a value only
//! until every receiver has read it, so a channel costs memory for what is in flight, never
//! more than `capacity` values, and an idle one almost nothing.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// A receiver fell behind: this many values were dropped before it read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("lagged behind by {0} values")]
pub struct Lagged(pub u64);

/// One value, its size as the sender counted it, and how many receivers have still to read it.
struct Slot<T> {
    value: T,
    bytes: usize,
    unread: usize,
}

struct Inner<T> {
    /// Values at positions `head..head + buf.len()`.
    buf: VecDeque<Slot<T>>,
    head: u64,
    capacity: usize,
    /// Sum of the held values' sizes, and its most.
    bytes: usize,
    max_bytes: usize,
    receivers: usize,
    next_id: u64,
    /// Receivers waiting for a value, by id (one waker each, however often they poll).
    waiting: HashMap<u64, Waker>,
}

impl<T> Inner<T> {
    /// Position of the next value sent.
    fn tail(&self) -> u64 {
        self.head + self.buf.len() as u64
    }

    /// Drops the oldest value, read or not.
    fn pop(&mut self) {
        if let Some(slot) = self.buf.pop_front() {
            self.bytes -= slot.bytes;
            self.head += 1;
        }
    }

    /// Drops the values every receiver has read, and gives memory back once nothing is held.
    fn trim(&mut self) {
        while self.buf.front().is_some_and(|s| s.unread == 0) {
            self.pop();
        }
        if self.buf.is_empty() && self.buf.capacity() > IDLE_CAPACITY {
            self.buf = VecDeque::new();
        }
    }
}

/// Slots an empty queue may keep allocated.
const IDLE_CAPACITY: usize = 16;

type Shared<T> = Arc<Mutex<Inner<T>>>;

fn lock<T>(shared: &Shared<T>) -> MutexGuard<'_, Inner<T>> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// The sending side: clone it freely.
pub struct Sender<T> {
    shared: Shared<T>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender {
            shared: self.shared.clone(),
        }
    }
}

/// A queue keeping at most `capacity` (at least 1) unread values.
pub fn channel<T: Clone>(capacity: usize) -> Sender<T> {
    bounded(capacity, usize::MAX)
}

/// A queue keeping at most `capacity` (at least 1) unread values, and of those (but the newest)
/// at most `max_bytes` by the sizes given to [`Sender::send_sized`].
pub fn bounded<T: Clone>(capacity: usize, max_bytes: usize) -> Sender<T> {
    Sender {
        shared: Arc::new(Mutex::new(Inner {
            buf: VecDeque::new(),
            head: 0,
            capacity: capacity.max(1),
            bytes: 0,
            max_bytes,
            receivers: 0,
            next_id: 0,
            waiting: HashMap::new(),
        })),
    }
}

impl<T: Clone> Sender<T> {
    /// Sends `value` to every receiver; returns how many there are (none: the value is dropped).
    pub fn send(&self, value: T) -> usize {
        self.send_sized(value, 0)
    }

    /// [`Sender::send`] of a value that counts `bytes` against the queue's byte budget.
    pub fn send_sized(&self, value: T, bytes: usize) -> usize {
        let (wake, receivers): (Vec<Waker>, usize) = {
            let mut inner = lock(&self.shared);
            if inner.receivers == 0 {
                return 0;
            }
            // The oldest values go until this one fits (it always goes in); whoever had not
            // read them will hear it lagged.
            while !inner.buf.is_empty()
                && (inner.buf.len() >= inner.capacity
                    || inner.bytes.saturating_add(bytes) > inner.max_bytes)
            {
                inner.pop();
            }
            let unread = inner.receivers;
            inner.bytes += bytes;
            inner.buf.push_back(Slot {
                value,
                bytes,
                unread,
            });
            (inner.waiting.drain().map(|(_, w)| w).collect(), unread)
        };
        for w in wake {
            w.wake();
        }
        receivers
    }

    /// A receiver of every value sent from now on.
    pub fn subscribe(&self) -> Receiver<T> {
        let mut inner = lock(&self.shared);
        inner.receivers += 1;
        inner.next_id += 1;
        Receiver {
            shared: self.shared.clone(),
            next: inner.tail(),
            id: inner.next_id,
        }
    }

    /// The number of receivers.
    pub fn receiver_count(&self) -> usize {
        lock(&self.shared).receivers
    }

    /// Values held now (sent and not yet read by every receiver).
    pub fn len(&self) -> usize {
        lock(&self.shared).buf.len()
    }

    /// The sizes of the values held now.
    pub fn held_bytes(&self) -> usize {
        lock(&self.shared).bytes
    }

    /// True when no value is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Slots allocated now (what the queue costs beside the values themselves).
    pub fn allocated(&self) -> usize {
        lock(&self.shared).buf.capacity()
    }
}

/// The receiving side: a [`futures::Stream`] of values, or [`Lagged`] where some were dropped.
/// It never ends, even once every [`Sender`] is gone: the hub drops a bucket's sender only after
/// its last receiver.
pub struct Receiver<T> {
    shared: Shared<T>,
    /// Position of the next value to read.
    next: u64,
    id: u64,
}

impl<T: Clone> Receiver<T> {
    /// The next value if one was sent: `None` when there is none yet.
    pub fn try_recv(&mut self) -> Option<Result<T, Lagged>> {
        take(&mut self.next, &mut lock(&self.shared))
    }

    /// Whether values were dropped before this receiver read them: its next read is
    /// [`Lagged`]. Reads nothing.
    pub fn lagged(&self) -> bool {
        self.next < lock(&self.shared).head
    }
}

/// Reads the value at `next` (advancing it), or reports what was dropped before it.
fn take<T: Clone>(next: &mut u64, inner: &mut Inner<T>) -> Option<Result<T, Lagged>> {
    if *next < inner.head {
        let missed = inner.head - *next;
        *next = inner.head;
        return Some(Err(Lagged(missed)));
    }
    let i = usize::try_from(*next - inner.head).ok()?;
    let slot = inner.buf.get_mut(i)?;
    slot.unread -= 1;
    let value = slot.value.clone();
    *next += 1;
    inner.trim();
    Some(Ok(value))
}

impl<T: Clone> futures::Stream for Receiver<T> {
    type Item = Result<T, Lagged>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let mut inner = lock(&this.shared);
        match take(&mut this.next, &mut inner) {
            Some(item) => {
                inner.waiting.remove(&this.id);
                Poll::Ready(Some(item))
            }
            None => {
                inner.waiting.insert(this.id, cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut inner = lock(&self.shared);
        inner.receivers -= 1;
        inner.waiting.remove(&self.id);
        // What it had not read, it never will.
        let from = usize::try_from(self.next.saturating_sub(inner.head)).unwrap_or(usize::MAX);
        for slot in inner.buf.iter_mut().skip(from) {
            slot.unread -= 1;
        }
        inner.trim();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[test]
    fn a_queue_allocates_nothing_until_a_value_is_sent_to_a_receiver() {
        let tx = channel::<u32>(1024);
        let _rx = tx.subscribe();
        assert_eq!(tx.allocated(), 0);
        // Without receivers a value is dropped, not kept.
        let lonely = channel::<u32>(1024);
        assert_eq!(lonely.send(1), 0);
        assert_eq!((lonely.len(), lonely.allocated()), (0, 0));
    }

    #[test]
    fn the_byte_budget_drops_the_oldest_values_and_always_keeps_the_newest() {
        let tx = bounded::<u32>(100, 1_000);
        let mut rx = tx.subscribe();
        for v in 0..4 {
            tx.send_sized(v, 300);
        }
        // 1,200 bytes sent into 1,000: the oldest went.
        assert_eq!((tx.len(), tx.held_bytes()), (3, 900));
        assert!(rx.lagged() && rx.lagged(), "asking reads nothing");
        assert_eq!(rx.try_recv(), Some(Err(Lagged(1))));
        assert!(!rx.lagged());
        assert_eq!(rx.try_recv(), Some(Ok(1)));
        assert_eq!(tx.held_bytes(), 600, "read values are released");
        // One value larger than the budget still goes in, alone.
        tx.send_sized(9, 5_000);
        assert_eq!((tx.len(), tx.held_bytes()), (1, 5_000));
        assert_eq!(rx.try_recv(), Some(Err(Lagged(2))));
        assert_eq!(rx.try_recv(), Some(Ok(9)));
        assert_eq!((tx.len(), tx.held_bytes()), (0, 0));
    }

    #[test]
    fn every_receiver_gets_every_value_sent_after_it_subscribed_in_order() {
        let tx = channel(8);
        let mut early = tx.subscribe();
        tx.send(1);
        let mut late = tx.subscribe();
        tx.send(2);
        tx.send(3);
        let drain = |rx: &mut Receiver<i32>| {
            std::iter::from_fn(|| rx.try_recv())
                .map(|r| r.expect("no lag"))
                .collect::<Vec<_>>()
        };
        assert_eq!(drain(&mut early), [1, 2, 3]);
        assert_eq!(drain(&mut late), [2, 3]);
        // Read by everyone: nothing is held any more.
        assert!(tx.is_empty());
    }

    #[test]
    fn a_value_is_released_once_the_last_receiver_read_it_or_left() {
        let tx = channel(8);
        let mut fast = tx.subscribe();
        let slow = tx.subscribe();
        for v in 0..5 {
            tx.send(v);
        }
        while fast.try_recv().is_some() {}
        assert_eq!(tx.len(), 5, "the slow receiver has not read them");
        drop(slow);
        assert_eq!(tx.len(), 0, "nobody is left to read them");
        assert_eq!(tx.receiver_count(), 1);
    }

    #[test]
    fn a_receiver_more_than_capacity_behind_is_told_how_much_it_missed() {
        let tx = channel(3);
        let mut rx = tx.subscribe();
        for v in 0..10 {
            tx.send(v);
        }
        assert_eq!(tx.len(), 3, "never more than the capacity");
        assert_eq!(rx.try_recv(), Some(Err(Lagged(7))));
        let rest: Vec<_> = std::iter::from_fn(|| rx.try_recv()).collect();
        assert_eq!(rest, [Ok(7), Ok(8), Ok(9)]);
        assert_eq!(rx.try_recv(), None);
    }

    #[test]
    fn memory_goes_back_once_a_burst_is_read() {
        let tx = channel(1024);
        let mut rx = tx.subscribe();
        for v in 0..1000 {
            tx.send(v);
        }
        assert!(tx.allocated() >= 1000);
        while rx.try_recv().is_some() {}
        assert!(
            tx.allocated() <= IDLE_CAPACITY,
            "{} slots kept",
            tx.allocated()
        );
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_when_a_value_is_sent() {
        let tx = channel(4);
        let mut rx = tx.subscribe();
        let waiter = tokio::spawn(async move { rx.next().await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        tx.send(42);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("task");
        assert_eq!(got, Some(Ok(42)));
    }

    /// A small deterministic generator (xorshift), so a failing case can be replayed by seed.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    #[test]
    fn sends_reads_subscribes_and_drops_in_any_order_match_a_plain_log() {
        for seed in 1..2_000u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let capacity = 1 + rng.below(5) as usize;
            let tx = channel::<u64>(capacity);
            // The model: every value sent (`None` when nobody received it), and per receiver the
            // log position it reads next.
            let mut log: Vec<Option<u64>> = Vec::new();
            let mut receivers: Vec<(Receiver<u64>, usize)> = Vec::new();
            for v in 0..200u64 {
                match rng.below(4) {
                    0 => {
                        assert_eq!(tx.send(v), receivers.len());
                        log.push((!receivers.is_empty()).then_some(v));
                    }
                    1 => receivers.push((tx.subscribe(), log.len())),
                    2 if !receivers.is_empty() => {
                        let i = rng.below(receivers.len() as u64) as usize;
                        let (rx, next) = &mut receivers[i];
                        let oldest = log.len().saturating_sub(capacity);
                        let got = rx.try_recv();
                        if *next < oldest {
                            let missed = (oldest - *next) as u64;
                            assert_eq!(got, Some(Err(Lagged(missed))), "seed {seed}");
                            *next = oldest;
                        } else if *next < log.len() {
                            assert_eq!(got, log[*next].map(Ok), "seed {seed}");
                            *next += 1;
                        } else {
                            assert_eq!(got, None, "seed {seed}");
                        }
                    }
                    3 if !receivers.is_empty() => {
                        let i = rng.below(receivers.len() as u64) as usize;
                        receivers.swap_remove(i);
                    }
                    _ => {}
                }
                // Held: from the furthest-behind receiver's next kept value to the end.
                let oldest = log.len().saturating_sub(capacity);
                let behind = receivers.iter().map(|(_, n)| (*n).max(oldest)).min();
                let held = behind.map_or(0, |n| log.len() - n);
                assert_eq!(tx.len(), held, "seed {seed}");
                assert_eq!(tx.receiver_count(), receivers.len(), "seed {seed}");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn receivers_on_other_tasks_are_woken_and_lag_exactly_while_a_thread_sends() {
        const VALUES: u32 = 3_000;
        for round in 0..50 {
            // A small queue: the readers lag often, and values are dropped while they read.
            let tx = channel::<u32>(8);
            let readers: Vec<_> = (0..8)
                .map(|_| {
                    let mut rx = tx.subscribe();
                    tokio::spawn(async move {
                        let wait = std::time::Duration::from_secs(5);
                        // Every value is either read or counted in a lag, each exactly once.
                        let (mut expect, mut read) = (0, 0);
                        while expect < VALUES {
                            match tokio::time::timeout(wait, rx.next()).await {
                                Err(_) => panic!("not woken at {expect}"),
                                Ok(Some(Ok(v))) => {
                                    assert_eq!(v, expect, "out of order");
                                    (expect, read) = (v + 1, read + 1);
                                }
                                Ok(Some(Err(Lagged(n)))) => expect += n as u32,
                                Ok(None) => panic!("ended"),
                            }
                        }
                        read
                    })
                })
                .collect();
            let sender = {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for v in 0..VALUES {
                        tx.send(v);
                        if v % 7 == 0 {
                            std::thread::yield_now();
                        }
                    }
                })
            };
            sender.join().expect("sender");
            for r in readers {
                assert!(r.await.expect("reader") > 0);
            }
            assert!(
                tx.is_empty(),
                "round {round}: values held after every reader read or lagged"
            );
        }
    }
}
