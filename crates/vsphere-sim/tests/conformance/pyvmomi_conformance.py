#!/usr/bin/env python3
"""Conformance of the cbtvault vSphere simulator, driven by the official
VMware SDK (`pip install pyvmomi`) the way the VDDK guide's "Gathering
Changed Block Information" (seed 003) and sources-reference.md §1 use a
real host: SmartConnect, find the VM (SearchIndex), enable CBT
(ReconfigVM_Task), snapshot (CreateSnapshot_Task), read the snapshot's
changeIds from config.hardware.device, page QueryChangedDiskAreas until
startOffset + length == capacity, remove the snapshot, Disconnect.

pyVmomi deserializes every answer against its own vim25 type tables
(element names, xsi:type, namespaces, faults), so an answer that parses
here is shaped like a real host's. The expected extents come from the Rust
side (a JSON plan: the writes it made before, the writes this script makes
between the snapshots through the simulator's /sim/guest_write hook, and
the sector-aligned areas each query must return). One line per check; the
first mismatch prints what was expected and what came, and exits 1.

usage: pyvmomi_conformance.py HOST PORT CERT_PEM PLAN_JSON
       (user and password in $VSPHERE_USER / $VSPHERE_PASSWORD)
"""

import base64
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

CHECKS = 0


class Mismatch(Exception):
    pass


def check(what, got, expected):
    global CHECKS
    if got != expected:
        raise Mismatch("%s: expected %r, got %r" % (what, expected, got))
    CHECKS += 1
    print("ok   %s" % what)


def check_true(what, cond, detail=""):
    global CHECKS
    if not cond:
        raise Mismatch("%s: %s" % (what, detail or "condition false"))
    CHECKS += 1
    print("ok   %s" % what)


def expect_fault(what, fault_type, fn):
    global CHECKS
    try:
        fn()
    except fault_type as e:
        CHECKS += 1
        print("ok   %s (%s)" % (what, type(e).__name__))
        return e
    except Exception as e:  # noqa: BLE001 - report what came instead
        raise Mismatch("%s: expected %s, got %s: %s" % (what, fault_type.__name__, type(e).__name__, e))
    raise Mismatch("%s: expected %s, the call succeeded" % (what, fault_type.__name__))


def props(si, obj, paths):
    """RetrievePropertiesEx of `paths` on one object -> {path: value}."""
    pc = si.content.propertyCollector
    spec = vmodl.query.PropertyCollector.FilterSpec(
        objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=obj)],
        propSet=[vmodl.query.PropertyCollector.PropertySpec(type=type(obj), pathSet=paths)],
    )
    result = pc.RetrievePropertiesEx([spec], vmodl.query.PropertyCollector.RetrieveOptions())
    if result is None:
        return {}
    out = {}
    for oc in result.objects:
        for p in oc.propSet:
            out[p.name] = p.val
    return out


def wait(si, task):
    """Polls the task's info.state (no WaitForUpdatesEx in the simulator)."""
    for _ in range(600):
        state = props(si, task, ["info.state"])["info.state"]
        if state in (vim.TaskInfo.State.success, vim.TaskInfo.State.error):
            return props(si, task, ["info"])["info"]
        time.sleep(0.05)
    raise Mismatch("task %s did not end" % task._moId)


def changed_areas(vm, snapshot, key, capacity, change_id):
    """The VDDK loop: QueryChangedDiskAreas until startOffset+length == capacity."""
    extents, pages, start = [], 0, 0
    while start < capacity:
        info = vm.QueryChangedDiskAreas(snapshot=snapshot, deviceKey=key, startOffset=start, changeId=change_id)
        check_true("page %d starts where asked (%d)" % (pages, start), info.startOffset == start,
                   "startOffset %d" % info.startOffset)
        check_true("page %d makes progress" % pages, info.length > 0, "length %d" % info.length)
        for a in info.changedArea or []:
            check_true("extent %d+%d inside its page" % (a.start, a.length),
                       info.startOffset <= a.start and a.start + a.length <= info.startOffset + info.length)
            check_true("extent %d+%d sector-aligned" % (a.start, a.length),
                       a.start % 512 == 0 and a.length % 512 == 0)
            if extents and extents[-1][0] + extents[-1][1] == a.start:
                extents[-1] = (extents[-1][0], extents[-1][1] + a.length)
            else:
                extents.append((a.start, a.length))
        start = info.startOffset + info.length
        pages += 1
    check("the pages end at the capacity", start, capacity)
    return [list(e) for e in extents], pages


def disk_of(devices, key):
    for d in devices:
        if isinstance(d, vim.vm.device.VirtualDisk) and d.key == key:
            return d
    raise Mismatch("no VirtualDisk with key %d in %r" % (key, [type(d).__name__ for d in devices]))


def guest_write(host, port, ctx, auth, vm_id, key, offset, length, byte):
    url = "https://%s:%d/sim/guest_write?vm=%s&disk=%d&offset=%d" % (host, port, vm_id, key, offset)
    req = urllib.request.Request(url, data=bytes([byte]) * length, method="POST",
                                 headers={"Authorization": auth})
    with urllib.request.urlopen(req, context=ctx) as r:
        check("guest write %d+%d" % (offset, length), r.status, 200)


def main():
    host, port, cert, plan_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    user, pwd = os.environ["VSPHERE_USER"], os.environ["VSPHERE_PASSWORD"]
    plan = json.load(open(plan_path))
    ctx = ssl.create_default_context(cafile=cert)
    auth = "Basic " + base64.b64encode(("%s:%s" % (user, pwd)).encode()).decode()

    # A wrong password is InvalidLogin.
    expect_fault("SmartConnect with a wrong password", vim.fault.InvalidLogin,
                 lambda: SmartConnect(host=host, port=port, user=user, pwd="wrong", sslContext=ctx))

    si = SmartConnect(host=host, port=port, user=user, pwd=pwd, sslContext=ctx)
    content = si.RetrieveContent()
    check("about.apiType", content.about.apiType, "HostAgent")
    check("about.apiVersion", content.about.apiVersion, "8.0.3.0")
    check("rootFolder", content.rootFolder._moId, "ha-folder-root")

    search = content.searchIndex
    vm = search.FindByUuid(None, plan["instance_uuid"], True, True)
    check_true("FindByUuid (instance uuid) finds the VM", vm is not None)
    check("the VM found", (type(vm).__name__, vm._moId), ("vim.VirtualMachine", plan["vm"]))
    check("FindByUuid (BIOS uuid)", search.FindByUuid(None, plan["uuid"], True, False)._moId, plan["vm"])
    check("FindByUuid of an unknown uuid", search.FindByUuid(None, "00000000-0000-0000-0000-000000000000", True, True), None)
    check("FindByInventoryPath", search.FindByInventoryPath("ha-datacenter/vm/" + plan["name"])._moId, plan["vm"])
    check("vm.name (Fetch)", vm.name, plan["name"])

    # Listing VMs by traversal from the root folder.
    TS, SS = vmodl.query.PropertyCollector.TraversalSpec, vmodl.query.PropertyCollector.SelectionSpec
    to_vm_folder = TS(name="dcToVmFolder", type=vim.Datacenter, path="vmFolder", skip=False,
                      selectSet=[SS(name="folderChildren")])
    children = TS(name="folderChildren", type=vim.Folder, path="childEntity", skip=False,
                  selectSet=[SS(name="folderChildren"), SS(name="dcToVmFolder")])
    spec = vmodl.query.PropertyCollector.FilterSpec(
        objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=content.rootFolder, skip=True,
                                                             selectSet=[children, to_vm_folder])],
        propSet=[vmodl.query.PropertyCollector.PropertySpec(type=vim.VirtualMachine, pathSet=["name"])])
    listed = content.propertyCollector.RetrievePropertiesEx([spec], vmodl.query.PropertyCollector.RetrieveOptions(maxObjects=1))
    names = [p.val for oc in listed.objects for p in oc.propSet]
    token = listed.token
    while token:
        more = content.propertyCollector.ContinueRetrievePropertiesEx(token)
        names += [p.val for oc in more.objects for p in oc.propSet]
        token = more.token
    check("VMs listed by traversal (paged by maxObjects=1)", sorted(names), sorted(plan["all_vm_names"]))

    p = props(si, vm, ["config.changeTrackingEnabled", "capability.changeTrackingSupported",
                       "runtime.powerState", "config.instanceUuid", "config.uuid"])
    check("config.changeTrackingEnabled before", p["config.changeTrackingEnabled"], False)
    check("capability.changeTrackingSupported", p["capability.changeTrackingSupported"], True)
    check("runtime.powerState", p["runtime.powerState"], vim.VirtualMachine.PowerState.poweredOn)
    check("config.instanceUuid", p["config.instanceUuid"], plan["instance_uuid"])
    check("config.uuid", p["config.uuid"], plan["uuid"])
    config = props(si, vm, ["config"])["config"]
    check("config is a VirtualMachineConfigInfo", type(config).__name__, "vim.vm.ConfigInfo")
    check("config.name", config.name, plan["name"])
    disk = disk_of(config.hardware.device, plan["key"])
    check("live disk backing type", type(disk.backing).__name__, "vim.vm.device.VirtualDisk.FlatVer2BackingInfo")
    check("live disk capacityInBytes", disk.capacityInBytes, plan["capacity"])
    check("live disk capacityInKB", disk.capacityInKB, plan["capacity"] // 1024)
    check("live disk fileName", disk.backing.fileName, plan["file_name"])
    check("no changeId before CBT", disk.backing.changeId, None)
    check("no snapshot yet", props(si, vm, ["snapshot"]).get("snapshot"), None)

    # (a) Enable CBT.
    info = wait(si, vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    check("ReconfigVM_Task state", info.state, vim.TaskInfo.State.success)
    check("ReconfigVM_Task entity", info.entity._moId, plan["vm"])
    check("config.changeTrackingEnabled after", props(si, vm, ["config.changeTrackingEnabled"])["config.changeTrackingEnabled"], True)

    # (b) The backup snapshot.
    info = wait(si, vm.CreateSnapshot_Task(name="backup-1", description="cbt", memory=False, quiesce=True))
    check("CreateSnapshot_Task state", info.state, vim.TaskInfo.State.success)
    snap1 = info.result
    check("the task's result is a snapshot", type(snap1).__name__, "vim.vm.Snapshot")
    tree = props(si, vm, ["snapshot"])["snapshot"]
    check("snapshot.currentSnapshot", tree.currentSnapshot._moId, snap1._moId)
    check("snapshot tree", [(t.name, t.quiesced, t.state) for t in tree.rootSnapshotList],
          [("backup-1", True, vim.VirtualMachine.PowerState.poweredOff)])

    # (c) The changeId of the snapshot's disk.
    d1 = disk_of(props(si, snap1, ["config.hardware.device"])["config.hardware.device"], plan["key"])
    cid1 = d1.backing.changeId
    check_true("snapshot 1 changeId is <uuid>/<seq>", cid1 and "/" in cid1, repr(cid1))
    epoch1, seq1 = cid1.rsplit("/", 1)
    check_true("epoch in vSphere's form", len(epoch1) == 47 and epoch1[23] == "-", epoch1)

    # (d) A first full backup: the allocated areas ("*").
    extents, pages = changed_areas(vm, snap1, plan["key"], d1.capacityInBytes, "*")
    check("'*' = the areas written before snapshot 1", extents, plan["expect_allocated"])
    check_true("'*' took several pages", pages > 1, "%d page(s)" % pages)

    # The guest writes on; then the next backup.
    for w in plan["writes"]:
        guest_write(host, port, ctx, auth, plan["vm"], plan["key"], w[0], w[1], w[2])
    info = wait(si, vm.CreateSnapshot_Task(name="backup-2", description="cbt", memory=False, quiesce=False))
    snap2 = info.result
    d2 = disk_of(props(si, snap2, ["config.hardware.device"])["config.hardware.device"], plan["key"])
    cid2 = d2.backing.changeId
    epoch2, seq2 = cid2.rsplit("/", 1)
    check("same epoch after another snapshot", epoch2, epoch1)
    check("sequence moves on", int(seq2), int(seq1) + 1)
    extents, pages = changed_areas(vm, snap2, plan["key"], d2.capacityInBytes, cid1)
    check("changed areas since snapshot 1 = the guest writes", extents, plan["expect_changed"])
    check_true("the incremental query took several pages", pages > 1, "%d page(s)" % pages)
    extents, _ = changed_areas(vm, snap2, plan["key"], d2.capacityInBytes, cid2)
    check("nothing changed since snapshot 2 itself", extents, [])

    # Faults the VDDK guide and the WSDL name.
    expect_fault("QueryChangedDiskAreas: unknown device key", vmodl.fault.InvalidArgument,
                 lambda: vm.QueryChangedDiskAreas(snapshot=snap2, deviceKey=4242, startOffset=0, changeId=cid1))
    other = "52 00 00 00 00 00 00 00-00 00 00 00 00 00 00 00/1"
    e = expect_fault("QueryChangedDiskAreas: changeId of another epoch", vim.fault.FileFault,
                     lambda: vm.QueryChangedDiskAreas(snapshot=snap2, deviceKey=plan["key"], startOffset=0, changeId=other))
    check_true("FileFault names the file", plan["base_name"] in (e.file or ""), repr(e.file))
    gone = vim.vm.Snapshot("snapshot-99999", si._stub)
    expect_fault("QueryChangedDiskAreas: unknown snapshot", vmodl.fault.ManagedObjectNotFound,
                 lambda: vm.QueryChangedDiskAreas(snapshot=gone, deviceKey=plan["key"], startOffset=0, changeId=cid1))

    # The frozen base over /folder, with the session cookie pyVmomi holds.
    cookie = si._stub.cookie
    url = "https://%s:%d/folder/%s?dcPath=ha-datacenter&dsName=datastore1" % (host, port, plan["flat_path"])
    req = urllib.request.Request(url, headers={"Cookie": cookie, "Range": "bytes=0-4095"})
    with urllib.request.urlopen(req, context=ctx) as r:
        check("GET /folder with Range: 206", r.status, 206)
        check("Content-Range", r.headers["Content-Range"], "bytes 0-4095/%d" % plan["capacity"])
        check("the frozen base's first bytes", r.read(), bytes([plan["first_byte"]]) * 4096)

    # (e) Remove the snapshots.
    for s in (snap2, snap1):
        info = wait(si, s.RemoveSnapshot_Task(removeChildren=False, consolidate=True))
        check("RemoveSnapshot_Task %s" % s._moId, info.state, vim.TaskInfo.State.success)
    check("no snapshot left", props(si, vm, ["snapshot"]).get("snapshot"), None)
    expect_fault("a removed snapshot is gone", vmodl.fault.ManagedObjectNotFound,
                 lambda: props(si, snap1, ["config.hardware.device"]))

    # A task that fails carries its fault in info.error.
    req = urllib.request.Request(
        "https://%s:%d/sim/fault?kind=fail_task&method=CreateSnapshot_Task&fault=FileFault" % (host, port),
        data=b"", method="POST", headers={"Authorization": auth})
    urllib.request.urlopen(req, context=ctx).read()
    info = wait(si, vm.CreateSnapshot_Task(name="doomed", memory=False, quiesce=False))
    check("a failed task's state", info.state, vim.TaskInfo.State.error)
    check("its info.error", type(info.error).__name__, "vim.fault.FileFault")
    check("nothing was created", props(si, vm, ["snapshot"]).get("snapshot"), None)

    Disconnect(si)
    expect_fault("calls after Logout are NotAuthenticated", vim.fault.NotAuthenticated,
                 lambda: props(si, vm, ["name"]))
    print("conformance: all checks passed (%d)" % CHECKS)


if __name__ == "__main__":
    try:
        main()
    except Mismatch as e:
        print("FAIL %s" % e)
        sys.exit(1)
