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
    def __init__(self, *extra):
        uri = f"test://{ROOT}/fixtures/lab-node.xml"
        self.proc = subprocess.Popen(
            [BIN, "serve", "--connect", uri, "--listen", "127.0.0.1:0", "--insecure", *extra],
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

    def test_detach_on_test_driver_is_unimplemented(self):
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.DetachNic(pb.DetachNicRequest(vm="i-2-10-VM", mac="02:00:0a:00:00:01"))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.UNIMPLEMENTED)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        BIN = sys.argv.pop(1)
    result = unittest.main(exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors)
    print(f"python-grpcio: {result.testsRun - failed} passed, {failed} failed")
    sys.exit(1 if failed or result.testsRun == 0 else 0)
