//! `Diagnose` and `nic-agent doctor` on libvirt's test driver, where host
//! networking is off: the XML hop is judged for real, every host hop says
//! it was not inspected, and bad requests get the usual codes.

mod common;

use std::process::Command;

use common::*;
use nic_agent::api::pb;
use tonic::Code;

async fn diagnose(
    c: &mut pb::nic_agent_client::NicAgentClient<tonic::transport::Channel>,
    vm: &str,
    mac: &str,
) -> Result<pb::DiagnoseResponse, tonic::Status> {
    c.diagnose(pb::DiagnoseRequest {
        vm: vm.into(),
        mac: mac.into(),
        request_id: String::new(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

fn status(r: &pb::DiagnoseResponse, hop: &str) -> pb::HopStatus {
    let h = r
        .hops
        .iter()
        .find(|h| h.name == hop)
        .unwrap_or_else(|| panic!("no hop {hop} in {r:#?}"));
    pb::HopStatus::try_from(h.status).expect("known status")
}

const HOST_HOPS: [&str; 8] = [
    "tap", "bridge", "segment", "uplink", "mtu", "promisc", "counters", "fdb",
];

#[tokio::test]
async fn nic_in_live_and_persistent_xml_is_ok_and_host_hops_say_not_inspected() {
    let a = start_agent(&lab_uri(), &[]);
    let mut c = client(&a).await;
    let r = diagnose(&mut c, "i-2-10-VM", "02:00:0A:00:00:01")
        .await
        .expect("diagnose");
    assert_eq!(r.hops.len(), 9, "{r:#?}");
    assert_eq!(status(&r, "xml"), pb::HopStatus::Ok, "{r:#?}");
    for name in HOST_HOPS {
        assert_eq!(status(&r, name), pb::HopStatus::Warning, "{name}");
        let h = r.hops.iter().find(|h| h.name == name).expect("hop");
        assert!(
            h.evidence
                .contains("host not inspected (host networking off)"),
            "{h:#?}"
        );
    }
    let nic = r.nic.expect("nic");
    assert_eq!(nic.mac, "02:00:0a:00:00:01");
    assert!(nic.in_live && nic.in_config);
    assert!(!r.request_id.is_empty());
}

#[tokio::test]
async fn hot_plugged_live_only_nic_warns_that_a_restart_loses_it() {
    let a = start_agent(&lab_uri(), &[]);
    let mut c = client(&a).await;
    c.attach_nic(pb::AttachNicRequest {
        vm: "i-2-10-VM".into(),
        nic: Some(nic("02:00:0d:0d:00:01", "cloudbr0")),
        request_id: String::new(),
    })
    .await
    .expect("attach");
    let r = diagnose(&mut c, "i-2-10-VM", "02:00:0d:0d:00:01")
        .await
        .expect("diagnose");
    assert_eq!(status(&r, "xml"), pb::HopStatus::Warning, "{r:#?}");
    assert!(r.hops[0].evidence.contains("not in the persistent XML"));
    assert!(!r.hops[0].fix.is_empty());
}

#[tokio::test]
async fn unknown_mac_is_an_xml_fault_and_nothing_else_is_judged() {
    let a = start_agent(&lab_uri(), &[]);
    let mut c = client(&a).await;
    let r = diagnose(&mut c, "i-2-10-VM", "02:00:0d:0d:00:99")
        .await
        .expect("diagnose");
    assert_eq!(status(&r, "xml"), pb::HopStatus::Fault);
    assert!(r.hops[0].evidence.contains("02:00:0d:0d:00:99"));
    assert!(r.nic.is_none());
    for name in HOST_HOPS {
        assert_eq!(status(&r, name), pb::HopStatus::Warning, "{name}");
    }
}

#[tokio::test]
async fn stopped_vm_nic_is_ok_in_its_persistent_xml() {
    let a = start_agent(&lab_uri(), &[]);
    let mut c = client(&a).await;
    let r = diagnose(&mut c, "i-2-11-VM", "02:00:0a:00:00:11")
        .await
        .expect("diagnose");
    assert_eq!(status(&r, "xml"), pb::HopStatus::Ok, "{r:#?}");
    assert!(r.hops[0].evidence.contains("not running"), "{r:#?}");
    assert!(r.hops[1].evidence.contains("not running"), "{r:#?}");
}

#[tokio::test]
async fn unknown_vm_is_not_found_and_bad_mac_is_invalid_argument() {
    let a = start_agent(&lab_uri(), &[]);
    let mut c = client(&a).await;
    let e = diagnose(&mut c, "i-9-999-VM", "02:00:0a:00:00:01")
        .await
        .expect_err("unknown vm");
    assert_eq!(e.code(), Code::NotFound);
    let e = diagnose(&mut c, "i-2-10-VM", "zz")
        .await
        .expect_err("bad mac");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("mac"), "{}", e.message());
    let e = diagnose(&mut c, "", "02:00:0a:00:00:01")
        .await
        .expect_err("empty vm");
    assert_eq!(e.code(), Code::InvalidArgument);
}

fn doctor(addr: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nic-agent"))
        .args(["doctor", "--server", addr])
        .args(args)
        .output()
        .expect("run doctor");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn doctor_cli_prints_a_table_and_exits_by_verdict() {
    let a = start_agent(&lab_uri(), &[]);
    // No FAULT (warnings only): exit 0 and one row per hop.
    let (code, out, err) = doctor(
        &a.addr,
        &["--vm", "i-2-10-VM", "--mac", "02:00:0a:00:00:01"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("doctor i-2-10-VM 02:00:0a:00:00:01: 0 FAULT, 8 WARNING, 1 OK"),
        "{out}"
    );
    assert!(out.contains("HOP       STATUS   EVIDENCE / FIX"), "{out}");
    assert!(
        out.contains("\nxml       OK       in the live XML"),
        "{out}"
    );
    assert!(
        out.contains("\ntap       WARNING  host not inspected"),
        "{out}"
    );
    assert!(
        out.contains("fix: run the agent with --host-network on"),
        "{out}"
    );
    // A FAULT: exit 1, the report still on stdout.
    let (code, out, _) = doctor(
        &a.addr,
        &["--vm", "i-2-10-VM", "--mac", "02:00:0d:0d:00:98"],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("\nxml       FAULT"), "{out}");
    // No diagnosis at all: exit 2 with the gRPC code on stderr.
    let (code, out, err) = doctor(
        &a.addr,
        &["--vm", "i-9-999-VM", "--mac", "02:00:0a:00:00:01"],
    );
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("NOT_FOUND"), "{err}");
    // JSON carries the same verdicts.
    let (code, out, _) = doctor(
        &a.addr,
        &["--vm", "i-2-10-VM", "--mac", "02:00:0a:00:00:01", "--json"],
    );
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["hops"][0]["name"], "xml");
    assert_eq!(v["hops"][0]["status"], "OK");
    assert_eq!(v["hops"][1]["status"], "WARNING");
    assert_eq!(v["nic"]["mac"], "02:00:0a:00:00:01");
}

#[tokio::test]
async fn bad_intended_broadcast_uri_is_invalid_argument_naming_it() {
    let a = start_agent(&lab_uri(), &[]);
    let mut c = client(&a).await;
    let e = c
        .diagnose(pb::DiagnoseRequest {
            vm: "i-2-10-VM".into(),
            mac: "02:00:0A:00:00:01".into(),
            broadcast_uri: "vlan://5000".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad uri");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("broadcast_uri"), "{}", e.message());
}
