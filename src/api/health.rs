//! Whether libvirt answers, for `grpc.health.v1`.
//!
//! `virConnectIsAlive` only looks at the local end of the connection, so a
//! libvirtd that is alive but stuck (SIGSTOP) still looks alive. The probe
//! makes a real round trip ([`Hypervisor::probe`]) on a thread of its own,
//! not on the blocking pool, which hung calls may have filled. A probe that
//! has not answered within its deadline counts as a failure while it is
//! still blocked; only one probe is ever outstanding.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::hypervisor::Hypervisor;

/// How long a probe may take before libvirt counts as not answering.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(3);
/// Pause between two probes.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);

#[derive(Default)]
struct State {
    /// When the probe in flight started.
    started: Option<Instant>,
    /// The last finished probe's answer, if any finished yet.
    last: Option<bool>,
}

/// Runs `f` (a call to libvirt) with its start recorded in `state`, so
/// [`Prober::serving`] counts a call that overruns the deadline as a
/// failure while it is still blocked.
fn timed<T>(state: &Mutex<State>, f: impl FnOnce() -> T) -> T {
    if let Ok(mut s) = state.lock() {
        s.started = Some(Instant::now());
    }
    let out = f();
    if let Ok(mut s) = state.lock() {
        s.started = None;
    }
    out
}

/// A probe thread and its latest answer. Dropping it ends the thread after
/// its current probe.
pub struct Prober {
    state: Arc<Mutex<State>>,
    /// Woken when a probe finishes, so the first answer is reported at
    /// once rather than at the watcher's next look.
    answered: Arc<tokio::sync::Notify>,
    stop: Arc<AtomicBool>,
    deadline: Duration,
}

impl Prober {
    /// Starts probing `hv` every `every`.
    pub fn start(hv: Arc<dyn Hypervisor>, every: Duration, deadline: Duration) -> Prober {
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(tokio::sync::Notify::new());
        let (st, sp, an) = (state.clone(), stop.clone(), answered.clone());
        let spawned = std::thread::Builder::new()
            .name("libvirt-probe".into())
            .spawn(move || {
                while !sp.load(Ordering::Relaxed) {
                    let ok = timed(&st, || match hv.probe() {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::debug!(error = %e, "libvirt probe failed");
                            false
                        }
                    });
                    if let Ok(mut s) = st.lock() {
                        s.last = Some(ok);
                    }
                    an.notify_one();
                    std::thread::sleep(every);
                    if ok && !sp.load(Ordering::Relaxed) {
                        // Keep the pool at its size: open the connections
                        // not opened yet (start-up) or dropped since (a
                        // libvirtd restart; calls prefer an open connection,
                        // so an idle agent would not reopen them). One
                        // interval after the answer, so start-up's first
                        // callers do not compete with it; timed like a
                        // probe, so a libvirtd that hangs in an open is
                        // NOT_SERVING past the deadline.
                        timed(&st, || hv.warm_up());
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the libvirt probe thread; health stays NOT_SERVING");
            if let Ok(mut s) = state.lock() {
                s.last = Some(false);
            }
        }
        Prober {
            state,
            answered,
            stop,
            deadline,
        }
    }

    /// Waits until a probe finishes (at once if one finished since the
    /// last wait) or `at_most` passes, whichever is first; the bound covers
    /// a probe that overruns its deadline and so never finishes in time.
    pub async fn wait_answer(&self, at_most: Duration) {
        let _ = tokio::time::timeout(at_most, self.answered.notified()).await;
    }

    /// Whether libvirt answers: `None` until the first probe has finished
    /// (or overrun its deadline).
    pub fn serving(&self) -> Option<bool> {
        let s = self.state.lock().ok()?;
        if s.started.is_some_and(|t| t.elapsed() > self.deadline) {
            return Some(false);
        }
        s.last
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::fake::FakeHypervisor;
    use crate::hypervisor::Target;

    fn wait_for(p: &Prober, want: bool, within: Duration) -> Duration {
        let t0 = Instant::now();
        while p.serving() != Some(want) {
            assert!(t0.elapsed() < within, "health did not become {want}");
            std::thread::sleep(Duration::from_millis(5));
        }
        t0.elapsed()
    }

    /// The first answer wakes a waiter at once (start-up is timed to it),
    /// also one that starts waiting after it came; a probe that hangs ends
    /// the wait at its bound.
    #[tokio::test]
    async fn the_first_answer_ends_the_wait_and_a_hung_probe_its_bound() {
        let fake = Arc::new(FakeHypervisor::default());
        let p = Prober::start(fake.clone(), Duration::from_secs(60), PROBE_DEADLINE);
        let t0 = Instant::now();
        while p.serving().is_none() {
            p.wait_answer(Duration::from_secs(5)).await;
        }
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert_eq!(p.serving(), Some(true));

        let fake = Arc::new(FakeHypervisor::default());
        fake.hang("probe", Target::Live);
        let p = Prober::start(fake.clone(), Duration::from_secs(60), PROBE_DEADLINE);
        let t0 = Instant::now();
        p.wait_answer(Duration::from_millis(200)).await;
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(190), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert_eq!(p.serving(), None);
        fake.release_hangs();
    }

    /// After an answer the probe thread opens what the pool lacks (at
    /// start-up, and after libvirtd dropped connections); an open that
    /// hangs makes health NOT_SERVING past the deadline like a probe.
    #[test]
    fn the_pool_is_refilled_after_an_answer_and_a_hung_open_is_not_serving() {
        let fake = Arc::new(FakeHypervisor::default());
        fake.hang("warm_up", Target::Live);
        let p = Prober::start(
            fake.clone(),
            Duration::from_millis(20),
            Duration::from_millis(200),
        );
        wait_for(&p, false, Duration::from_secs(2));
        fake.release_hangs();
        wait_for(&p, true, Duration::from_secs(2));
        let t0 = Instant::now();
        while !fake.calls().iter().any(|c| c.op == "warm_up") {
            assert!(t0.elapsed() < Duration::from_secs(2), "no warm_up");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_hung_libvirt_is_not_serving_within_the_deadline_and_serving_after() {
        let fake = Arc::new(FakeHypervisor::default());
        let p = Prober::start(
            fake.clone(),
            Duration::from_millis(20),
            Duration::from_millis(200),
        );
        wait_for(&p, true, Duration::from_secs(2));
        fake.hang("probe", Target::Live);
        let took = wait_for(&p, false, Duration::from_secs(2));
        assert!(took >= Duration::from_millis(150), "{took:?}");
        fake.release_hangs();
        wait_for(&p, true, Duration::from_secs(2));
    }
}
