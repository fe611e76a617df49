"""nic-agent driven by Python grpcio: a gRPC implementation nobody on this
project wrote. Stubs are generated from proto/ at test time.

Run: python3 tests/python/test_grpc_client.py [path/to/nic-agent]
"""
import os
import subprocess
import sys
import tempfile
import threading
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("NIC_AGENT_BIN", os.path.join(ROOT, "target", "debug", "nic-agent"))


def generate_stubs():
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="nicagent-py-")
    rc = protoc.main([
        "protoc", f"-I{ROOT}/proto", f"--python_out={out}", f"--grpc_python_out={out}",
        f"{ROOT}/proto/nicagent/v1/nicagent.proto",
    ])
    if rc != 0:
        raise RuntimeError(f"protoc failed: {rc}")
    sys.path.insert(0, out)


generate_stubs()
import grpc  # noqa: E402
from nicagent.v1 import nicagent_pb2 as pb  # noqa: E402
from nicagent.v1 import nicagent_pb2_grpc as rpc  # noqa: E402


class Agent:
    """The agent on a random loopback port (plaintext TCP must be asked for
    with --insecure), or on a unix socket when `listen` says unix:PATH."""

    def __init__(self, *extra, listen=None):
        uri = f"test://{ROOT}/fixtures/lab-node.xml"
        listen_args = ["--listen", listen] if listen else ["--listen", "127.0.0.1:0", "--insecure"]
        self.proc = subprocess.Popen(
            [BIN, "serve", "--connect", uri, *listen_args, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.addr = None
        done = threading.Event()

        def read():
            for line in self.proc.stdout:
                if line.startswith("nic-agent listening on "):
                    self.addr = line.strip().split()[-1]
                    done.set()

        threading.Thread(target=read, daemon=True).start()
        if not done.wait(30):
            self.stop()
            raise RuntimeError("agent did not start")
        if listen:
            # gRPC C-core sends the socket path as the HTTP/2 :authority on
            # a unix socket; the agent's HTTP/2 stack (h2) refuses that as a
            # malformed authority. This one channel option fixes it.
            self.channel = grpc.insecure_channel(
                self.addr, options=[("grpc.default_authority", "localhost")])
        else:
            self.channel = grpc.insecure_channel(self.addr)
        self.stub = rpc.NicAgentStub(self.channel)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class PythonClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.agent = Agent()
        cls.stub = cls.agent.stub

    @classmethod
    def tearDownClass(cls):
        cls.agent.stop()

    def nics(self, vm):
        return list(self.stub.ListNics(pb.ListNicsRequest(vm=vm)).nics)

    def test_list_vms_shows_cloudstack_names(self):
        names = [v.name for v in self.stub.ListVms(pb.ListVmsRequest()).vms]
        self.assertIn("i-2-10-VM", names)
        self.assertIn("r-4-VM", names)

    def test_attach_then_idempotent_retry(self):
        spec = pb.NicSpec(mac="02:00:0a:00:20:01", bridge="cloudbr0", mtu=1450, alias="ua-py-1",
                          outbound=pb.Bandwidth(average_kbps=1000, peak_kbps=2000, burst_kb=64))
        r = self.stub.AttachNic(pb.AttachNicRequest(vm="i-2-10-VM", nic=spec, request_id="py-1"))
        self.assertFalse(r.already_present)
        self.assertEqual(r.nic.mac, "02:00:0a:00:20:01")
        self.assertEqual(r.nic.mtu, 1450)
        self.assertEqual(r.nic.alias, "ua-py-1")
        self.assertTrue(r.nic.HasField("outbound"))
        self.assertFalse(r.nic.HasField("inbound"))
        self.assertEqual((r.nic.outbound.average_kbps, r.nic.outbound.peak_kbps,
                          r.nic.outbound.burst_kb), (1000, 2000, 64))
        self.assertEqual(r.request_id, "py-1")
        again = self.stub.AttachNic(pb.AttachNicRequest(vm="i-2-10-VM", nic=spec))
        self.assertTrue(again.already_present)
        macs = [n.mac for n in self.nics("i-2-10-VM")]
        self.assertEqual(macs.count("02:00:0a:00:20:01"), 1)

    def test_cloudstack_broadcast_uri_on_ovs(self):
        spec = pb.NicSpec(mac="02:00:0a:00:20:02", bridge="br-ovs0",
                          switch_type=pb.SWITCH_TYPE_OPEN_VSWITCH, broadcast_uri="vlan://300")
        r = self.stub.AttachNic(pb.AttachNicRequest(vm="i-3-20-VM", nic=spec))
        self.assertEqual(r.nic.vlan, 300)

    def test_bad_vlan_is_invalid_argument_naming_field(self):
        before = self.nics("i-2-10-VM")
        spec = pb.NicSpec(mac="02:00:0a:00:20:03", bridge="br-ovs0",
                          switch_type=pb.SWITCH_TYPE_OPEN_VSWITCH, vlan=4096)
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.AttachNic(pb.AttachNicRequest(vm="i-2-10-VM", nic=spec))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("vlan", cm.exception.details())
        self.assertIn("4094", cm.exception.details())
        self.assertEqual(self.nics("i-2-10-VM"), before)

    def test_full_vm_is_resource_exhausted(self):
        cap = self.stub.GetPciCapacity(pb.GetPciCapacityRequest(vm="i-2-99-VM"))
        self.assertEqual(cap.free_slots, 0)
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.AttachNic(pb.AttachNicRequest(
                vm="i-2-99-VM", nic=pb.NicSpec(mac="02:00:0a:00:20:04", bridge="cloudbr0")))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)

    def test_unknown_vm_is_not_found(self):
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.ListNics(pb.ListNicsRequest(vm="no-such-vm"))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.NOT_FOUND)

    def test_plugnic_fields_round_trip_through_libvirt(self):
        # CloudStack's PlugNicCommand fields: what libvirt can hold is read
        # back from libvirt by ListNics; the rest is echoed as carried.
        nic_uuid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
        before = self.nics("i-2-10-VM")
        spec = pb.NicSpec(
            mac="02:00:0a:00:20:05", bridge="cloudbr0", pxe_disable=True, nic_uuid=nic_uuid,
            device_id=3, packed=True, default_nic=True, ipv4_cidr="10.1.1.5/24",
            ipv4_gateway="10.1.1.1", ipv6_cidr="2001:db8::5/64", ipv6_gateway="fe80::1",
            secondary_ips=["10.1.1.6", "2001:db8::6"], security_group_enabled=True,
            multicast_rate_mbps=10,
            mac_policy=pb.MacPolicy(mac_address_changes=False, forged_transmits=False,
                                    mac_learning=True))
        # Security groups ask for anti-spoofing, and the test driver has no
        # nwfilter driver: refused, naming the package, and nothing plugged.
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.AttachNic(pb.AttachNicRequest(vm="i-2-10-VM", nic=spec))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.FAILED_PRECONDITION)
        self.assertIn("libvirt-daemon-driver-nwfilter", cm.exception.details())
        self.assertEqual(self.nics("i-2-10-VM"), before)
        spec.security_group_enabled = False
        r = self.stub.AttachNic(pb.AttachNicRequest(vm="i-2-10-VM", nic=spec))
        self.assertFalse(r.already_present)
        listed = [n for n in self.nics("i-2-10-VM") if n.mac == "02:00:0a:00:20:05"]
        self.assertEqual(len(listed), 1)
        n = listed[0]
        self.assertEqual(n.nic_uuid, nic_uuid)
        self.assertEqual(n.alias, "ua-nic-" + nic_uuid)
        self.assertTrue(n.HasField("device_id"))
        self.assertEqual(n.device_id, 3)
        self.assertEqual(n.acpi_index, 4)
        self.assertTrue(n.pxe_disabled)
        self.assertTrue(n.packed)
        c = r.carried
        self.assertTrue(c.default_nic)
        self.assertFalse(c.security_group_enabled)
        self.assertEqual((c.ipv4_cidr, c.ipv4_gateway), ("10.1.1.5/24", "10.1.1.1"))
        self.assertEqual((c.ipv6_cidr, c.ipv6_gateway), ("2001:db8::5/64", "fe80::1"))
        self.assertEqual(list(c.secondary_ips), ["10.1.1.6", "2001:db8::6"])
        self.assertEqual(c.multicast_rate_mbps, 10)
        self.assertFalse(c.mac_policy.HasField("promiscuous_mode"))
        self.assertTrue(c.mac_policy.mac_learning)
        self.assertFalse(c.mac_policy.forged_transmits)
        # The same request again is an idempotent retry, not a conflict.
        again = self.stub.AttachNic(pb.AttachNicRequest(vm="i-2-10-VM", nic=spec))
        self.assertTrue(again.already_present)

    def test_pvlan_is_refused_naming_the_uri(self):
        before = self.nics("i-2-10-VM")
        spec = pb.NicSpec(mac="02:00:0a:00:20:06", bridge="cloudbr0",
                          broadcast_uri="pvlan://100-i200")
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.AttachNic(pb.AttachNicRequest(vm="i-2-10-VM", nic=spec))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("pvlan://100-i200", cm.exception.details())
        self.assertEqual(self.nics("i-2-10-VM"), before)

    def test_guest_config_returns_files_with_modes(self):
        r = self.stub.GuestConfig(pb.GuestConfigRequest(
            mac="52:54:00:ab:cd:01", name="eth1", table=100, ip6_mode="slaac",
            request_id="py-gc"))
        files = {f.path: f for f in r.files}
        kf = files["/etc/NetworkManager/system-connections/eth1.nmconnection"]
        self.assertEqual(kf.mode, 0o600)
        self.assertIn("mac-address=52:54:00:AB:CD:01", kf.content)
        self.assertIn("never-default=true", kf.content)
        ud = files["/usr/share/udhcpc/nic-agent-eth1.script"]
        self.assertEqual(ud.mode, 0o755)
        self.assertIn('ip rule add from "$1" lookup 100', ud.content)
        self.assertEqual(r.request_id, "py-gc")

    def test_guest_config_bad_ip6_is_invalid_argument_naming_field(self):
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.GuestConfig(pb.GuestConfigRequest(
                mac="52:54:00:ab:cd:01", ip6="2001:db8::5/129"))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("--ip6", cm.exception.details())
        self.assertIn("1-128", cm.exception.details())

    def test_replug_same_network_is_nothing_and_bad_vlan_names_the_field(self):
        spec = pb.NicSpec(mac="02:00:0a:00:20:07", bridge="cloudbr0")
        self.stub.AttachNic(pb.AttachNicRequest(vm="i-2-10-VM", nic=spec))
        before = self.nics("i-2-10-VM")
        r = self.stub.ReplugNic(pb.ReplugNicRequest(
            vm="i-2-10-VM", mac="02:00:0a:00:20:07", bridge="cloudbr0", request_id="py-rp"))
        self.assertEqual(r.way, pb.REPLUG_WAY_NOTHING)
        self.assertEqual((r.old_bridge, r.nic.bridge, r.request_id),
                         ("cloudbr0", "cloudbr0", "py-rp"))
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.ReplugNic(pb.ReplugNicRequest(
                vm="i-2-10-VM", mac="02:00:0a:00:20:07", bridge="br-ovs0",
                switch_type=pb.SWITCH_TYPE_OPEN_VSWITCH, vlan=5000))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("vlan", cm.exception.details())
        self.assertIn("1-4094", cm.exception.details())
        self.assertEqual(self.nics("i-2-10-VM"), before)

    def test_detach_on_test_driver_is_unimplemented(self):
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.DetachNic(pb.DetachNicRequest(vm="i-2-10-VM", mac="02:00:0a:00:00:01"))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.UNIMPLEMENTED)


def reflection_stream(channel, method_path):
    """One ServerReflectionInfo exchange asking for the service list.

    v1 and v1alpha have the same messages, field for field; only the
    package in the method path differs. grpcio-reflection ships the
    v1alpha messages, so they serialise the request for both versions.
    """
    from grpc_reflection.v1alpha import reflection_pb2 as refl

    call = channel.stream_stream(
        method_path,
        request_serializer=refl.ServerReflectionRequest.SerializeToString,
        response_deserializer=refl.ServerReflectionResponse.FromString)
    responses = list(call(iter([
        refl.ServerReflectionRequest(list_services=""),
        refl.ServerReflectionRequest(file_containing_symbol="nicagent.v1.NicAgent"),
    ]), timeout=10))
    return responses


class ReflectionTest(unittest.TestCase):
    """Server reflection in both versions: Python's grpcio-reflection,
    grpc_cli and older grpcurl speak only v1alpha."""

    @classmethod
    def setUpClass(cls):
        cls.agent = Agent()

    @classmethod
    def tearDownClass(cls):
        cls.agent.stop()

    def check(self, path):
        listed, files = reflection_stream(self.agent.channel, path)
        names = [s.name for s in listed.list_services_response.service]
        self.assertIn("nicagent.v1.NicAgent", names)
        self.assertIn("grpc.health.v1.Health", names)
        self.assertTrue(files.file_descriptor_response.file_descriptor_proto)

    def test_v1alpha_with_grpcio_reflections_own_client(self):
        from grpc_reflection.v1alpha import reflection_pb2 as refl
        from grpc_reflection.v1alpha import reflection_pb2_grpc as refl_rpc

        stub = refl_rpc.ServerReflectionStub(self.agent.channel)
        [r] = list(stub.ServerReflectionInfo(
            iter([refl.ServerReflectionRequest(list_services="")]), timeout=10))
        names = [s.name for s in r.list_services_response.service]
        self.assertIn("nicagent.v1.NicAgent", names)
        self.check("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")

    def test_v1(self):
        self.check("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")


class UnixSocketTest(unittest.TestCase):
    """Python on the agent's unix socket: C-core's default :authority is
    refused, grpc.default_authority = "localhost" works."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="nicagent-py-sock-")
        cls.sock = os.path.join(cls.dir, "agent.sock")
        cls.agent = Agent(listen=f"unix:{cls.sock}")

    @classmethod
    def tearDownClass(cls):
        cls.agent.stop()

    def test_with_default_authority_localhost_calls_work(self):
        names = [v.name for v in self.agent.stub.ListVms(pb.ListVmsRequest(), timeout=10).vms]
        self.assertIn("i-2-10-VM", names)
        listed, _ = reflection_stream(
            self.agent.channel, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        self.assertIn("nicagent.v1.NicAgent",
                      [s.name for s in listed.list_services_response.service])

    def test_without_the_option_the_socket_path_authority_is_refused(self):
        ch = grpc.insecure_channel(f"unix:{self.sock}")
        try:
            with self.assertRaises(grpc.RpcError) as cm:
                rpc.NicAgentStub(ch).ListVms(pb.ListVmsRequest(), timeout=10)
            err = cm.exception
            # h2 resets the stream with PROTOCOL_ERROR (HTTP/2 error code 1);
            # C-core reports it as INTERNAL "... RST_STREAM with error code 1".
            self.assertEqual(err.code(), grpc.StatusCode.INTERNAL, err)
            self.assertRegex(err.details(), r"RST_STREAM.*error code 1\b")
        finally:
            ch.close()


if __name__ == "__main__":
    if len(sys.argv) > 1:
        BIN = sys.argv.pop(1)
    result = unittest.main(exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors)
    print(f"python-grpcio: {result.testsRun - failed} passed, {failed} failed")
    sys.exit(1 if failed or result.testsRun == 0 else 0)
