//! Self-tests the UI can run: a synthetic token stream that measures how the
//! window keeps up with replies, with no model involved.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::{ChatEvent, Dramatis, Error, Result};

/// What the synthetic stream sent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamReport {
    /// Pieces sent.
    pub pieces: usize,
    /// Seconds from the first piece to the last.
    pub seconds: f64,
    /// Pieces per second achieved.
    pub pieces_per_sec: f64,
}

impl Dramatis {
    /// Sends `count` numbered pieces (`"<n> "`, n from 0) at `per_sec`
    /// through the same events a reply uses, paced against a clock so the
    /// rate holds however long each send takes.
    pub fn synthetic_stream(
        &self,
        count: usize,
        per_sec: f64,
        sink: &mut (dyn FnMut(ChatEvent) + Send),
    ) -> Result<StreamReport> {
        if count == 0 || count > 100_000 || !(1.0..=10_000.0).contains(&per_sec) {
            return Err(Error::Conflict(
                "the stream test takes 1 to 100000 pieces at 1 to 10000 per second".into(),
            ));
        }
        let start = Instant::now();
        let step = Duration::from_secs_f64(1.0 / per_sec);
        for n in 0..count {
            let due = start + step * n as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            sink(ChatEvent::Text {
                text: format!("{n} "),
            });
        }
        let seconds = start.elapsed().as_secs_f64();
        Ok(StreamReport {
            pieces: count,
            seconds,
            pieces_per_sec: if count > 1 {
                (count - 1) as f64 / seconds.max(1e-9)
            } else {
                0.0
            },
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_stream_holds_its_rate_and_order() {
        let dir = tempfile::tempdir().unwrap();
        let app = crate::Dramatis::open(dir.path()).unwrap();
        let mut got = Vec::new();
        let r = app
            .synthetic_stream(100, 500.0, &mut |e| {
                if let crate::ChatEvent::Text { text } = e {
                    got.push(text.trim().parse::<usize>().unwrap());
                }
            })
            .unwrap();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        assert!(
            r.pieces_per_sec > 400.0 && r.pieces_per_sec < 600.0,
            "{r:?}"
        );
        assert!(app.synthetic_stream(0, 10.0, &mut |_| {}).is_err());
    }
}
