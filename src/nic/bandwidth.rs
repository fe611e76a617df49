//! Traffic shaping for one direction of a NIC (`<inbound>`/`<outbound>`).

use super::NicError;

/// Upper bound for every rate and burst, in KB/s or KB.
///
/// libvirt's schema allows rates up to 2^54 KB/s but bursts only up to
/// `unsignedInt` (u32::MAX KB). We apply the u32 bound to all three so one
/// rule covers them, peak ≥ average stays comparable with burst, and the
/// values fit the 32-bit fields of tc's classic rate tables. u32::MAX KB/s
/// is about 34 Tbit/s, far above any link a guest NIC sits on.
pub const MAX_KB: u64 = u32::MAX as u64;

/// Largest `rate_mbps` whose KB/s value (×125) still fits [`MAX_KB`].
pub const MAX_MBPS: u32 = (MAX_KB / 125) as u32;

/// Shaping for one direction, in libvirt's units: KB/s for rates, KB for
/// burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Bandwidth {
    average: u64,
    peak: Option<u64>,
    burst: Option<u64>,
}

/// Proto field names for one direction. `field_prefix` is a `&'static str`
/// so error fields stay `&'static str` without allocating or leaking.
pub(crate) struct Fields {
    pub(crate) average: &'static str,
    pub(crate) peak: &'static str,
    pub(crate) burst: &'static str,
    pub(crate) rate: &'static str,
}

pub(crate) fn fields(prefix: &'static str) -> Fields {
    match prefix {
        "inbound" => Fields {
            average: "inbound.average_kbps",
            peak: "inbound.peak_kbps",
            burst: "inbound.burst_kb",
            rate: "inbound.rate_mbps",
        },
        "outbound" => Fields {
            average: "outbound.average_kbps",
            peak: "outbound.peak_kbps",
            burst: "outbound.burst_kb",
            rate: "outbound.rate_mbps",
        },
        // Callers only use the two above; anything else still gets a
        // sensible, non-panicking name.
        _ => Fields {
            average: "bandwidth.average_kbps",
            peak: "bandwidth.peak_kbps",
            burst: "bandwidth.burst_kb",
            rate: "bandwidth.rate_mbps",
        },
    }
}

fn bounded(field: &'static str, v: u64) -> Result<u64, NicError> {
    if (1..=MAX_KB).contains(&v) {
        Ok(v)
    } else {
        Err(NicError::invalid(field, v, format!("1-{MAX_KB}")))
    }
}

impl Bandwidth {
    /// Validates one direction. `field_prefix` is `"inbound"` or
    /// `"outbound"` and only names fields in errors. `average` is required
    /// (1..=[`MAX_KB`]); `peak` and `burst` are optional with the same
    /// bound, and `peak` must not be below `average`.
    pub fn new(
        field_prefix: &'static str,
        average: u64,
        peak: Option<u64>,
        burst: Option<u64>,
    ) -> Result<Self, NicError> {
        let f = fields(field_prefix);
        let average = bounded(f.average, average)?;
        let peak = peak.map(|p| bounded(f.peak, p)).transpose()?;
        let burst = burst.map(|b| bounded(f.burst, b)).transpose()?;
        if let Some(p) = peak {
            if p < average {
                return Err(NicError::conflict(
                    f.peak,
                    format!("peak {p} KB/s is below average {average} KB/s"),
                ));
            }
        }
        Ok(Bandwidth {
            average,
            peak,
            burst,
        })
    }

    /// CloudStack's network rate: `mbps` Mbit/s becomes `mbps × 125` KB/s
    /// for both average and peak (1 Mbit/s = 125 KB/s with libvirt's
    /// 1000-based kilobytes), no burst.
    pub fn from_mbps(field_prefix: &'static str, mbps: u32) -> Result<Self, NicError> {
        if !(1..=MAX_MBPS).contains(&mbps) {
            return Err(NicError::invalid(
                fields(field_prefix).rate,
                mbps,
                format!("1-{MAX_MBPS}"),
            ));
        }
        let kbps = u64::from(mbps) * 125;
        Bandwidth::new(field_prefix, kbps, Some(kbps), None)
    }

    /// Average rate in KB/s.
    pub fn average(&self) -> u64 {
        self.average
    }

    /// Peak rate in KB/s, if set.
    pub fn peak(&self) -> Option<u64> {
        self.peak
    }

    /// Burst size in KB, if set.
    pub fn burst(&self) -> Option<u64> {
        self.burst
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn average_bounds_are_1_to_u32_max() {
        let e = Bandwidth::new("inbound", 0, None, None).unwrap_err();
        assert_eq!(e.field(), "inbound.average_kbps");
        assert!(e.to_string().contains("1-4294967295"), "{e}");
        assert_eq!(
            Bandwidth::new("inbound", 1, None, None).unwrap().average(),
            1
        );
        assert_eq!(
            Bandwidth::new("inbound", MAX_KB, None, None)
                .unwrap()
                .average(),
            MAX_KB
        );
        let e = Bandwidth::new("outbound", MAX_KB + 1, None, None).unwrap_err();
        assert_eq!(e.field(), "outbound.average_kbps");
    }

    #[test]
    fn peak_and_burst_share_the_bound() {
        let e = Bandwidth::new("inbound", 10, Some(MAX_KB + 1), None).unwrap_err();
        assert_eq!(e.field(), "inbound.peak_kbps");
        let e = Bandwidth::new("outbound", 10, None, Some(0)).unwrap_err();
        assert_eq!(e.field(), "outbound.burst_kb");
        let e = Bandwidth::new("outbound", 10, None, Some(MAX_KB + 1)).unwrap_err();
        assert_eq!(e.field(), "outbound.burst_kb");
        let b = Bandwidth::new("outbound", 10, Some(MAX_KB), Some(MAX_KB)).unwrap();
        assert_eq!((b.peak(), b.burst()), (Some(MAX_KB), Some(MAX_KB)));
    }

    #[test]
    fn peak_below_average_is_a_conflict() {
        let e = Bandwidth::new("inbound", 1000, Some(999), None).unwrap_err();
        assert!(
            matches!(
                e,
                NicError::Conflict {
                    field: "inbound.peak_kbps",
                    ..
                }
            ),
            "{e}"
        );
        assert!(Bandwidth::new("inbound", 1000, Some(1000), None).is_ok());
    }

    #[test]
    fn mbps_converts_to_kilobytes_per_second() {
        let b = Bandwidth::from_mbps("inbound", 200).unwrap();
        assert_eq!(
            (b.average(), b.peak(), b.burst()),
            (25_000, Some(25_000), None)
        );
    }

    #[test]
    fn mbps_bounds_keep_the_result_in_range() {
        assert_eq!(MAX_MBPS, 34_359_738);
        assert_eq!(Bandwidth::from_mbps("inbound", 1).unwrap().average(), 125);
        let top = Bandwidth::from_mbps("inbound", MAX_MBPS).unwrap();
        assert!(top.average() <= MAX_KB);
        for bad in [0, MAX_MBPS + 1, u32::MAX] {
            let e = Bandwidth::from_mbps("outbound", bad).unwrap_err();
            assert_eq!(e.field(), "outbound.rate_mbps");
        }
    }
}
