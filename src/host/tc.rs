//! What this host's kernel lets libvirt do with a running guest's
//! `<bandwidth>`, learnt once, in the background after start-up.
//!
//! libvirt shapes a tap with `tc`: inbound (towards the guest) as an `htb`
//! class with an `sfq` leaf on the tap's root, outbound (from the guest) as
//! a `police` action on its ingress. When the kernel lacks `sch_sfq` or
//! `act_police`, libvirt's live update fails, and libvirt says so only in
//! message text, which the agent never sorts by. So the agent tries the
//! same two things itself, on a veth in a private network namespace that
//! disappears with the probe process, and decides from the result.

use std::process::Command;
use std::sync::Arc;

use tokio::sync::OnceCell;

/// Kernel traffic-control features libvirt's `<bandwidth>` needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcAbilities {
    /// `tc qdisc add … sfq` works (`sch_sfq`); needed for inbound shaping.
    pub sfq: Ability,
    /// A `police` action works (`act_police`); needed for outbound policing.
    pub police: Ability,
}

/// One probed feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ability {
    /// The kernel accepted it.
    Present,
    /// The probe ran and the kernel refused it.
    Missing,
    /// The probe could not run (no `unshare`/`ip`/`tc`, no privilege, no
    /// veth). Treated as present: the agent then behaves as it did before
    /// there was a probe, and libvirt's own error is the answer.
    Unknown,
}

impl Default for TcAbilities {
    /// Not probed (the fake, the test driver): nothing is refused.
    fn default() -> Self {
        TcAbilities {
            sfq: Ability::Unknown,
            police: Ability::Unknown,
        }
    }
}

/// The probe's answer, shared by every clone: either known up front (tests,
/// the test driver) or learnt by a probe that runs in the background after
/// start-up (`serve` asks for it once health has answered). The probe
/// forks `unshare`, `sh`, `ip` and `tc` seven times (15 ms on an idle lab
/// host, ~65 ms on 2 busy cores), and only an attach or update that shapes
/// a running guest needs its answer: such a request waits for it (or runs
/// it, if it comes first), nothing else does, and health SERVING does not.
#[derive(Debug, Clone)]
pub struct TcProbe {
    answer: Arc<OnceCell<TcAbilities>>,
    probe: fn() -> TcAbilities,
}

impl TcProbe {
    /// An answer that needs no probe.
    pub fn known(t: TcAbilities) -> Self {
        TcProbe {
            answer: Arc::new(OnceCell::new_with(Some(t))),
            probe: TcAbilities::default,
        }
    }

    /// The kernel probe, not run yet: the first [`TcProbe::get`] runs it.
    pub fn lazy() -> Self {
        Self::lazy_with(TcAbilities::probe)
    }

    /// Like [`TcProbe::lazy`] with another (blocking) probe.
    pub fn lazy_with(probe: fn() -> TcAbilities) -> Self {
        TcProbe {
            answer: Arc::new(OnceCell::new()),
            probe,
        }
    }

    /// The answer, waiting for the probe if it is still running. The first
    /// caller runs it on the blocking pool and later ones wait, so it runs
    /// once.
    pub async fn get(&self) -> TcAbilities {
        *self
            .answer
            .get_or_init(|| async {
                let t = tokio::task::spawn_blocking(self.probe)
                    .await
                    .unwrap_or_default();
                tracing::info!(sfq = ?t.sfq, police = ?t.police, "kernel traffic-control probe");
                t
            })
            .await
    }
}

impl Default for TcProbe {
    /// Not probed: nothing is refused.
    fn default() -> Self {
        TcProbe::known(TcAbilities::default())
    }
}

/// The script run in the throwaway namespace. Each probe prints `name=rc`;
/// the veth line must succeed or nothing is concluded.
const SCRIPT: &str = "ip link add nap0 type veth peer name nap1 || exit 90
ip link set nap0 up; ip link set nap1 up
tc qdisc add dev nap0 root sfq perturb 10 >/dev/null 2>&1; echo sfq=$?
tc qdisc add dev nap0 ingress >/dev/null 2>&1 || { echo police=ingress; exit 0; }
tc filter add dev nap0 parent ffff: protocol all u32 match u32 0 0 \
  police rate 1mbit burst 10k drop flowid :1 >/dev/null 2>&1; echo police=$?
";

impl TcAbilities {
    /// Runs the probe (blocking: spawns `unshare --net`; call it on a
    /// blocking thread). Never fails; what it cannot learn is `Unknown`.
    pub fn probe() -> Self {
        let out = Command::new("unshare")
            .args(["--net", "--", "sh", "-c", SCRIPT])
            .output();
        match out {
            Ok(o) if o.status.success() => Self::parse(&String::from_utf8_lossy(&o.stdout)),
            _ => Self::default(),
        }
    }

    /// Reads the probe script's `name=rc` lines.
    pub fn parse(out: &str) -> Self {
        let mut t = Self::default();
        for line in out.lines() {
            let Some((name, rc)) = line.trim().split_once('=') else {
                continue;
            };
            let a = match rc {
                "0" => Ability::Present,
                // The ingress qdisc itself failed: police was not tried.
                "ingress" => Ability::Unknown,
                _ => Ability::Missing,
            };
            match name {
                "sfq" => t.sfq = a,
                "police" => t.police = a,
                _ => {}
            }
        }
        t
    }

    /// The kernel features a live `<bandwidth>` with these directions needs
    /// and this kernel lacks, named as an operator would load them.
    pub fn missing_for(&self, inbound: bool, outbound: bool) -> Vec<&'static str> {
        let mut m = Vec::new();
        if inbound && self.sfq == Ability::Missing {
            m.push("sch_sfq (tc qdisc sfq, for inbound shaping)");
        }
        if outbound && self.police == Ability::Missing {
            m.push("act_police (tc police action, for outbound policing)");
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static RUNS: AtomicUsize = AtomicUsize::new(0);

    fn slow_probe() -> TcAbilities {
        RUNS.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(50));
        TcAbilities {
            sfq: Ability::Missing,
            police: Ability::Present,
        }
    }

    /// The background task and a request that both want the answer while
    /// the probe runs get the same one, from one run; a known answer runs
    /// nothing.
    #[tokio::test]
    async fn a_lazy_probe_runs_once_for_every_caller() {
        let p = TcProbe::lazy_with(slow_probe);
        let q = p.clone();
        let (a, b, c) = tokio::join!(p.get(), q.get(), p.get());
        assert_eq!(a, b);
        assert_eq!(b, c);
        assert_eq!(a.sfq, Ability::Missing);
        assert_eq!(p.get().await, a);
        assert_eq!(RUNS.load(Ordering::SeqCst), 1);
        let k = TcProbe::known(TcAbilities::default());
        assert_eq!(k.get().await, TcAbilities::default());
        assert_eq!(RUNS.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn parse_reads_each_probe() {
        let t = TcAbilities::parse("sfq=2\npolice=0\n");
        assert_eq!((t.sfq, t.police), (Ability::Missing, Ability::Present));
        assert_eq!(
            t.missing_for(true, true),
            vec!["sch_sfq (tc qdisc sfq, for inbound shaping)"]
        );
        assert!(t.missing_for(false, true).is_empty());
    }

    #[test]
    fn a_probe_that_could_not_run_refuses_nothing() {
        let t = TcAbilities::parse("");
        assert_eq!(t, TcAbilities::default());
        assert!(t.missing_for(true, true).is_empty());
        let t = TcAbilities::parse("sfq=0\npolice=ingress\n");
        assert_eq!((t.sfq, t.police), (Ability::Present, Ability::Unknown));
    }
}
