#!/usr/bin/env python3
"""Conformance of the cbtvault XenServer simulator, driven by the official
Python binding (`pip install XenAPI`, which speaks XML-RPC) the way the
XenServer CBT guide (seed 002) and its samples use a real host.

Every answer is checked against ../shared/xenapi-reference.md: values and
their wire types, error codes and parameters, HTTP handlers, the JSON-RPC
envelopes, and an NBD read over TLS with the certificate from
VDI.get_nbd_info pinned. One line per check; the first mismatch prints
what was expected and what came, and exits 1.

The simulator-only hooks (sim.create_vm, sim.guest_write) stand in for the
VM that a real host would have (as do sim.add_disk, sim.add_cd, sim.suspend_vm,
sim.create_sr and sim.set_sr_physical_size for its disks, drives, power state,
SRs and their size): a real host answers MESSAGE_METHOD_UNKNOWN.

usage: xenapi_conformance.py URL [--user root]   (password in
       $XENAPI_CONFORMANCE_PASSWORD or --password)
"""

import argparse
import base64
import io
import json
import os
import re
import socket
import ssl
import struct
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request

import XenAPI

BLOCK = 64 * 1024
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


def failure(what, fn, code, params=None):
    """Calls fn; it must raise XenAPI.Failure [code, params...]."""
    try:
        got = fn()
    except XenAPI.Failure as e:
        details = list(e.details)
        if params is None:
            check(what, details[0], code)
        else:
            check(what, details, [code] + list(params))
        return details
    raise Mismatch("%s: expected failure %s, got success %r" % (what, code, got))


def bitmap_blocks(b64, size):
    """Blocks marked in a list_changed_blocks answer; checks its length."""
    data = base64.b64decode(b64, validate=True)
    blocks = (size + BLOCK - 1) // BLOCK
    if len(data) != (blocks + 7) // 8:
        raise Mismatch("bitmap of %d bytes for %d blocks" % (len(data), blocks))
    marked = [i for i in range(len(data) * 8) if data[i // 8] & (0x80 >> (i % 8))]
    if any(i >= blocks for i in marked):
        raise Mismatch("padding bits set in the bitmap: %r" % marked)
    return marked


def blocks_of(offset, length):
    return list(range(offset // BLOCK, (offset + length - 1) // BLOCK + 1))


def pattern(seed, length):
    out = bytearray()
    i = 0
    while len(out) < length:
        out += ("%d:%d|" % (seed, i)).encode()
        i += 1
    return bytes(out[:length])


class Host:
    def __init__(self, url, user, password):
        self.url = url.rstrip("/") + "/"
        self.user = user
        self.password = password
        self.session = XenAPI.Session(self.url, ignore_ssl=True)
        self.session.xenapi.login_with_password(user, password, "1.0", "cbtvault-conformance")
        self.x = self.session.xenapi
        self.ref = self.session._session
        self.ssl = ssl._create_unverified_context()

    def http(self, method, path, query, body=None, context=None, headers=None):
        q = dict(query)
        q.setdefault("session_id", self.ref)
        url = self.url.rstrip("/") + path + "?" + urllib.parse.urlencode(q)
        req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, context=context or self.ssl) as r:
                return r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict((k.lower(), v) for k, v in e.headers.items()), e.read()

    def jsonrpc(self, payload):
        req = urllib.request.Request(
            self.url + "jsonrpc",
            data=json.dumps(payload).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, context=self.ssl) as r:
            check("JSON-RPC content-type", r.headers.get("content-type"), "application/json")
            return json.loads(r.read())

    def write(self, vdi, offset, data):
        self.x.sim.guest_write(vdi, str(offset), base64.b64encode(data).decode())

    def export(self, vdi_uuid, context=None):
        status, headers, body = self.http(
            "GET", "/export_raw_vdi", {"vdi": vdi_uuid, "format": "raw"}, context=context
        )
        check("export_raw_vdi status", status, 200)
        check_true("export_raw_vdi task-id header", headers.get("task-id", "").startswith("OpaqueRef:"))
        return body


# ---------------------------------------------------------------- NBD client

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
OPT_EXPORT_NAME, OPT_STARTTLS, OPT_GO = 1, 5, 7
REP_ACK, REP_ERR_UNSUP = 1, 2 ** 31 + 1


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise Mismatch("NBD server closed the connection after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return buf


def nbd_option(sock, option, data=b""):
    sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)
    magic, opt, reply, length = struct.unpack(">QIII", recv_exact(sock, 20))
    check("NBD option reply magic", magic, REPLY_MAGIC)
    check("NBD option reply names the option", opt, option)
    payload = recv_exact(sock, length)
    return reply, payload


def nbd_open(info):
    """fixed-newstyle, STARTTLS with the returned cert pinned and its
    subject verified, GO refused, EXPORT_NAME; returns (tls socket, size)."""
    raw = socket.create_connection((info["address"], int(info["port"])), timeout=20)
    magic, opt_magic, flags = struct.unpack(">QQH", recv_exact(raw, 18))
    check("NBD greeting magic", (magic, opt_magic), (NBDMAGIC, IHAVEOPT))
    check("NBD global flags: FIXED_NEWSTYLE only (no NO_ZEROES)", flags, 1)
    raw.sendall(struct.pack(">I", 1))
    reply, _ = nbd_option(raw, OPT_STARTTLS)
    check("NBD STARTTLS acknowledged", reply, REP_ACK)
    ctx = ssl.create_default_context(cadata=info["cert"])
    ctx.check_hostname = True
    tls = ctx.wrap_socket(raw, server_hostname=info["subject"])
    reply, _ = nbd_option(tls, OPT_GO, struct.pack(">I", 0) + struct.pack(">H", 0))
    check("NBD_OPT_GO answered NBD_REP_ERR_UNSUP (xapi-nbd)", reply, REP_ERR_UNSUP)
    name = info["exportname"].encode()
    tls.sendall(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, len(name)) + name)
    reply = recv_exact(tls, 134)
    size, tflags = struct.unpack(">QH", reply[:10])
    check("NBD export flags HAS_FLAGS|READ_ONLY", tflags, 3)
    check("NBD export reply ends with 124 zero bytes", reply[10:], b"\0" * 124)
    return tls, size


def nbd_read(sock, offset, length, handle=1):
    sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, handle, offset, length))
    magic, error, got_handle = struct.unpack(">IIQ", recv_exact(sock, 16))
    check("NBD simple reply magic", magic, 0x67446698)
    check("NBD reply handle", got_handle, handle)
    if error:
        return error, b""
    return 0, recv_exact(sock, length)


def nbd_close(sock):
    sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 99, 0, 0))
    sock.close()


# ------------------------------------------------------------- the procedure


def run(h):
    x = h.x
    size = 4 * 1024 * 1024 + 12345  # 65 blocks, the last partial
    nblocks = (size + BLOCK - 1) // BLOCK
    unrelated = [
        "SR_BACKEND_FAILURE_460",
        "",
        "Failed to calculate changed blocks for given VDIs. [opterr=Source and target VDI are unrelated]",
        "",
    ]

    check_true("login returns an OpaqueRef session", h.ref.startswith("OpaqueRef:"), h.ref)
    bad = XenAPI.Session(h.url, ignore_ssl=True)
    failure(
        "wrong password -> SESSION_AUTHENTICATION_FAILED",
        lambda: bad.xenapi.login_with_password(h.user, h.password + "x", "1.0", "t"),
        "SESSION_AUTHENTICATION_FAILED",
        [],
    )

    vm = x.sim.create_vm("conformance-vm", [str(size)])
    vdi = x.VBD.get_VDI(x.VM.get_VBDs(vm)[0])
    uuid = x.VDI.get_uuid(vdi)
    check("VDI.get_by_uuid(get_uuid(vdi)) == vdi", x.VDI.get_by_uuid(uuid), vdi)
    failure("unknown uuid -> UUID_INVALID", lambda: x.VDI.get_by_uuid("no-such-uuid"), "UUID_INVALID", ["VDI", "no-such-uuid"])
    failure("dead ref -> HANDLE_INVALID", lambda: x.VDI.get_type("OpaqueRef:dead"), "HANDLE_INVALID", ["VDI", "OpaqueRef:dead"])
    failure("unknown call -> MESSAGE_METHOD_UNKNOWN", lambda: x.VDI.frobnicate(vdi), "MESSAGE_METHOD_UNKNOWN", ["VDI.frobnicate"])
    check("virtual_size is a decimal string on XML-RPC", x.VDI.get_virtual_size(vdi), str(size))
    check("new VDI: cbt_enabled false", x.VDI.get_cbt_enabled(vdi), False)
    rec = x.VDI.get_record(vdi)
    check("record: type user", rec["type"], "user")
    check("record: on_boot persist", rec["on_boot"], "persist")
    check("record: is_a_snapshot false", rec["is_a_snapshot"], False)
    check("record: snapshot_of null", rec["snapshot_of"], "OpaqueRef:NULL")
    check("record: snapshot_time is the epoch datetime", str(rec["snapshot_time"]), "19700101T00:00:00Z")

    # Seed step 2: the VM metadata, without snapshot history.
    status, headers, xva = h.http("GET", "/export_metadata", {"uuid": x.VM.get_uuid(vm), "export_snapshots": "false"})
    check("export_metadata status", status, 200)
    check("export_metadata content-disposition", headers.get("content-disposition"), 'attachment; filename="export.xva"')
    check("export_metadata: a tar holding only ova.xml", tarfile.open(fileobj=io.BytesIO(xva)).getnames(), ["ova.xml"])

    # Guest data before CBT and the base.
    first = pattern(1, 3 * BLOCK)
    h.write(vdi, 0, first)

    check("enable_cbt returns void ('')", x.VDI.enable_cbt(vdi), "")
    check("enable_cbt again is a no-op", x.VDI.enable_cbt(vdi), "")
    check("get_cbt_enabled after enable", x.VDI.get_cbt_enabled(vdi), True)

    base = x.VDI.snapshot(vdi)
    check("snapshot: is_a_snapshot", x.VDI.get_is_a_snapshot(base), True)
    check("snapshot: snapshot_of the VDI", x.VDI.get_snapshot_of(base), vdi)
    check("snapshot inherits cbt_enabled", x.VDI.get_cbt_enabled(base), True)
    check_true(
        "snapshot_time in YYYYMMDDTHH:MM:SSZ form",
        re.match(r"^\d{8}T\d\d:\d\d:\d\dZ$", str(x.VDI.get_snapshot_time(base))),
        str(x.VDI.get_snapshot_time(base)),
    )
    failure("enable_cbt on a snapshot -> OPERATION_NOT_ALLOWED", lambda: x.VDI.enable_cbt(base),
            "OPERATION_NOT_ALLOWED", ["VDI is a snapshot: %s" % base])
    base_uuid = x.VDI.get_uuid(base)
    exported = h.export(base_uuid)
    check("export_raw_vdi of the base: size", len(exported), size)
    check("export_raw_vdi of the base: the guest data", exported[: len(first)], first)

    s1 = x.VDI.snapshot(vdi)
    check("list_changed_blocks with no writes: nothing marked", bitmap_blocks(x.VDI.list_changed_blocks(base, s1), size), [])

    writes = [(BLOCK - 10, 20), (10 * BLOCK, 3 * BLOCK), (size - 1, 1), (40 * BLOCK + 7, 1)]
    expected = []
    for i, (off, length) in enumerate(writes):
        h.write(vdi, off, pattern(100 + i, length))
        expected += blocks_of(off, length)
    expected = sorted(set(expected))
    s2 = x.VDI.snapshot(vdi)
    marked = bitmap_blocks(x.VDI.list_changed_blocks(s1, s2), size)
    check("list_changed_blocks(s1, s2) marks exactly the written blocks", marked, expected)
    check("list_changed_blocks(base, s2) the same (nothing between base and s1)",
          bitmap_blocks(x.VDI.list_changed_blocks(base, s2), size), expected)
    check("bitmap length ceil(ceil(size/64K)/8)", len(base64.b64decode(x.VDI.list_changed_blocks(s1, s2))), (nblocks + 7) // 8)
    failure("wrong order -> SR_BACKEND_FAILURE_460 unrelated", lambda: x.VDI.list_changed_blocks(s2, s1), unrelated[0], unrelated[1:])
    failure("same VDI twice -> SR_BACKEND_FAILURE_460 same", lambda: x.VDI.list_changed_blocks(s2, s2),
            "SR_BACKEND_FAILURE_460",
            ["", "Failed to calculate changed blocks for given VDIs. [opterr=Source and target VDI are same]", ""])

    # get_nbd_info and an NBD read with the returned cert pinned.
    infos = x.VDI.get_nbd_info(s2)
    check("get_nbd_info: one record per NBD address", len(infos), 1)
    info = infos[0]
    check("get_nbd_info: fields", sorted(info.keys()), ["address", "cert", "exportname", "port", "subject"])
    s2_uuid = x.VDI.get_uuid(s2)
    check("get_nbd_info: exportname /<uuid>?session_id=<session>", info["exportname"], "/%s?session_id=%s" % (s2_uuid, h.ref))
    check_true("get_nbd_info: port is an int (a decimal string on XML-RPC)", re.match(r"^\d+$", str(info["port"])), info["port"])
    check_true("get_nbd_info: cert is PEM", info["cert"].startswith("-----BEGIN CERTIFICATE-----"))
    host, port = urllib.parse.urlparse(h.url).hostname, urllib.parse.urlparse(h.url).port
    served = ssl.get_server_certificate((host, port))
    check("get_nbd_info: cert is the host's HTTPS certificate",
          ssl.PEM_cert_to_DER_cert(served), ssl.PEM_cert_to_DER_cert(info["cert"]))
    pinned = ssl.create_default_context(cadata=info["cert"])
    s2_export = h.export(s2_uuid, context=pinned)
    sock, nbd_size = nbd_open(info)
    check("NBD export size == virtual_size", nbd_size, size)
    data = b""
    handle = 10
    aligned = size - size % 512
    for off in range(0, aligned, 1024 * 1024):
        n = min(1024 * 1024, aligned - off)
        err, chunk = nbd_read(sock, off, n, handle)
        handle += 1
        if err:
            raise Mismatch("NBD read at %d failed with errno %d" % (off, err))
        data += chunk
    check("NBD read == /export_raw_vdi (512-aligned part)", data, s2_export[:aligned])
    err, _ = nbd_read(sock, 1, 512, 7)
    check("NBD unaligned read -> EINVAL", err, 22)
    failure("list_changed_blocks while vdi_to is open over NBD -> VDI_IN_USE",
            lambda: x.VDI.list_changed_blocks(s1, s2), "VDI_IN_USE", [s2, "list_changed_blocks"])
    nbd_close(sock)
    deadline = time.time() + 10
    while True:
        try:
            x.VDI.list_changed_blocks(s1, s2)
            break
        except XenAPI.Failure as e:
            if e.details[0] != "VDI_IN_USE" or time.time() > deadline:
                raise
            time.sleep(0.05)
    check_true("list_changed_blocks works again after NBD_CMD_DISC", True)

    # data_destroy: cbt_metadata, idempotent, still a valid vdi_from.
    failure("data_destroy on a non-snapshot -> OPERATION_NOT_ALLOWED", lambda: x.VDI.data_destroy(vdi),
            "OPERATION_NOT_ALLOWED", ["VDI is not a snapshot: %s" % vdi])
    check("data_destroy returns void", x.VDI.data_destroy(base), "")
    check("data_destroy -> get_type cbt_metadata", x.VDI.get_type(base), "cbt_metadata")
    check("data_destroy again is a no-op (seed spelling vdi.data_destroy)", h.x.vdi.data_destroy(base), "")
    check("cbt_metadata keeps cbt_enabled", x.VDI.get_cbt_enabled(base), True)
    failure("get_nbd_info on cbt_metadata -> VDI_INCOMPATIBLE_TYPE", lambda: x.VDI.get_nbd_info(base),
            "VDI_INCOMPATIBLE_TYPE", [base, "cbt_metadata"])
    status, _, _ = h.http("GET", "/export_raw_vdi", {"vdi": base_uuid})
    check_true("export_raw_vdi of a cbt_metadata VDI fails", status >= 400, status)
    check("list_changed_blocks from the metadata snapshot", bitmap_blocks(x.VDI.list_changed_blocks(base, s2), size), expected)

    # Destroying the middle snapshot keeps the chain.
    more = (30 * BLOCK, 100)
    h.write(vdi, more[0], pattern(7, more[1]))
    s3 = x.VDI.snapshot(vdi)
    check("VDI.destroy of the middle snapshot", x.VDI.destroy(s2), "")
    check("list_changed_blocks across the destroyed snapshot", bitmap_blocks(x.VDI.list_changed_blocks(s1, s3), size),
          sorted(set(expected + blocks_of(*more))))
    failure("destroyed snapshot -> HANDLE_INVALID", lambda: x.VDI.get_uuid(s2), "HANDLE_INVALID", ["VDI", s2])

    # VM.snapshot, then data_destroy needs the snapshot VM gone.
    snap_vm = x.VM.snapshot(vm, "conformance backup")
    check("VM.snapshot: is_a_snapshot", x.VM.get_is_a_snapshot(snap_vm), True)
    snap_vdi = x.VBD.get_VDI(x.VM.get_VBDs(snap_vm)[0])
    check("VM.snapshot: disk snapshot_of the VDI", x.VDI.get_snapshot_of(snap_vdi), vdi)
    check("VM.snapshot: disk inherits cbt_enabled", x.VDI.get_cbt_enabled(snap_vdi), True)
    failure("data_destroy with the snapshot VM's VBD -> VDI_IN_USE", lambda: x.VDI.data_destroy(snap_vdi),
            "VDI_IN_USE", [snap_vdi, "data_destroy"])
    check("VM.destroy of the snapshot VM", x.VM.destroy(snap_vm), "")
    check("VM.destroy keeps the VDI", x.VDI.get_VBDs(snap_vdi), [])
    check("data_destroy after VM.destroy", x.VDI.data_destroy(snap_vdi), "")

    # disable_cbt breaks the chain, also after re-enabling.
    check("disable_cbt returns void", x.VDI.disable_cbt(vdi), "")
    check("disable_cbt again is a no-op", x.VDI.disable_cbt(vdi), "")
    plain = x.VDI.snapshot(vdi)
    check("snapshot of a non-CBT VDI: cbt_enabled false", x.VDI.get_cbt_enabled(plain), False)
    failure("data_destroy without CBT -> VDI_NO_CBT_METADATA", lambda: x.VDI.data_destroy(plain), "VDI_NO_CBT_METADATA", [plain])
    x.VDI.enable_cbt(vdi)
    s4 = x.VDI.snapshot(vdi)
    failure("after disable_cbt: list_changed_blocks(old, new) unrelated", lambda: x.VDI.list_changed_blocks(s3, s4),
            unrelated[0], unrelated[1:])

    # Restore (seed 002): VDI.create from a record, import_raw_vdi under a task.
    sr = x.VDI.get_SR(vdi)
    new = x.VDI.create({"SR": sr, "virtual_size": str(size), "type": "user", "sharable": False,
                        "read_only": False, "other_config": {}, "name_label": "restored"})
    check("VDI.create: cbt_enabled false", x.VDI.get_cbt_enabled(new), False)
    new_uuid = x.VDI.get_uuid(new)
    task = x.task.create("import_vdi", "conformance import")
    status, headers, _ = h.http("PUT", "/import_raw_vdi", {"vdi": new_uuid, "format": "raw", "task_id": task},
                                body=s2_export, headers={"Content-Length": str(len(s2_export))})
    check("import_raw_vdi status", status, 200)
    check("import_raw_vdi task-id is the caller's task", headers.get("task-id"), task)
    deadline = time.time() + 10
    while x.task.get_status(task) == "pending" and time.time() < deadline:
        time.sleep(0.05)
    check("import task: success", x.task.get_status(task), "success")
    check_true("import task result holds the VDI ref", new in x.task.get_result(task), x.task.get_result(task))
    check("import then export round-trips", h.export(new_uuid), s2_export)
    # Seed restore step 2: a new VM from the metadata, its disk remapped.
    task = x.task.create("import_vm", "Task to track vm import")
    status, headers, _ = h.http("PUT", "/import_metadata", {"task_id": task, "vdi:%s" % uuid: new_uuid},
                                body=xva, headers={"Content-Length": str(len(xva))})
    check("import_metadata status", status, 200)
    check("import_metadata task-id", headers.get("task-id"), task)
    deadline = time.time() + 10
    while x.task.get_status(task) == "pending" and time.time() < deadline:
        time.sleep(0.05)
    check("import_metadata task: success", x.task.get_status(task), "success")
    vms = re.findall(r"OpaqueRef:[0-9a-f-]+", x.task.get_result(task))
    check("import_metadata result: one VM ref", len(vms), 1)
    check("imported VM keeps the name", x.VM.get_name_label(vms[0]), "conformance-vm")
    check("imported VM's disk is the remapped VDI", [x.VBD.get_VDI(b) for b in x.VM.get_VBDs(vms[0])], [new])

    status, _, _ = h.http("PUT", "/import_raw_vdi", {"vdi": new_uuid}, body=b"x", headers={"Transfer-Encoding": "chunked"})
    check("import_raw_vdi with HTTP chunked encoding -> 404", status, 404)
    status, _, _ = h.http("GET", "/export_raw_vdi", {"vdi": new_uuid, "session_id": "OpaqueRef:bogus"})
    check("export_raw_vdi with a bad session -> 401", status, 401)

    # JSON-RPC envelopes (same session as XML-RPC).
    v2 = h.jsonrpc({"jsonrpc": "2.0", "method": "VDI.get_by_uuid", "params": [h.ref, "nope"], "id": 1})
    check("JSON-RPC v2 error shape", v2, {"jsonrpc": "2.0", "error": {"code": 1, "message": "UUID_INVALID", "data": ["VDI", "nope"]}, "id": 1})
    v2 = h.jsonrpc({"jsonrpc": "2.0", "method": "VDI.get_virtual_size", "params": [h.ref, vdi], "id": "x"})
    check("JSON-RPC v2 result: ints are numbers", v2, {"jsonrpc": "2.0", "result": size, "id": "x"})
    v1 = h.jsonrpc({"method": "VDI.get_by_uuid", "params": [h.ref, "nope"], "id": 2})
    check("JSON-RPC v1 error shape", v1, {"result": None, "error": ["UUID_INVALID", "VDI", "nope"], "id": 2})

    # enable_cbt refusals (reference §2.3) and VM.snapshot's ignore_vdis
    # (§2.4), on disks the sim.add_disk hook plugs.
    cvm = x.sim.create_vm("cbt-refusals", [str(BLOCK)])
    lun = x.sim.add_disk(cvm, "lun", str(BLOCK), "sr_without_cbt")
    failure("enable_cbt on an SR without VDI_CONFIG_CBT -> SR_OPERATION_NOT_SUPPORTED [sr]",
            lambda: x.VDI.enable_cbt(lun), "SR_OPERATION_NOT_SUPPORTED", [x.VDI.get_SR(lun)])
    raw = x.sim.add_disk(cvm, "raw", str(BLOCK), "raw")
    failure("enable_cbt on a RAW VDI -> SR_BACKEND_FAILURE_66", lambda: x.VDI.enable_cbt(raw),
            "SR_BACKEND_FAILURE_66", ["", "Invalid VDI type [opterr=Raw VDI or snapshot not permitted]", ""])
    plain = [v for v in (x.VBD.get_VDI(b) for b in x.VM.get_VBDs(cvm)) if v not in (lun, raw)][0]
    x.sim.set_fault("cbt_unlicensed", True)
    failure("enable_cbt without the CBT licence -> LICENCE_RESTRICTION [CBT]",
            lambda: x.VDI.enable_cbt(plain), "LICENCE_RESTRICTION", ["CBT"])
    x.sim.set_fault("cbt_unlicensed", False)
    check("enable_cbt once licensed", x.VDI.enable_cbt(plain), "")
    eph = x.sim.add_disk(cvm, "scratch", str(BLOCK), "ephemeral")
    check("an ephemeral disk has type ephemeral", x.VDI.get_type(eph), "ephemeral")
    snap_vm = x.VM.snapshot(cvm, "with ignore_vdis", [eph])
    snapped = sorted(x.VDI.get_snapshot_of(x.VBD.get_VDI(b)) for b in x.VM.get_VBDs(snap_vm))
    check("VM.snapshot(ignore_vdis) snapshots every other disk only", snapped, sorted([plain, lun, raw]))

    # VDI.resize (SM FileSR.resize; the CBT log grows, reference §2.5).
    mib = 1024 * 1024
    rvm = x.sim.create_vm("resize-vm", [str(mib)])
    rvdi = x.VBD.get_VDI(x.VM.get_VBDs(rvm)[0])
    x.VDI.enable_cbt(rvdi)
    r0 = x.VDI.snapshot(rvdi)
    check("VDI.resize returns void", x.VDI.resize(rvdi, str(3 * mib)), "")
    check("VDI.resize: virtual_size grows", x.VDI.get_virtual_size(rvdi), str(3 * mib))
    check("VDI.resize: a snapshot from before keeps its size", x.VDI.get_virtual_size(r0), str(mib))
    h.write(rvdi, 40 * BLOCK, b"grown")
    r1 = x.VDI.snapshot(rvdi)
    check("list_changed_blocks across a resize: the larger size, zeros but the write",
          bitmap_blocks(x.VDI.list_changed_blocks(r0, r1), 3 * mib), [40])
    failure("VDI.resize smaller -> SR_BACKEND_FAILURE_79 (SM VDISize)", lambda: x.VDI.resize(rvdi, str(mib)),
            "SR_BACKEND_FAILURE_79", ["", "VDI Invalid size [opterr=shrinking not allowed]", ""])
    failure("VDI.resize_online -> SR_OPERATION_NOT_SUPPORTED (no SM driver has it)",
            lambda: x.VDI.resize_online(rvdi, str(4 * mib)), "SR_OPERATION_NOT_SUPPORTED", [x.VDI.get_SR(rvdi)])

    # VDI.clone / VDI.copy: cbt_enabled false (reference §2.4).
    cl = x.VDI.clone(rvdi)
    check("VDI.clone of a CBT VDI: cbt_enabled false", x.VDI.get_cbt_enabled(cl), False)
    check("VDI.clone: not a snapshot", x.VDI.get_is_a_snapshot(cl), False)
    check_true("VDI.clone: a new uuid", x.VDI.get_uuid(cl) != x.VDI.get_uuid(rvdi))
    sr2 = x.sim.create_sr("second SR", "nfs")
    cp = x.VDI.copy(rvdi, sr2)
    check("VDI.copy(vdi, sr): on that SR", x.VDI.get_SR(cp), sr2)
    check("VDI.copy: cbt_enabled false", x.VDI.get_cbt_enabled(cp), False)
    check("VDI.copy: the same content", h.export(x.VDI.get_uuid(cp)), h.export(x.VDI.get_uuid(rvdi)))

    # VDI.pool_migrate: refused with CBT on (§5 rule 5), else a new VDI.
    failure("VDI.pool_migrate with CBT on -> VDI_CBT_ENABLED [vdi]", lambda: x.VDI.pool_migrate(rvdi, sr2, {}),
            "VDI_CBT_ENABLED", [rvdi])
    x.VDI.disable_cbt(rvdi)
    old_uuid = x.VDI.get_uuid(rvdi)
    moved = x.VDI.pool_migrate(rvdi, sr2, {})
    check("VDI.pool_migrate: on the new SR", x.VDI.get_SR(moved), sr2)
    check_true("VDI.pool_migrate: a new uuid", x.VDI.get_uuid(moved) != old_uuid)
    failure("VDI.pool_migrate: the old VDI is gone", lambda: x.VDI.get_by_uuid(old_uuid), "UUID_INVALID", ["VDI", old_uuid])
    check("VDI.pool_migrate: the VM's VBD points at the new VDI", x.VBD.get_VDI(x.VM.get_VBDs(rvm)[0]), moved)

    # CD drives (sim.add_cd stands in for a VM's install media).
    empty_cd = x.sim.add_cd(rvm, "")
    iso_cd = x.sim.add_cd(rvm, "tools.iso")
    ecd = x.VBD.get_record(empty_cd)
    check("empty CD drive: type, empty, mode, VDI", (ecd["type"], ecd["empty"], ecd["mode"], ecd["VDI"]),
          ("CD", True, "RO", "OpaqueRef:NULL"))
    icd = x.VBD.get_record(iso_cd)
    check("CD drive with an ISO: type, empty, mode", (icd["type"], icd["empty"], icd["mode"]), ("CD", False, "RO"))
    iso_sr = x.VDI.get_SR(icd["VDI"])
    check("the ISO's SR: type and content_type iso", (x.SR.get_type(iso_sr), x.SR.get_content_type(iso_sr)),
          ("iso", "iso"))
    csnap = x.VM.snapshot(rvm, "with CDs")
    cds = sorted(r["VDI"] for r in (x.VBD.get_record(b) for b in x.VM.get_VBDs(csnap)) if r["type"] == "CD")
    check("VM.snapshot copies the CD drives as they are", cds, sorted(["OpaqueRef:NULL", icd["VDI"]]))
    check("VM.snapshot does not snapshot the ISO", x.VDI.get_snapshots(icd["VDI"]), [])
    failure("VBD.create of a read-write CD -> VBD_CDS_MUST_BE_READONLY", lambda: x.VBD.create({
        "VM": rvm, "VDI": icd["VDI"], "userdevice": "7", "bootable": False, "mode": "RW", "type": "CD",
        "unpluggable": True, "empty": False, "other_config": {}, "qos_algorithm_type": "",
        "qos_algorithm_params": {}}), "VBD_CDS_MUST_BE_READONLY", [])

    # A suspended VM (sim.suspend_vm) and its snapshot.
    image = x.sim.suspend_vm(rvm)
    check("suspended VM: power_state", x.VM.get_power_state(rvm), "Suspended")
    check("suspended VM: suspend_VDI", x.VM.get_suspend_VDI(rvm), image)
    check("suspend VDI: type suspend, no VBD", (x.VDI.get_type(image), x.VDI.get_VBDs(image)), ("suspend", []))
    ssnap = x.VM.snapshot(rvm, "of a suspended VM")
    check("VM.snapshot of a suspended VM: Halted, no suspend_VDI",
          (x.VM.get_power_state(ssnap), x.VM.get_suspend_VDI(ssnap)), ("Halted", "OpaqueRef:NULL"))

    # SR capacity: the fields, and SR_FULL [requested; maximum].
    srrec = x.SR.get_record(sr2)
    for field in ("physical_size", "physical_utilisation", "virtual_allocation"):
        check_true("SR record: %s is an int (a decimal string)" % field, re.match(r"^\d+$", srrec[field]), srrec[field])
    used = int(srrec["physical_utilisation"])
    check_true("SR physical_utilisation follows the data written", used > 0, used)
    x.sim.set_sr_physical_size(sr2, str(used + BLOCK))
    failure("VDI.create beyond the SR's size -> SR_FULL [requested; maximum]", lambda: x.VDI.create({
        "SR": sr2, "virtual_size": str(mib), "type": "user", "sharable": False, "read_only": False,
        "other_config": {}}), "SR_FULL", [str(used + mib), str(used + BLOCK)])
    x.sim.set_sr_physical_size(sr2, "")

    # An import into a disk a running VM has attached read-write.
    bvm = x.sim.create_vm("busy-vm", [str(BLOCK)])
    bvdi = x.VBD.get_VDI(x.VM.get_VBDs(bvm)[0])
    x.VM.start(bvm, False, False)
    task = x.task.create("import", "into a disk in use")
    status, _, _ = h.http("PUT", "/import_raw_vdi", {"vdi": x.VDI.get_uuid(bvdi), "task_id": task}, body=b"data",
                          headers={"Content-Length": "4"})
    check("import_raw_vdi into a running VM's disk: refused", status, 500)
    check("... its task fails with VDI_IN_USE [vdi]", x.task.get_error_info(task), ["VDI_IN_USE", bvdi])
    x.VM.hard_shutdown(bvm)

    # SESSION_INVALID after logout (through the raw proxy: the binding
    # itself re-logs-in on SESSION_INVALID).
    old = h.ref
    h.session.xenapi.session.logout()
    raw = getattr(h.session, "VDI.get_all")(old)
    check("after logout -> SESSION_INVALID [session]", raw, {"Status": "Failure", "ErrorDescription": ["SESSION_INVALID", old]})


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def run_pool(h, member_url):
    """A pool of two hosts (reference §1.4, §2.6, §3.1): the member refuses
    logins naming the master, get_nbd_info lists both hosts for a shared
    SR, and the master redirects an export of a disk only the member sees."""
    x = h.x
    pool = x.pool.get_all()[0]
    master = x.pool.get_master(pool)
    hosts = x.host.get_all()
    check("pool: two hosts", len(hosts), 2)
    member = [r for r in hosts if r != master][0]
    member_address = x.host.get_address(member)
    check_true("pool: member address", member_address != x.host.get_address(master))
    s = XenAPI.Session(member_url, ignore_ssl=True)
    failure(
        "pool: login on the member",
        lambda: s.xenapi.login_with_password(h.user, h.password, "1.0", "conformance"),
        "HOST_IS_SLAVE",
        [x.host.get_address(master)],
    )
    check_true(
        "pool: each host its own certificate",
        x.host.get_server_certificate(member) != x.host.get_server_certificate(master),
    )

    def new_vdi(sr, name):
        return x.VDI.create({
            "name_label": name, "name_description": "", "SR": sr,
            "virtual_size": str(4 * BLOCK), "type": "user", "sharable": False,
            "read_only": False, "other_config": {}, "xenstore_data": {},
            "sm_config": {}, "tags": [],
        })

    srs = x.SR.get_all_records()
    shared = [r for r, rec in srs.items() if rec["shared"]][0]
    local = [
        r for r, rec in srs.items()
        if not rec["shared"] and any(x.PBD.get_host(p) == member for p in rec["PBDs"])
    ][0]
    vdi = new_vdi(shared, "on the shared SR")
    entries = x.VDI.get_nbd_info(vdi)
    check(
        "pool: get_nbd_info of a shared-SR VDI lists both hosts",
        sorted(e["address"] for e in entries),
        sorted([x.host.get_address(master), member_address]),
    )
    x.VDI.destroy(vdi)
    vdi = new_vdi(local, "on the member's local SR")
    entries = x.VDI.get_nbd_info(vdi)
    check("pool: a member-local VDI is served by the member", [e["address"] for e in entries], [member_address])
    opener = urllib.request.build_opener(
        NoRedirect, urllib.request.HTTPSHandler(context=h.ssl)
    )
    url = h.url.rstrip("/") + "/export_raw_vdi?" + urllib.parse.urlencode(
        {"session_id": h.ref, "vdi": x.VDI.get_uuid(vdi), "format": "raw"}
    )
    try:
        opener.open(url)
        raise Mismatch("pool: export of a member-local VDI on the master: expected 302, got 200")
    except urllib.error.HTTPError as e:
        check("pool: export on the master redirects", e.code, 302)
        location = urllib.parse.urlparse(e.headers["location"])
        check("pool: redirected to the member", location.hostname, member_address)
        check("pool: same path", location.path, "/export_raw_vdi")
    x.VDI.destroy(vdi)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url")
    p.add_argument("--member", help="URL of a pool member (checks the pool behaviours)")
    p.add_argument("--user", default="root")
    p.add_argument("--password", default=os.environ.get("XENAPI_CONFORMANCE_PASSWORD"))
    a = p.parse_args()
    if not a.password:
        sys.exit("give --password or set XENAPI_CONFORMANCE_PASSWORD")
    try:
        h = Host(a.url, a.user, a.password)
        run(h)
        if a.member:
            # A session of its own: the checks above end theirs.
            run_pool(Host(a.url, a.user, a.password), a.member)
    except Mismatch as e:
        print("FAIL %s" % e)
        sys.exit(1)
    except XenAPI.Failure as e:
        print("FAIL unexpected XenAPI failure %s" % (e.details,))
        sys.exit(1)
    print("conformance: all checks passed (%d)" % CHECKS)


if __name__ == "__main__":
    main()
