//! `vlan_probe`: drives the agent's real VLAN path (an 802.1Q `<pif>.<N>`
//! device enslaved into `br<pif>-<N>`, made by [`NetlinkHost::prepare`]) in
//! the current network namespace, and undoes it.
//!
//! Why an example binary: the development host's kernel has no 8021q, so the
//! library can only prove there that a VLAN attach fails cleanly. The lab
//! guest's Debian kernel has 8021q; this binary is copied into the guest's
//! initramfs (tests/lab/test_e2e_vlan.py) so the same library code builds a
//! real VLAN that carries tagged traffic to the host.
//!
//! Usage: `vlan_probe --label BR --pif IF --vlan N --ip A/P [--keep]`
//!
//! 1. Creates the label bridge BR with IF as its port if BR is missing (a
//!    test fixture, made with rtnetlink directly, not by the agent).
//! 2. `resolve(BR, LinuxBridge, Vlan(N))` must plan `IF.N` in `brIF-N`.
//! 3. `prepare`, then checks through netlink that `IF.N` is a VLAN device
//!    with id N on IF, enslaved to `brIF-N`, both marked with the agent alias.
//! 4. Puts A/P on `brIF-N` so traffic can flow.
//! 5. With `--keep`, waits for SIGTERM, SIGINT or stdin EOF.
//! 6. Runs the undo steps in reverse, checks that the links are gone, and
//!    removes the label bridge if step 1 made it.
//!
//! Machine-readable lines on stdout start with `VLANPROBE: `. Any failure
//! exits 1 with `VLANPROBE: error ...` on stderr.

use std::io::Read;
use std::net::IpAddr;
use std::process::ExitCode;

use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::Parser;
use futures::TryStreamExt;
use nic_agent::host::{
    naming, HostConfig, HostNet, HostUndo, NetlinkHost, SegmentDevice, AGENT_ALIAS,
};
use nic_agent::nic::{BridgeName, Segment, SwitchType, VlanId};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVlan, LinkAttribute, LinkInfo, LinkMessage,
};
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkUnspec};
use tokio::signal::unix::{signal, SignalKind};

/// Command line of the probe.
#[derive(Debug, Parser)]
#[command(about = "Build, check and undo the agent's VLAN bridge in this network namespace")]
struct Args {
    /// Traffic label bridge (created with --pif as its port if missing).
    #[arg(long)]
    label: String,
    /// Physical interface that carries the VLAN.
    #[arg(long)]
    pif: String,
    /// VLAN id (1-4094).
    #[arg(long)]
    vlan: u32,
    /// IPv4/IPv6 address with prefix for the VLAN bridge, e.g. 10.77.151.2/24.
    #[arg(long)]
    ip: String,
    /// Keep the VLAN until SIGTERM/SIGINT or stdin EOF, then undo.
    #[arg(long)]
    keep: bool,
    /// Directory for the host backend's saved state.
    #[arg(long, default_value = "/tmp/vlan-probe-state")]
    state_dir: std::path::PathBuf,
}

/// What the probe needs to know about one link, read through netlink.
#[derive(Debug, Default)]
struct LinkFacts {
    index: u32,
    kind: Option<InfoKind>,
    vlan_id: Option<u16>,
    parent: Option<u32>,
    controller: Option<u32>,
    alias: Option<String>,
}

impl LinkFacts {
    fn from_msg(msg: LinkMessage) -> Self {
        let mut f = LinkFacts {
            index: msg.header.index,
            ..Default::default()
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::Link(p) => f.parent = Some(p),
                LinkAttribute::Controller(c) => f.controller = Some(c),
                LinkAttribute::IfAlias(a) => f.alias = Some(a),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => f.kind = Some(k),
                            LinkInfo::Data(InfoData::Vlan(v)) => {
                                for o in v {
                                    if let InfoVlan::Id(id) = o {
                                        f.vlan_id = Some(id);
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        f
    }
}

/// Netlink look-ups the probe makes on its own, to check the library's work
/// independently of the library's internal view.
struct Links {
    handle: rtnetlink::Handle,
}

impl Links {
    fn new() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("open rtnetlink socket")?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// All links by name.
    async fn get(&self, name: &str) -> Result<Option<LinkFacts>> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .context("dump links")?;
        Ok(msgs
            .into_iter()
            .find(|m| {
                m.attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::IfName(n) if n == name))
            })
            .map(LinkFacts::from_msg))
    }

    async fn need(&self, name: &str) -> Result<LinkFacts> {
        self.get(name)
            .await?
            .ok_or_else(|| anyhow!("link {name} does not exist"))
    }

    async fn up(&self, index: u32, name: &str) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .with_context(|| format!("set {name} up"))
    }

    /// The label bridge fixture: BR with IF as its port. `true` if made here.
    async fn ensure_label(&self, label: &str, pif: &str) -> Result<bool> {
        let port = self.need(pif).await?;
        let created = match self.get(label).await? {
            Some(l) if l.kind == Some(InfoKind::Bridge) => false,
            Some(l) => bail!("{label} exists but is a {:?}, not a bridge", l.kind),
            None => {
                self.handle
                    .link()
                    .add(LinkMessageBuilder::<LinkBridge>::new(label).build())
                    .execute()
                    .await
                    .with_context(|| format!("create label bridge {label}"))?;
                true
            }
        };
        let br = self.need(label).await?;
        if port.controller != Some(br.index) {
            self.handle
                .link()
                .set(
                    LinkUnspec::new_with_index(port.index)
                        .controller(br.index)
                        .build(),
                )
                .execute()
                .await
                .with_context(|| format!("enslave {pif} to {label}"))?;
        }
        self.up(port.index, pif).await?;
        self.up(br.index, label).await?;
        Ok(created)
    }

    async fn add_address(&self, link: &str, cidr: &str) -> Result<()> {
        let (addr, prefix) = cidr
            .split_once('/')
            .ok_or_else(|| anyhow!("--ip {cidr:?} needs a /prefix"))?;
        let addr: IpAddr = addr
            .parse()
            .with_context(|| format!("--ip {cidr:?}: bad address"))?;
        let prefix: u8 = prefix
            .parse()
            .with_context(|| format!("--ip {cidr:?}: bad prefix"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        ensure!(prefix <= max, "--ip {cidr:?}: prefix above {max}");
        let l = self.need(link).await?;
        self.handle
            .address()
            .add(l.index, addr, prefix)
            .execute()
            .await
            .with_context(|| format!("add {cidr} to {link}"))
    }

    async fn delete(&self, name: &str) -> Result<()> {
        let l = self.need(name).await?;
        self.handle
            .link()
            .del(l.index)
            .execute()
            .await
            .with_context(|| format!("delete {name}"))
    }
}

/// Waits until the test says to undo: SIGTERM, SIGINT, or EOF on stdin.
async fn wait_for_release() -> Result<&'static str> {
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    // A plain thread: a blocking read of stdin has no place on the runtime,
    // and the thread simply ends with the process.
    let (tx, stdin_closed) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 256];
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = stdin_closed => "stdin closed",
    })
}

async fn probe(args: Args) -> Result<()> {
    let vlan = VlanId::try_from(args.vlan).map_err(|e| anyhow!("--vlan: {e}"))?;
    let label = BridgeName::try_from(args.label.as_str()).map_err(|e| anyhow!("--label: {e}"))?;
    let want_dev = naming::vlan_device(&args.pif, vlan.get());
    let want_br = naming::vlan_bridge(&args.pif, vlan.get());
    let links = Links::new()?;

    let label_created = links.ensure_label(&args.label, &args.pif).await?;
    println!(
        "VLANPROBE: label bridge={} port={} created={label_created}",
        args.label, args.pif
    );

    let result = vlan_round_trip(&args, &links, &label, vlan, &want_dev, &want_br).await;
    // The fixture goes even when the round trip failed.
    let fixture = if label_created {
        remove_label(&links, &args.label).await
    } else {
        Ok(())
    };
    result?;
    fixture?;
    println!("VLANPROBE: clean dev={want_dev} bridge={want_br} label_removed={label_created}");
    Ok(())
}

/// resolve, prepare, check, address, (wait), undo, check that the links are gone.
async fn vlan_round_trip(
    args: &Args,
    links: &Links,
    label: &BridgeName,
    vlan: VlanId,
    want_dev: &str,
    want_br: &str,
) -> Result<()> {
    let host = NetlinkHost::new(HostConfig {
        state_dir: args.state_dir.clone(),
        ..HostConfig::default()
    })?;
    let plan = host
        .resolve(label, SwitchType::LinuxBridge, &Segment::Vlan(vlan))
        .await
        .context("resolve")?;
    match &plan.segment_device {
        Some(SegmentDevice::Vlan { name, parent, id }) => ensure!(
            name == want_dev && parent == &args.pif && *id == vlan,
            "plan has VLAN device {name} on {parent} id {id}, expected {want_dev} on {} id {vlan}",
            args.pif
        ),
        other => bail!("plan has segment device {other:?}, expected VLAN {want_dev}"),
    }
    ensure!(
        plan.bridge.as_str() == want_br,
        "plan bridge {}, expected {want_br}",
        plan.bridge
    );
    println!(
        "VLANPROBE: plan dev={want_dev} bridge={want_br} changes={}",
        plan.changes.len()
    );

    let undo = host.prepare(&plan).await.context("prepare")?;
    println!(
        "VLANPROBE: created dev={want_dev} bridge={want_br} vlan={vlan} undo={}",
        undo.len()
    );
    // Undo must run even when a check below fails, so the result is kept.
    let checked = async {
        check_created(links, &args.pif, want_dev, want_br, vlan.get()).await?;
        links.add_address(want_br, &args.ip).await?;
        println!("VLANPROBE: ready bridge={want_br} ip={}", args.ip);
        if args.keep {
            let why = wait_for_release().await?;
            println!("VLANPROBE: releasing ({why})");
        }
        anyhow::Ok(())
    }
    .await;
    let undone = run_undo(&host, undo).await;
    if undone.is_ok() {
        println!("VLANPROBE: undone");
    }
    checked?;
    undone?;

    for name in [want_dev, want_br] {
        ensure!(
            links.get(name).await?.is_none(),
            "{name} still exists after undo"
        );
    }
    ensure!(
        links.get(&args.pif).await?.is_some(),
        "{} disappeared with its VLAN",
        args.pif
    );
    Ok(())
}

/// Deletes the label bridge fixture and checks that it is gone.
async fn remove_label(links: &Links, label: &str) -> Result<()> {
    links.delete(label).await?;
    ensure!(
        links.get(label).await?.is_none(),
        "label bridge {label} still exists"
    );
    Ok(())
}

/// Checks through the probe's own netlink socket what prepare built.
async fn check_created(links: &Links, pif: &str, dev: &str, br: &str, vlan: u16) -> Result<()> {
    let p = links.need(pif).await?;
    let d = links.need(dev).await?;
    let b = links.need(br).await?;
    ensure!(
        d.kind == Some(InfoKind::Vlan),
        "{dev} is {:?}, not vlan",
        d.kind
    );
    ensure!(
        d.vlan_id == Some(vlan),
        "{dev} has VLAN id {:?}, not {vlan}",
        d.vlan_id
    );
    ensure!(d.parent == Some(p.index), "{dev} is not on {pif}");
    ensure!(
        b.kind == Some(InfoKind::Bridge),
        "{br} is {:?}, not a bridge",
        b.kind
    );
    ensure!(
        d.controller == Some(b.index),
        "{dev} is not enslaved to {br}"
    );
    for (name, l) in [(dev, &d), (br, &b)] {
        ensure!(
            l.alias.as_deref() == Some(AGENT_ALIAS),
            "{name} lacks the agent alias (has {:?})",
            l.alias
        );
    }
    println!(
        "VLANPROBE: verified dev={dev} id={vlan} parent={pif} master={br} alias={AGENT_ALIAS}"
    );
    Ok(())
}

/// Runs every undo step in reverse order; reports the first failure after
/// trying them all (a failed step must not leave later links behind).
async fn run_undo(host: &NetlinkHost, undo: Vec<HostUndo>) -> Result<()> {
    let mut first = None;
    for step in undo.into_iter().rev() {
        let desc = format!("{step:?}");
        match host.undo(step).await {
            Ok(()) => println!("VLANPROBE: undo ok {desc}"),
            Err(e) => {
                eprintln!("VLANPROBE: undo failed {desc}: {e}");
                first.get_or_insert(anyhow!("undo {desc}: {e}"));
            }
        }
    }
    first.map_or(Ok(()), Err)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("VLANPROBE: error: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(probe(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("VLANPROBE: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
