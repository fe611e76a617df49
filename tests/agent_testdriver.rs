//! The agent end to end on libvirt's test driver: the real binary, a real
//! gRPC client, the embedded lab node (fixtures/lab-node.xml).

mod common;

use common::*;
use nic_agent::api::pb;
use tonic::Code;

#[tokio::test]
async fn attach_bridge_nic_reports_what_libvirt_holds() {
    let a = start_agent(&lab_uri(), &[]);
    let mut c = client(&a).await;
    let before = nics(&mut c, "i-2-10-VM").await.len();
    let mut n = nic("02:00:0A:00:10:01", "cloudbr0");
    n.mtu = Some(1450);
    n.queues = Some(2);
    n.link_down = true;
    n.inbound = Some(pb::Bandwidth {
        rate_mbps: 100,
        ..Default::default()
    });
    let r = attach(&mut c, "i-2-10-VM", n).await.expect("attach");
    assert!(!r.already_present);
    // libvirt's test driver rejects AFFECT_CONFIG, so a running persistent
    // VM is changed live only there (live+config is proven on real QEMU).
    assert_eq!(r.applied, "live");
    assert!(!r.request_id.is_empty());
    let got = r.nic.expect("nic");
    assert_eq!(got.mac, "02:00:0a:00:10:01");
    assert_eq!(got.bridge, "cloudbr0");
    assert_eq!(got.mtu, 1450);
    assert_eq!(got.queues, 2);
    assert_eq!(got.model, "virtio");
    assert_eq!(got.link_state, "down");
    assert!(
        got.alias.starts_with("ua-"),
        "generated alias: {}",
        got.alias
    );
    assert!(got.in_live && !got.in_config);
    // CloudStack's 100 Mbit/s, as libvirt stores it: 12500 KB/s average and peak.
    let inbound = got.inbound.expect("inbound read back");
    assert_eq!((inbound.average_kbps, inbound.peak_kbps), (12500, 12500));
    assert_eq!(got.outbound, None);
    // vhost=auto: vhost only where /dev/vhost-net exists; read back as written.
    let want = if std::path::Path::new("/dev/vhost-net").exists() {
        "vhost"
    } else {
        "qemu"
    };
    assert_eq!(got.driver, want);
    let after = nics(&mut c, "i-2-10-VM").await;
    assert_eq!(after.len(), before + 1);
    let listed = after
        .iter()
        .find(|x| x.mac == "02:00:0a:00:10:01")
        .expect("listed");
    assert_eq!(listed.inbound, Some(inbound));
}

#[tokio::test]
async fn attach_ovs_vlan_nic_carries_the_tag() {
    let a = start_agent(&lab_uri(), &[]);
    let mut c = client(&a).await;
    let mut n = nic("02:00:0a:00:10:02", "br-ovs0");
    n.switch_type = pb::SwitchType::OpenVswitch as i32;
    n.broadcast_uri = "vlan://200".into();
    let r = attach(&mut c, "i-3-20-VM", n).await.expect("attach");
    let got = r.nic.expect("nic");
    assert_eq!(got.vlan, 200);
    assert_eq!(got.bridge, "br-ovs0");
    assert_eq!(got.inbound, None);
    // 4 vCPUs and the default cap of 8: four queue pairs.
    assert_eq!(got.queues, 4);
}

#[tokio::test]
async fn attach_is_idempotent_for_same_mac() {
    let a = start_agent(&lab_uri(), &[]);
    let mut c = client(&a).await;
    let mut n = nic("02:00:0a:00:10:03", "cloudbr0");
    n.alias = "ua-web-1".into();
    n.mtu = Some(1500);
    let first = attach(&mut c, "i-2-10-VM", n.clone()).await.expect("first");
    let count = nics(&mut c, "i-2-10-VM").await.len();
    let again = attach(&mut c, "i-2-10-VM", n).await.expect("retry");
    assert!(again.already_present);
    assert_eq!(again.nic, first.nic);
    assert_eq!(nics(&mut c, "i-2-10-VM").await.len(), count);
}

#[tokio::test]
async fn same_mac_with_different_spec_is_already_exists_naming_the_field() {
    let a = start_agent(&lab_uri(), &[]);
    let mut c = client(&a).await;
    let mut n = nic("02:00:0a:00:10:04", "cloudbr0");
    n.mtu = Some(1500);
    attach(&mut c, "i-2-10-VM", n.clone()).await.expect("first");
    let before = nics(&mut c, "i-2-10-VM").await;
    n.mtu = Some(9000);
    let e = attach(&mut c, "i-2-10-VM", n).await.expect_err("conflict");
    assert_eq!(e.code(), Code::AlreadyExists);
    assert!(e.message().contains("mtu"), "{}", e.message());
    assert_eq!(nics(&mut c, "i-2-10-VM").await, before);
}

#[tokio::test]
async fn unknown_vm_is_not_found() {
    let a = start_agent(&lab_uri(), &[]);
    let mut c = client(&a).await;
    let e = attach(&mut c, "i-9-999-VM", nic("02:00:0a:00:10:05", "cloudbr0"))
        .await
        .expect_err("unknown vm");
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("i-9-999-VM"));
    let e = c
        .list_nics(pb::ListNicsRequest {
            vm: "6a1e3a6c-0000-4b6e-9a0e-2f3c4d5e6f10".into(),
        })
        .await
        .expect_err("unknown uuid");
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn every_class_of_bad_input_is_invalid_argument_and_changes_nothing() {
    let a = start_agent(&lab_uri(), &[]);
    let mut c = client(&a).await;
    let vm = "i-2-10-VM";
    let base = || nic("02:00:0a:00:10:06", "cloudbr0");
    let mut cases: Vec<(&str, pb::NicSpec)> = Vec::new();
    let mut n = base();
    n.mac = "01:00:5e:00:00:01".into();
    cases.push(("mac", n));
    let mut n = base();
    n.mac = "00:00:00:00:00:00".into();
    cases.push(("mac", n));
    let mut n = base();
    n.mac = "zz".into();
    cases.push(("mac", n));
    let mut n = base();
    n.bridge = "a-very-long-bridge".into();
    cases.push(("bridge", n));
    let mut n = base();
    n.bridge = "br/0".into();
    cases.push(("bridge", n));
    let mut n = base();
    n.bridge = "br0'/><x".into();
    cases.push(("bridge", n));
    for v in [0u32, 4095, 4096] {
        let mut n = base();
        n.vlan = Some(v);
        n.switch_type = pb::SwitchType::OpenVswitch as i32;
        cases.push(("vlan", n));
    }
    for v in [0u32, 16_777_216] {
        let mut n = base();
        n.vni = Some(v);
        cases.push(("vni", n));
    }
    for m in [0u32, 67, 65_536] {
        let mut n = base();
        n.mtu = Some(m);
        cases.push(("mtu", n));
    }
    for q in [0u32, 257] {
        let mut n = base();
        n.queues = Some(q);
        cases.push(("queues", n));
    }
    let mut n = base();
    n.queues = Some(3); // the VM has 2 vCPUs
    cases.push(("queues", n));
    let mut n = base();
    n.model = "e1000".into();
    n.queues = Some(2);
    cases.push(("queues", n));
    let mut n = base();
    n.alias = "web-1".into();
    cases.push(("alias", n));
    let mut n = base();
    n.broadcast_uri = "pvlan://100-i200".into();
    cases.push(("broadcast_uri", n));
    let mut n = base();
    n.switch_type = 7;
    cases.push(("switch_type", n));
    let before = nics(&mut c, vm).await;
    for (field, spec) in cases {
        let e = attach(&mut c, vm, spec.clone())
            .await
            .expect_err(&format!("{field}: {spec:?} must be rejected"));
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {}", e.message());
        assert!(
            e.message().contains(field),
            "message must name {field}: {}",
            e.message()
        );
    }
    assert_eq!(
        nics(&mut c, vm).await,
        before,
        "rejected requests changed the domain"
    );
}

#[tokio::test]
async fn full_vm_is_resource_exhausted_before_libvirt_is_asked() {
    let a = start_agent(&lab_uri(), &[]);
    let mut c = client(&a).await;
    let cap = c
        .get_pci_capacity(pb::GetPciCapacityRequest {
            vm: "i-2-99-VM".into(),
        })
        .await
        .expect("capacity")
        .into_inner();
    assert_eq!(cap.free_slots, 0);
    assert_eq!(cap.machine_family, "pc");
    let before = nics(&mut c, "i-2-99-VM").await;
    let e = attach(&mut c, "i-2-99-VM", nic("02:00:0a:00:10:07", "cloudbr0"))
        .await
        .expect_err("full");
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("30 of 30"), "{}", e.message());
    assert_eq!(nics(&mut c, "i-2-99-VM").await, before);
    let ok = c
        .get_pci_capacity(pb::GetPciCapacityRequest {
            vm: "i-2-10-VM".into(),
        })
        .await
        .expect("capacity")
        .into_inner();
    assert!(ok.free_slots > 0);
}

#[tokio::test]
async fn nic_limit_is_resource_exhausted() {
    let a = start_agent(&lab_uri(), &["--nic-limit", "2"]);
    let mut c = client(&a).await;
    // r-4-VM already has 2 NICs.
    let e = attach(&mut c, "r-4-VM", nic("02:00:0a:00:10:08", "cloudbr0"))
        .await
        .expect_err("limit");
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("nic_limit"), "{}", e.message());
}

#[tokio::test]
async fn stopped_vm_on_test_driver_is_unimplemented_and_transient_gets_live_only() {
    let a = start_agent(&lab_uri(), &[]);
    let mut c = client(&a).await;
    let before = nics(&mut c, "i-2-11-VM").await;
    // The test driver cannot edit a persistent definition; CONFIG-only
    // attach to a stopped VM is proven on real QEMU in the lab tier.
    let e = attach(&mut c, "i-2-11-VM", nic("02:00:0a:00:10:09", "cloudbr0"))
        .await
        .expect_err("stopped");
    assert_eq!(e.code(), Code::Unimplemented);
    assert!(
        e.message().to_lowercase().contains("test driver"),
        "{}",
        e.message()
    );
    assert_eq!(nics(&mut c, "i-2-11-VM").await, before);
    let r = attach(&mut c, "i-2-12-VM", nic("02:00:0a:00:10:0a", "cloudbr0"))
        .await
        .expect("transient");
    assert_eq!(r.applied, "live");
    let n = r.nic.expect("nic");
    assert!(n.in_live && !n.in_config);
    // 4 vCPUs: four queue pairs by default.
    assert_eq!(n.queues, 4);
}

#[tokio::test]
async fn detach_on_test_driver_is_unimplemented_and_changes_nothing() {
    let a = start_agent(&lab_uri(), &[]);
    let mut c = client(&a).await;
    let before = nics(&mut c, "i-2-10-VM").await;
    let e = c
        .detach_nic(pb::DetachNicRequest {
            vm: "i-2-10-VM".into(),
            mac: "02:00:0a:00:00:01".into(),
            ..Default::default()
        })
        .await
        .expect_err("test driver cannot detach");
    assert_eq!(e.code(), Code::Unimplemented);
    assert!(
        e.message().to_lowercase().contains("test"),
        "{}",
        e.message()
    );
    assert_eq!(nics(&mut c, "i-2-10-VM").await, before);
    // An absent MAC needs no libvirt call at all.
    let r = c
        .detach_nic(pb::DetachNicRequest {
            vm: "i-2-10-VM".into(),
            mac: "02:00:0a:00:ff:ff".into(),
            ..Default::default()
        })
        .await
        .expect("absent")
        .into_inner();
    assert_eq!(r.state, pb::DetachState::AlreadyAbsent as i32);
}

#[tokio::test]
async fn list_vms_shows_the_lab() {
    let a = start_agent(&lab_uri(), &[]);
    let mut c = client(&a).await;
    let vms = c
        .list_vms(pb::ListVmsRequest {})
        .await
        .expect("vms")
        .into_inner()
        .vms;
    let names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    for want in ["i-2-10-VM", "i-2-11-VM", "i-2-12-VM", "r-4-VM"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let stopped = vms
        .iter()
        .find(|v| v.name == "i-2-11-VM")
        .expect("i-2-11-VM");
    assert_eq!(stopped.state, "shut off");
    let transient = vms
        .iter()
        .find(|v| v.name == "i-2-12-VM")
        .expect("i-2-12-VM");
    assert!(!transient.persistent);
    assert_eq!(transient.vcpus, 4);
}

#[tokio::test]
async fn health_is_serving_and_reflection_lists_the_service() {
    let a = start_agent(&lab_uri(), &[]);
    let ch = tonic::transport::Endpoint::try_from(format!("http://{}", a.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let mut serving = false;
    for _ in 0..50 {
        let r = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: "nicagent.v1.NicAgent".into(),
            })
            .await;
        if let Ok(r) = r {
            if r.into_inner().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            {
                serving = true;
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(serving, "health never became SERVING");

    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut r = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = r
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection")
        .into_inner();
    let resp = stream.message().await.expect("msg").expect("some");
    let Some(MessageResponse::ListServicesResponse(l)) = resp.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"nicagent.v1.NicAgent".to_string()),
        "{names:?}"
    );
}

#[tokio::test]
async fn concurrent_attaches_across_vms_all_land() {
    let a = start_agent(&lab_uri(), &[]);
    let vms = ["i-2-10-VM", "i-3-20-VM", "r-4-VM", "i-2-12-VM"];
    let mut before = Vec::new();
    for vm in vms {
        let mut c = client(&a).await;
        before.push(nics(&mut c, vm).await.len());
    }
    let mut tasks = Vec::new();
    for (i, vm) in vms.iter().enumerate() {
        for j in 0..5 {
            let addr = a.addr.clone();
            let vm = vm.to_string();
            tasks.push(tokio::spawn(async move {
                let mut c = pb::nic_agent_client::NicAgentClient::connect(format!("http://{addr}"))
                    .await
                    .expect("connect");
                let mac = format!("02:00:0c:00:{i:02x}:{j:02x}");
                attach(&mut c, &vm, nic(&mac, "cloudbr0")).await
            }));
        }
    }
    for t in tasks {
        t.await.expect("join").expect("attach");
    }
    for (k, vm) in vms.iter().enumerate() {
        let mut c = client(&a).await;
        assert_eq!(nics(&mut c, vm).await.len(), before[k] + 5, "{vm}");
    }
}

#[tokio::test]
async fn request_id_comes_from_field_or_metadata() {
    let a = start_agent(&lab_uri(), &[]);
    let mut c = client(&a).await;
    let r = c
        .attach_nic(pb::AttachNicRequest {
            vm: "i-2-10-VM".into(),
            nic: Some(nic("02:00:0a:00:10:0b", "cloudbr0")),
            request_id: "job-42".into(),
        })
        .await
        .expect("attach")
        .into_inner();
    assert_eq!(r.request_id, "job-42");
    let mut req = tonic::Request::new(pb::AttachNicRequest {
        vm: "i-2-10-VM".into(),
        nic: Some(nic("02:00:0a:00:10:0c", "cloudbr0")),
        request_id: String::new(),
    });
    req.metadata_mut()
        .insert("x-request-id", "job-43".parse().expect("meta"));
    let r = c.attach_nic(req).await.expect("attach").into_inner();
    assert_eq!(r.request_id, "job-43");
}

/// libvirt's test driver has no nwfilter driver (VIR_ERR_NO_SUPPORT), like
/// a host without libvirt-daemon-driver-nwfilter: a NIC that asks for
/// anti-spoofing is refused, not plugged unprotected.
#[tokio::test]
async fn anti_spoofing_without_nwfilter_driver_is_failed_precondition_and_changes_nothing() {
    let a = start_agent(&lab_uri(), &["--anti-spoofing", "nwfilter"]);
    let mut c = client(&a).await;
    let before = nics(&mut c, "i-2-10-VM").await;
    let mut n = nic("02:00:0a:00:50:01", "cloudbr0");
    n.anti_spoofing = true;
    n.ips = vec!["10.1.1.5".into(), "2001:db8::5".into()];
    let e = attach(&mut c, "i-2-10-VM", n.clone())
        .await
        .expect_err("no nwfilter driver");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(
        e.message().contains("libvirt-daemon-driver-nwfilter"),
        "{}",
        e.message()
    );
    assert_eq!(nics(&mut c, "i-2-10-VM").await, before);
    // The same NIC without the flag attaches, without a filter.
    n.anti_spoofing = false;
    let r = attach(&mut c, "i-2-10-VM", n).await.expect("attach");
    assert_eq!(r.nic.expect("nic").filter, "");
}

#[tokio::test]
async fn anti_spoofing_off_plugs_without_filter_and_says_so() {
    let a = start_agent(&lab_uri(), &["--anti-spoofing", "off"]);
    let mut c = client(&a).await;
    let mut n = nic("02:00:0a:00:50:02", "cloudbr0");
    n.anti_spoofing = true;
    let r = attach(&mut c, "i-2-10-VM", n).await.expect("attach");
    assert_eq!(r.nic.expect("nic").filter, "");
    assert_eq!(r.notes.len(), 1, "{:?}", r.notes);
    assert!(r.notes[0].contains("off"), "{:?}", r.notes);
}

#[tokio::test]
async fn bad_ips_are_invalid_argument() {
    let a = start_agent(&lab_uri(), &[]);
    let mut c = client(&a).await;
    let mut n = nic("02:00:0a:00:50:03", "cloudbr0");
    n.anti_spoofing = true;
    n.ips = vec!["10.1.1.300".into()];
    let e = attach(&mut c, "i-2-10-VM", n).await.expect_err("bad ip");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("ips"), "{}", e.message());
}

/// test:///default's own VM `test` (`type='test'`, no machine type, no
/// ACPI) is the first thing a newcomer tries. QEMU's i440fx ACPI rule does
/// not apply to the test driver, so the attach goes through and capacity
/// says there is room.
#[tokio::test]
async fn test_default_own_vm_takes_a_nic() {
    let a = start_agent("test:///default", &[]);
    let mut c = client(&a).await;
    let cap = c
        .get_pci_capacity(pb::GetPciCapacityRequest { vm: "test".into() })
        .await
        .expect("capacity")
        .into_inner();
    assert_eq!(cap.machine_family, "pc");
    assert_eq!(
        (cap.free_slots, cap.used_slots, cap.total_slots),
        (29, 1, 30)
    );
    assert_eq!(cap.full_reason, "");
    assert!(cap.notes.is_empty(), "{:?}", cap.notes);
    let before = nics(&mut c, "test").await.len();
    let r = attach(&mut c, "test", nic("02:00:0a:00:77:01", "cloudbr0"))
        .await
        .expect("attach to test:///default's VM test");
    assert_eq!(r.applied, "live");
    let got = r.nic.expect("nic");
    assert_eq!(got.mac, "02:00:0a:00:77:01");
    // The test driver assigns no PCI addresses (lab-facts), so no slot to check.
    assert_eq!(got.pci, None);
    assert_eq!(nics(&mut c, "test").await.len(), before + 1);
}

/// CloudStack's PlugNic fields that libvirt can hold come back from
/// libvirt's own XML: the NIC uuid in the alias, deviceId as ACPI index + 1,
/// the option ROM off, packed virtqueues.
#[tokio::test]
async fn plugnic_fields_are_read_back_from_libvirt() {
    let a = start_agent(&lab_uri(), &[]);
    let mut c = client(&a).await;
    // Every switch type, not only OVS (whose interface-id is no help here).
    for (mac, bridge, ovs, uuid) in [
        (
            "02:00:0a:00:10:41",
            "cloudbr0",
            false,
            "0f5c3b8e-1d2a-4c6b-9e7f-112233445566",
        ),
        (
            "02:00:0a:00:10:42",
            "br-ovs0",
            true,
            "1f5c3b8e-1d2a-4c6b-9e7f-112233445566",
        ),
    ] {
        let mut n = nic(mac, bridge);
        if ovs {
            n.switch_type = pb::SwitchType::OpenVswitch as i32;
        }
        n.pxe_disable = true;
        n.nic_uuid = uuid.into();
        n.device_id = Some(if ovs { 6 } else { 5 });
        n.packed = true;
        n.default_nic = true;
        n.ipv4_cidr = "10.1.1.5/24".into();
        let r = attach(&mut c, "i-3-20-VM", n.clone())
            .await
            .expect("attach");
        assert_eq!(r.carried.as_ref().map(|c| c.default_nic), Some(true));
        let got = nics(&mut c, "i-3-20-VM")
            .await
            .into_iter()
            .find(|x| x.mac == mac)
            .expect("listed");
        assert_eq!(got.nic_uuid, uuid, "{bridge}");
        assert_eq!(got.alias, format!("ua-nic-{uuid}"));
        assert_eq!(got.device_id, n.device_id);
        assert_eq!(got.acpi_index, n.device_id.unwrap() + 1);
        assert!(got.pxe_disabled && got.packed, "{got:?}");
        // A faithful retry is idempotent.
        let again = attach(&mut c, "i-3-20-VM", n).await.expect("retry");
        assert!(again.already_present);
    }
}

#[tokio::test]
async fn guest_config_rpc_renders_every_file_and_changes_nothing() {
    let a = start_agent(&lab_uri(), &[]);
    let mut c = client(&a).await;
    let before = nics(&mut c, "i-2-10-VM").await;
    let r = c
        .guest_config(pb::GuestConfigRequest {
            mac: "52:54:00:ab:cd:01".into(),
            ip: "10.77.32.88/24".into(),
            gateway: "10.77.32.1".into(),
            table: 100,
            ip6: "2001:db8::5/64".into(),
            request_id: "gc-1".into(),
            ..Default::default()
        })
        .await
        .expect("guest config")
        .into_inner();
    assert_eq!(r.request_id, "gc-1");
    let get = |p: &str| {
        r.files
            .iter()
            .find(|f| f.path == p)
            .unwrap_or_else(|| panic!("no {p}"))
    };
    // Empty name means eth1, as the CLI's default.
    let ifcfg = get("/etc/sysconfig/network-scripts/ifcfg-eth1");
    assert!(
        ifcfg.content.contains("NM_CONTROLLED=yes\n"),
        "{}",
        ifcfg.content
    );
    assert!(ifcfg.content.contains("DEFROUTE=no\n"), "{}", ifcfg.content);
    assert_eq!(get("/etc/netplan/60-eth1.yaml").mode, 0o600);
    assert_eq!(
        get("/etc/sysconfig/network-scripts/rule-eth1").content,
        "from 10.77.32.88 table 100\n"
    );
    assert!(get("/etc/systemd/network/60-eth1.network")
        .content
        .contains("Address=2001:db8::5/64"));
    // Pure: the VMs are as they were.
    assert_eq!(nics(&mut c, "i-2-10-VM").await, before);
}

#[tokio::test]
async fn guest_config_rpc_bad_values_are_invalid_argument_naming_the_flag() {
    let a = start_agent(&lab_uri(), &[]);
    let mut c = client(&a).await;
    let base = || pb::GuestConfigRequest {
        mac: "52:54:00:ab:cd:01".into(),
        ..Default::default()
    };
    let cases = [
        (
            "--mac",
            pb::GuestConfigRequest {
                mac: "zz".into(),
                ..base()
            },
        ),
        (
            "--table",
            pb::GuestConfigRequest {
                table: 254,
                ..base()
            },
        ),
        (
            "--ip6-mode",
            pb::GuestConfigRequest {
                ip6_mode: "auto".into(),
                ..base()
            },
        ),
        (
            "--gateway",
            pb::GuestConfigRequest {
                gateway: "10.0.0.1".into(),
                ..base()
            },
        ),
    ];
    for (flag, req) in cases {
        let e = c.guest_config(req).await.expect_err(flag);
        assert_eq!(e.code(), Code::InvalidArgument, "{flag}: {}", e.message());
        assert!(
            e.message().starts_with(&format!("invalid {flag} ")),
            "{}",
            e.message()
        );
    }
}

/// ReplugNic on the test driver: every refusal names its cause and changes
/// nothing; the same network is NOTHING. The driver cannot update an
/// interface, so a real move is UNIMPLEMENTED with the NIC as it was (both
/// ways are proven on QEMU, tests/lab/test_e2e_replug.py).
#[tokio::test]
async fn replug_refusals_change_nothing_and_same_network_is_nothing() {
    let a = start_agent(&lab_uri(), &[]);
    let mut c = client(&a).await;
    let vm = "i-2-10-VM";
    let m = "02:00:0a:00:1e:01";
    attach(&mut c, vm, nic(m, "cloudbr0"))
        .await
        .expect("attach");
    let before = nics(&mut c, vm).await;
    let req = |bridge: &str| pb::ReplugNicRequest {
        vm: vm.into(),
        mac: m.into(),
        bridge: bridge.into(),
        request_id: "rp-1".into(),
        ..Default::default()
    };

    let same = c
        .replug_nic(req("cloudbr0"))
        .await
        .expect("same network")
        .into_inner();
    assert_eq!(same.way, pb::ReplugWay::Nothing as i32);
    assert_eq!(same.old_bridge, "cloudbr0");
    assert_eq!(same.request_id, "rp-1");
    assert_eq!(same.nic.expect("nic").bridge, "cloudbr0");

    let cases: Vec<(pb::ReplugNicRequest, Code, &str)> = vec![
        (
            pb::ReplugNicRequest {
                vlan: Some(4095),
                switch_type: pb::SwitchType::OpenVswitch as i32,
                ..req("br-ovs0")
            },
            Code::InvalidArgument,
            "vlan",
        ),
        (
            pb::ReplugNicRequest {
                broadcast_uri: "pvlan://100-i200".into(),
                ..req("cloudbr1")
            },
            Code::InvalidArgument,
            "pvlan://100-i200",
        ),
        (req("-br"), Code::InvalidArgument, "bridge"),
        (
            pb::ReplugNicRequest {
                timeout_ms: 300_001,
                ..req("cloudbr1")
            },
            Code::InvalidArgument,
            "timeout_ms",
        ),
        (
            pb::ReplugNicRequest {
                mac: "02:00:0a:00:1e:99".into(),
                ..req("cloudbr1")
            },
            Code::NotFound,
            "02:00:0a:00:1e:99",
        ),
        (
            pb::ReplugNicRequest {
                vm: "i-9-9-VM".into(),
                ..req("cloudbr1")
            },
            Code::NotFound,
            "i-9-9-VM",
        ),
        // The embedded lab runs without host networking: a VXLAN segment
        // has no bridge to land on.
        (
            pb::ReplugNicRequest {
                broadcast_uri: "vxlan://5001".into(),
                ..req("cloudbr1")
            },
            Code::FailedPrecondition,
            "vxlan://5001",
        ),
        // A real move: the test driver cannot update an interface.
        (req("cloudbr1"), Code::Unimplemented, "back on cloudbr0"),
    ];
    for (r, code, names) in cases {
        let what = format!("{r:?}");
        let e = c.replug_nic(r).await.expect_err(&what);
        assert_eq!(e.code(), code, "{what}: {}", e.message());
        assert!(e.message().contains(names), "{what}: {}", e.message());
        assert_eq!(nics(&mut c, vm).await, before, "{what} changed the VM");
    }
}
