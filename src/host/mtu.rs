//! MTU preflight: decide the `<mtu>` to write for a NIC before anything changes.
//!
//! The NIC always gets an explicit `<mtu>`: without one, a tap on a 1450
//! bridge is 1450 on the host but the guest's virtio-net reports 1500, and
//! large frames vanish silently.

use crate::nic::Mtu;

/// Encapsulation overhead of VXLAN over an IPv4 underlay
/// (outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8).
pub const VXLAN_IPV4_OVERHEAD: u32 = 50;
/// Encapsulation overhead of VXLAN over an IPv6 underlay (IPv6 header is 40).
pub const VXLAN_IPV6_OVERHEAD: u32 = 70;

/// Why a NIC's MTU does not fit the host path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MtuError {
    /// The NIC asks for more than its bridge carries.
    #[error(
        "mtu {guest} does not fit bridge {bridge} with mtu {bridge_mtu}; \
         lower the NIC MTU to {bridge_mtu} or raise {bridge}'s MTU"
    )]
    AboveBridge {
        /// Requested guest MTU.
        guest: u32,
        /// Bridge the NIC plugs into.
        bridge: String,
        /// That bridge's MTU.
        bridge_mtu: u32,
    },
    /// The VXLAN underlay cannot carry the NIC's frames plus encapsulation.
    #[error(
        "mtu {guest} does not fit VXLAN {vni}: underlay {underlay} has {underlay_mtu}, \
         needs {needed} ({overhead} bytes VXLAN/{family} overhead); lower the NIC MTU \
         to {fits} or raise {underlay}'s MTU"
    )]
    UnderlayTooSmall {
        /// Requested (or inherited) guest MTU.
        guest: u32,
        /// VXLAN network identifier.
        vni: u32,
        /// Underlay link name.
        underlay: String,
        /// Underlay MTU.
        underlay_mtu: u32,
        /// guest + overhead.
        needed: u32,
        /// Encapsulation bytes.
        overhead: u32,
        /// "IPv4" or "IPv6".
        family: &'static str,
        /// Largest guest MTU the underlay carries.
        fits: u32,
    },
    /// The MTU computed for the NIC is outside what an MTU can be.
    #[error("mtu {0} is not a valid link MTU")]
    Invalid(u32),
}

/// Names used only to make [`MtuError`] messages actionable.
#[derive(Debug, Clone, Default)]
pub struct MtuContext<'a> {
    /// Bridge the NIC plugs into.
    pub bridge: &'a str,
    /// VXLAN underlay name, if any.
    pub underlay: &'a str,
    /// VNI, if VXLAN.
    pub vni: u32,
}

/// The MTU to write into `<mtu>`, or why the request cannot work.
///
/// Rules: the guest MTU must not exceed the bridge MTU; with a VXLAN
/// underlay (`underlay_mtu` is `Some`), the underlay must carry
/// guest + `overhead`. With no requested MTU the bridge MTU is returned, so
/// the guest is told the truth.
pub fn mtu_preflight(
    guest: Option<Mtu>,
    bridge_mtu: u32,
    underlay_mtu: Option<u32>,
    overhead: u32,
) -> Result<Mtu, MtuError> {
    mtu_preflight_in(
        guest,
        bridge_mtu,
        underlay_mtu,
        overhead,
        &MtuContext::default(),
    )
}

/// [`mtu_preflight`] with link names for the error message.
pub fn mtu_preflight_in(
    guest: Option<Mtu>,
    bridge_mtu: u32,
    underlay_mtu: Option<u32>,
    overhead: u32,
    ctx: &MtuContext<'_>,
) -> Result<Mtu, MtuError> {
    let want = guest.map(Mtu::get).unwrap_or(bridge_mtu);
    // The underlay is checked first: a VXLAN bridge's MTU is itself capped
    // at underlay - overhead, so "raise the bridge" would be no fix there.
    check_underlay(want, underlay_mtu, overhead, ctx)?;
    if want > bridge_mtu {
        return Err(MtuError::AboveBridge {
            guest: want,
            bridge: ctx.bridge.to_string(),
            bridge_mtu,
        });
    }
    Mtu::try_from(want).map_err(|_| MtuError::Invalid(want))
}

/// The underlay half of the preflight, shared with the bridge-raise path.
pub(crate) fn check_underlay(
    want: u32,
    underlay_mtu: Option<u32>,
    overhead: u32,
    ctx: &MtuContext<'_>,
) -> Result<(), MtuError> {
    if let Some(u) = underlay_mtu {
        let needed = want.saturating_add(overhead);
        if needed > u {
            return Err(MtuError::UnderlayTooSmall {
                guest: want,
                vni: ctx.vni,
                underlay: ctx.underlay.to_string(),
                underlay_mtu: u,
                needed,
                overhead,
                family: if overhead >= VXLAN_IPV6_OVERHEAD {
                    "IPv6"
                } else {
                    "IPv4"
                },
                fits: u.saturating_sub(overhead),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mtu(v: u32) -> Option<Mtu> {
        Some(Mtu::try_from(v).expect("valid mtu"))
    }

    #[test]
    fn vxlan_too_big_names_the_underlay_not_the_new_bridge() {
        // brvx-N does not exist yet; its MTU will be underlay - 50.
        let e = mtu_preflight(mtu(1500), 1450, Some(1500), 50).expect_err("too big");
        assert!(matches!(e, MtuError::UnderlayTooSmall { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("1550"), "{msg}");
    }

    #[test]
    fn no_requested_mtu_inherits_bridge_mtu() {
        assert_eq!(mtu_preflight(None, 1450, None, 0).map(Mtu::get), Ok(1450));
        assert_eq!(mtu_preflight(None, 9000, None, 0).map(Mtu::get), Ok(9000));
    }

    #[test]
    fn guest_mtu_up_to_bridge_mtu_is_accepted() {
        assert_eq!(
            mtu_preflight(mtu(1500), 1500, None, 0).map(Mtu::get),
            Ok(1500)
        );
        assert_eq!(
            mtu_preflight(mtu(1400), 1500, None, 0).map(Mtu::get),
            Ok(1400)
        );
    }

    #[test]
    fn guest_mtu_above_bridge_is_refused_with_numbers() {
        let err = mtu_preflight_in(
            mtu(1500),
            1450,
            None,
            0,
            &MtuContext {
                bridge: "brvx-5000",
                ..Default::default()
            },
        )
        .expect_err("must refuse");
        let msg = err.to_string();
        assert!(
            msg.contains("1500") && msg.contains("1450") && msg.contains("brvx-5000"),
            "{msg}"
        );
    }

    #[test]
    fn vxlan_underlay_must_carry_guest_plus_overhead() {
        let ctx = MtuContext {
            bridge: "brvx-5000",
            underlay: "cloudbr1",
            vni: 5000,
        };
        // 1450 + 50 = 1500 fits a 1500 underlay exactly.
        assert!(mtu_preflight_in(mtu(1450), 1500, Some(1500), 50, &ctx).is_ok());
        let err = mtu_preflight_in(mtu(1500), 1500, Some(1500), 50, &ctx).expect_err("too big");
        assert_eq!(
            err.to_string(),
            "mtu 1500 does not fit VXLAN 5000: underlay cloudbr1 has 1500, needs 1550 \
             (50 bytes VXLAN/IPv4 overhead); lower the NIC MTU to 1450 or raise cloudbr1's MTU"
        );
        let v6 = mtu_preflight_in(mtu(1450), 1500, Some(1500), 70, &ctx).expect_err("v6");
        assert!(v6.to_string().contains("IPv6"), "{v6}");
    }

    #[test]
    fn inherited_mtu_is_checked_against_underlay_too() {
        // A bridge raised by hand to 1500 over a 1500 underlay cannot carry 1500.
        assert!(mtu_preflight(None, 1500, Some(1500), 50).is_err());
        assert!(mtu_preflight(None, 1450, Some(1500), 50).is_ok());
    }
}
