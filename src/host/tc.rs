//! What this host's kernel lets libvirt do with a running guest's
//! `<bandwidth>`, learnt once at start-up.
//!
//! libvirt shapes a tap with `tc`: inbound (towards the guest) as an `htb`
//! class with an `sfq` leaf on the tap's root, outbound (from the guest) as
//! a `police` action on its ingress. When the kernel lacks `sch_sfq` or
//! `act_police`, libvirt's live update fails, and libvirt says so only in
//! message text, which the agent never sorts by. So the agent tries the
//! same two things itself, on a veth in a private network namespace that
//! disappears with the probe process, and decides from the result.

use std::process::Command;

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
