//! The engine's queue: one generation at a time, in arrival order, whoever
//! asks (a chat reply in the app, an API request, a summary).
//!
//! Invariants: at most one [`Turn`] exists; turns are granted in the order
//! [`EngineQueue::acquire`] was called; a waiter whose cancel flag is set
//! leaves the queue without ever holding a turn, and the ones behind it move up.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// A FIFO lock over the engine.
#[derive(Debug, Default)]
pub struct EngineQueue {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    waiting: VecDeque<u64>,
    busy: bool,
}

/// The right to use the engine; the next waiter goes when it is dropped.
#[derive(Debug)]
pub struct Turn<'a>(&'a EngineQueue);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        s.busy = false;
        self.0.changed.notify_all();
    }
}

/// How often a waiter looks at its cancel flag.
const POLL: Duration = Duration::from_millis(20);

impl EngineQueue {
    /// Waits for this caller's turn; `None` when `cancel` was set first.
    pub fn acquire(&self, cancel: &AtomicBool) -> Option<Turn<'_>> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let ticket = s.next;
        s.next += 1;
        s.waiting.push_back(ticket);
        loop {
            // Cancelled first: a waiter stopped while in line never runs.
            if cancel.load(Ordering::SeqCst) {
                s.waiting.retain(|&t| t != ticket);
                self.changed.notify_all();
                return None;
            }
            if !s.busy && s.waiting.front() == Some(&ticket) {
                s.waiting.pop_front();
                s.busy = true;
                return Some(Turn(self));
            }
            s = self
                .changed
                .wait_timeout(s, POLL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// How many callers wait behind the running one.
    pub fn waiting(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .waiting
            .len()
    }

    /// Whether a caller holds the engine now.
    pub fn busy(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).busy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn turns_go_in_arrival_order_and_a_cancelled_waiter_leaves() {
        let q = Arc::new(EngineQueue::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = q.acquire(&AtomicBool::new(false)).unwrap();
        let mut threads = Vec::new();
        let give_up = Arc::new(AtomicBool::new(false));
        for i in 0..5 {
            let (queue, order, give_up) = (q.clone(), order.clone(), give_up.clone());
            threads.push(std::thread::spawn(move || {
                let never = AtomicBool::new(false);
                let flag = if i == 2 { &*give_up } else { &never };
                if let Some(_t) = queue.acquire(flag) {
                    order.lock().unwrap().push(i);
                    std::thread::sleep(Duration::from_millis(5));
                }
            }));
            // Each waiter is in line before the next one arrives.
            while q.waiting() < i + 1 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        give_up.store(true, Ordering::SeqCst);
        while q.waiting() > 4 {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(q.busy());
        drop(first);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            [0, 1, 3, 4],
            "FIFO, without the one that gave up"
        );
        assert!(!q.busy());
        assert_eq!(q.waiting(), 0);
    }
}
