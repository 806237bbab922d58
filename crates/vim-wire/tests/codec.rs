//! The codec against envelopes shaped like a real host's and pyVmomi's
//! (written here from the vim25 field lists, independently of the
//! encoder), round trips of every call and data object, and hostile input.

use proptest::prelude::*;
use vim_wire::device::{devices_of_config, BackingKind, DiskBacking};
use vim_wire::{
    ConfigSpec, DiskChangeExtent, DiskChangeInfo, Element, Fault, Method, Moref, ObjectSpec,
    PropertyFilterSpec, PropertySpec, PropertyValue, Request, Response, RetrieveOptions,
    SelectionSpec, TraversalSpec, VimFault, VirtualDevice, VirtualDisk,
};

const PYVMOMI_REQUEST: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
<soapenv:Body><QueryChangedDiskAreas xmlns="urn:vim25"><_this type="VirtualMachine">vm-42</_this><snapshot type="VirtualMachineSnapshot">snapshot-77</snapshot><deviceKey>2000</deviceKey><startOffset>0</startOffset><changeId>52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b/3</changeId></QueryChangedDiskAreas></soapenv:Body>
</soapenv:Envelope>"#;

#[test]
fn client_request_as_pyvmomi_sends_it() {
    let req = Request::from_envelope(PYVMOMI_REQUEST.as_bytes()).unwrap();
    assert_eq!(
        req,
        Request::QueryChangedDiskAreas {
            this: Moref::new("VirtualMachine", "vm-42"),
            snapshot: Some(Moref::new("VirtualMachineSnapshot", "snapshot-77")),
            device_key: 2000,
            start_offset: 0,
            change_id: "52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b/3".into(),
        }
    );
    // What we send decodes the same.
    assert_eq!(
        Request::from_envelope(req.to_envelope().as_bytes()).unwrap(),
        req
    );
}

#[test]
fn server_disk_change_info_and_task_moref() {
    let body = r#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/"
 xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"
 xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
<soapenv:Body>
<QueryChangedDiskAreasResponse xmlns="urn:vim25"><returnval>
  <startOffset>0</startOffset><length>2147483648</length>
  <changedArea><start>65536</start><length>131072</length></changedArea>
  <changedArea><start>1048576</start><length>512</length></changedArea>
</returnval></QueryChangedDiskAreasResponse>
</soapenv:Body></soapenv:Envelope>"#;
    let r = Response::from_envelope(Method::QueryChangedDiskAreas, body.as_bytes())
        .unwrap()
        .unwrap();
    assert_eq!(
        r,
        Response::DiskChangeInfo(DiskChangeInfo {
            start_offset: 0,
            length: 2147483648,
            changed_area: vec![
                DiskChangeExtent {
                    start: 65536,
                    length: 131072
                },
                DiskChangeExtent {
                    start: 1048576,
                    length: 512
                },
            ],
        })
    );
    let task = r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><ReconfigVM_TaskResponse xmlns="urn:vim25"><returnval type="Task">task-101</returnval></ReconfigVM_TaskResponse></soapenv:Body></soapenv:Envelope>"#;
    assert_eq!(
        Response::from_envelope(Method::ReconfigVmTask, task.as_bytes()).unwrap(),
        Ok(Response::Task(Moref::new("Task", "task-101")))
    );
    // The wrong response element for the method is an error, not a guess.
    assert!(Response::from_envelope(Method::CreateSnapshotTask, task.as_bytes()).is_err());
}

#[test]
fn server_devices_with_every_backing_kind() {
    let body = r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:xsd="http://www.w3.org/2001/XMLSchema">
<soapenv:Body><RetrievePropertiesExResponse xmlns="urn:vim25"><returnval><objects><obj type="VirtualMachineSnapshot">snapshot-77</obj>
<propSet><name>config.hardware.device</name><val xsi:type="ArrayOfVirtualDevice">
 <VirtualDevice xsi:type="VirtualLsiLogicController"><key>1000</key><deviceInfo><label>SCSI controller 0</label><summary>LSI Logic</summary></deviceInfo><busNumber>0</busNumber><device>2000</device><sharedBus>noSharing</sharedBus></VirtualDevice>
 <VirtualDevice xsi:type="VirtualDisk"><key>2000</key><deviceInfo><label>Hard disk 1</label><summary>16,777,216 KB</summary></deviceInfo>
  <backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[datastore1] vm/vm.vmdk</fileName><datastore type="Datastore">datastore-11</datastore><diskMode>persistent</diskMode><split>false</split><writeThrough>false</writeThrough><thinProvisioned>true</thinProvisioned><uuid>6000C29a-1b2c-3d4e-5f60-718293a4b5c6</uuid><contentId>3f2a0c3d5e6f7a8b9c0d1e2f3a4b5c6d</contentId><changeId>52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b/4</changeId><digestEnabled>false</digestEnabled></backing>
  <controllerKey>1000</controllerKey><unitNumber>0</unitNumber><capacityInKB>16777216</capacityInKB><capacityInBytes>17179869184</capacityInBytes></VirtualDevice>
 <VirtualDevice xsi:type="VirtualDisk"><key>2001</key><backing xsi:type="VirtualDiskRawDiskMappingVer1BackingInfo"><fileName>[datastore1] vm/vm_1.vmdk</fileName><lunUuid>0200000000</lunUuid><deviceName>/vmfs/devices/disks/naa.1</deviceName><compatibilityMode>physicalMode</compatibilityMode><diskMode>independent_persistent</diskMode></backing><controllerKey>1000</controllerKey><unitNumber>1</unitNumber><capacityInKB>1024</capacityInKB></VirtualDevice>
 <VirtualDevice xsi:type="VirtualDisk"><key>2002</key><backing xsi:type="VirtualDiskSeSparseBackingInfo"><fileName>[datastore1] vm/vm_2.vmdk</fileName><diskMode>persistent</diskMode></backing><capacityInKB>2048</capacityInKB></VirtualDevice>
 <VirtualDevice xsi:type="VirtualDisk"><key>2003</key><backing xsi:type="VirtualDiskRawDiskVer2BackingInfo"><deviceName>/dev/sdb</deviceName><descriptorFileName>[datastore1] vm/raw.vmdk</descriptorFileName><changeId>52 aa/1</changeId></backing><capacityInKB>4</capacityInKB></VirtualDevice>
</val></propSet></objects></returnval></RetrievePropertiesExResponse></soapenv:Body></soapenv:Envelope>"#;
    let Ok(Response::RetrieveResult(Some(r))) =
        Response::from_envelope(Method::RetrievePropertiesEx, body.as_bytes()).unwrap()
    else {
        panic!("not a RetrieveResult")
    };
    let Some(PropertyValue::Devices(devices)) = r.objects[0].property("config.hardware.device")
    else {
        panic!("no device list")
    };
    assert!(
        matches!(&devices[0], VirtualDevice::Other(e) if e.type_name() == Some("VirtualLsiLogicController"))
    );
    let disks: Vec<&VirtualDisk> = devices.iter().filter_map(|d| d.as_disk()).collect();
    assert_eq!(disks.len(), 4);
    let d = disks[0];
    assert_eq!((d.key, d.capacity_bytes()), (2000, 17179869184));
    assert_eq!(d.backing.kind, BackingKind::FlatVer2);
    assert_eq!(
        d.backing.change_id.as_deref(),
        Some("52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b/4")
    );
    assert_eq!(
        d.backing.datastore,
        Some(Moref::new("Datastore", "datastore-11"))
    );
    assert_eq!(d.backing.thin_provisioned, Some(true));
    assert_eq!(disks[1].backing.kind, BackingKind::RawDiskMappingVer1);
    assert_eq!(
        disks[1].backing.compatibility_mode.as_deref(),
        Some("physicalMode")
    );
    assert_eq!(
        disks[1].capacity_bytes(),
        1024 * 1024,
        "capacityInKB when no capacityInBytes"
    );
    assert_eq!(
        disks[2].backing.kind,
        BackingKind::Other("VirtualDiskSeSparseBackingInfo".into())
    );
    assert!(!disks[2].backing.kind.carries_change_id());
    assert_eq!(disks[3].backing.kind, BackingKind::RawDiskVer2);
    assert_eq!(disks[3].backing.file_name, "[datastore1] vm/raw.vmdk");
    // Re-encoded (fields not modelled dropped), the typed values survive.
    let again = Response::RetrieveResult(Some(r.clone())).to_envelope(Method::RetrievePropertiesEx);
    let Ok(Response::RetrieveResult(Some(r2))) =
        Response::from_envelope(Method::RetrievePropertiesEx, again.as_bytes()).unwrap()
    else {
        panic!()
    };
    assert_eq!(
        r2.objects[0].property("config.hardware.device"),
        Some(&PropertyValue::Devices(devices.clone()))
    );
}

#[test]
fn opaque_config_round_trips_and_yields_devices() {
    let config = r#"<config xmlns="urn:vim25" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="VirtualMachineConfigInfo"><changeVersion>2026-11-21T22:00:00.1Z</changeVersion><name>a &amp; b</name><hardware><numCPU>2</numCPU><device xsi:type="VirtualDisk"><key>2000</key><backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds] a/a.vmdk</fileName><diskMode>persistent</diskMode></backing><capacityInKB>1024</capacityInKB></device></hardware><extraConfig xsi:type="OptionValue"><key>k</key><value xsi:type="xsd:string" xmlns:xsd="http://www.w3.org/2001/XMLSchema">v</value></extraConfig><changeTrackingEnabled>true</changeTrackingEnabled></config>"#;
    let el = vim_wire::xml::parse(config.as_bytes()).unwrap();
    let v = PropertyValue::decode(&el).unwrap();
    assert!(
        matches!(&v, PropertyValue::Other(e) if e == &el),
        "config stays opaque"
    );
    let stored = v.encode("config").to_document();
    assert_eq!(vim_wire::xml::parse(stored.as_bytes()).unwrap(), el);
    let devices = devices_of_config(&el).unwrap();
    assert_eq!(devices[0].key(), Some(2000));
}

#[test]
fn faults_as_a_host_sends_them() {
    let body = r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>Error caused by file /vmfs/volumes/ds/vm/vm.vmdk</faultstring><detail><FileFaultFault xmlns="urn:vim25" xsi:type="FileFault"><file>/vmfs/volumes/ds/vm/vm.vmdk</file></FileFaultFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#;
    let f: Fault = Response::from_envelope(Method::QueryChangedDiskAreas, body.as_bytes())
        .unwrap()
        .unwrap_err();
    assert_eq!(
        f.detail,
        Some(VimFault::FileFault {
            file: "/vmfs/volumes/ds/vm/vm.vmdk".into()
        })
    );
    assert_eq!(
        f.to_string(),
        "FileFault (ServerFaultCode): Error caused by file /vmfs/volumes/ds/vm/vm.vmdk"
    );
}

#[test]
fn hostile_bodies_are_typed_errors() {
    for bad in [
        &b""[..],
        b"<soapenv:Envelope/>",
        b"<Envelope xmlns='http://schemas.xmlsoap.org/soap/envelope/'><Body><QueryChangedDiskAreas xmlns='urn:vim25'><_this>vm</_this></QueryChangedDiskAreas></Body></Envelope>",
        b"<Envelope xmlns='http://schemas.xmlsoap.org/soap/envelope/'><Body><QueryChangedDiskAreas xmlns='urn:vim25'><_this type='VirtualMachine'>vm-1</_this><deviceKey>99999999999</deviceKey><startOffset>0</startOffset><changeId>*</changeId></QueryChangedDiskAreas></Body></Envelope>",
        b"<Envelope xmlns='http://schemas.xmlsoap.org/soap/envelope/'><Body><Login xmlns='urn:vim25'><_this type='SessionManager'>s</_this></Login></Body></Envelope>",
    ] {
        assert!(Request::from_envelope(bad).is_err(), "{}", String::from_utf8_lossy(bad));
    }
    let e = Request::from_envelope(
        b"<Envelope xmlns='http://schemas.xmlsoap.org/soap/envelope/'><Body><CreateSnapshot_Task xmlns='urn:vim25'><_this type='VirtualMachine'>vm-1</_this><name>n</name><memory>maybe</memory><quiesce>false</quiesce></CreateSnapshot_Task></Body></Envelope>",
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "bad <memory> in <CreateSnapshot_Task>: 'maybe' is not a boolean"
    );
    // An unmodelled call is not an error: the server answers MethodNotFound.
    let r = Request::from_envelope(b"<Envelope xmlns='http://schemas.xmlsoap.org/soap/envelope/'><Body><PowerOnVM_Task xmlns='urn:vim25'><_this type='VirtualMachine'>vm-1</_this></PowerOnVM_Task></Body></Envelope>").unwrap();
    assert_eq!(r.method_name(), "PowerOnVM_Task");
    assert_eq!(r.this(), Some(&Moref::new("VirtualMachine", "vm-1")));
}

// ------------------------------------------------------------ round trips

/// Strings XML can carry (no control characters but tab/newline/CR).
fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 \\-_/.<>&\"'\t\n\r\u{e9}\u{4e2d}*\\[\\]]{0,24}"
}

fn nonempty() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9\\-_.:]{1,16}"
}

fn moref() -> impl Strategy<Value = Moref> {
    (nonempty(), nonempty()).prop_map(|(k, v)| Moref::new(&k, &v))
}

fn backing() -> impl Strategy<Value = DiskBacking> {
    (
        prop_oneof![
            Just(BackingKind::FlatVer2),
            Just(BackingKind::SparseVer2),
            Just(BackingKind::RawDiskMappingVer1),
            Just(BackingKind::RawDiskVer2)
        ],
        text(),
        proptest::option::of(moref()),
        proptest::option::of(text()),
        proptest::option::of(any::<bool>()),
        proptest::option::of(text()),
        proptest::option::of(text()),
    )
        .prop_map(|(kind, file, ds, uuid, thin, content, change)| {
            let mut b = DiskBacking::flat(&file, None);
            b.disk_mode = None;
            b.thin_provisioned = None;
            match kind {
                BackingKind::FlatVer2 => {
                    b.datastore = ds;
                    b.thin_provisioned = thin;
                    b.disk_mode = Some("persistent".into());
                    b.content_id = content;
                }
                BackingKind::SparseVer2 => {
                    b.datastore = ds;
                    b.content_id = content;
                }
                BackingKind::RawDiskMappingVer1 => {
                    b.datastore = ds;
                    b.compatibility_mode = Some("virtualMode".into());
                    b.device_name = Some("/vmfs/devices/disks/naa.1".into());
                    b.content_id = content;
                }
                BackingKind::RawDiskVer2 | BackingKind::Other(_) => {
                    b.device_name = Some("/dev/sdb".into());
                }
            }
            b.kind = kind;
            b.uuid = uuid;
            b.change_id = change;
            b
        })
}

fn disk() -> impl Strategy<Value = VirtualDevice> {
    (
        any::<i32>(),
        proptest::option::of(text()),
        backing(),
        proptest::option::of(any::<i32>()),
        any::<i64>(),
        proptest::option::of(any::<i64>()),
    )
        .prop_map(|(key, label, backing, unit, kb, bytes)| {
            VirtualDevice::Disk(VirtualDisk {
                key,
                summary: label.as_ref().map(|_| "s".to_string()),
                label,
                backing,
                controller_key: unit.map(|_| 1000),
                unit_number: unit,
                capacity_in_kb: kb,
                capacity_in_bytes: bytes,
            })
        })
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        moref().prop_map(|this| Request::RetrieveServiceContent { this }),
        (moref(), text(), text(), proptest::option::of(text())).prop_map(|(this, u, p, l)| {
            Request::Login {
                this,
                user_name: u,
                password: p,
                locale: l,
            }
        }),
        moref().prop_map(|this| Request::Logout { this }),
        (
            moref(),
            moref(),
            nonempty(),
            proptest::option::of(1i32..1000)
        )
            .prop_map(|(this, obj, path, max)| {
                Request::RetrievePropertiesEx {
                    this,
                    spec_set: vec![PropertyFilterSpec {
                        prop_set: vec![PropertySpec::new(
                            "VirtualMachine",
                            &[&path, "config.hardware.device"],
                        )],
                        object_set: vec![ObjectSpec {
                            obj,
                            skip: Some(true),
                            select_set: vec![SelectionSpec::Traversal(TraversalSpec {
                                name: Some("t".into()),
                                kind: "Folder".into(),
                                path: "childEntity".into(),
                                skip: Some(false),
                                select_set: vec![SelectionSpec::Named("t".into())],
                            })],
                        }],
                    }],
                    options: RetrieveOptions { max_objects: max },
                }
            }),
        (moref(), nonempty())
            .prop_map(|(this, token)| Request::ContinueRetrievePropertiesEx { this, token }),
        (
            moref(),
            proptest::option::of(moref()),
            nonempty(),
            any::<bool>(),
            proptest::option::of(any::<bool>())
        )
            .prop_map(|(this, datacenter, uuid, vm_search, instance_uuid)| {
                Request::FindByUuid {
                    this,
                    datacenter,
                    uuid,
                    vm_search,
                    instance_uuid,
                }
            }),
        (moref(), text()).prop_map(|(this, inventory_path)| Request::FindByInventoryPath {
            this,
            inventory_path
        }),
        (moref(), proptest::option::of(any::<bool>())).prop_map(|(this, cbt)| {
            Request::ReconfigVmTask {
                this,
                spec: ConfigSpec {
                    change_tracking_enabled: cbt,
                    other: vec![Element::leaf("annotation", "note")],
                },
            }
        }),
        (
            moref(),
            text(),
            proptest::option::of(text()),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(this, name, description, memory, quiesce)| {
                Request::CreateSnapshotTask {
                    this,
                    name,
                    description,
                    memory,
                    quiesce,
                }
            }),
        (moref(), any::<bool>(), proptest::option::of(any::<bool>())).prop_map(
            |(this, remove_children, consolidate)| Request::RemoveSnapshotTask {
                this,
                remove_children,
                consolidate
            }
        ),
        (
            moref(),
            proptest::option::of(moref()),
            any::<i32>(),
            any::<i64>(),
            nonempty()
        )
            .prop_map(|(this, snapshot, device_key, start_offset, change_id)| {
                Request::QueryChangedDiskAreas {
                    this,
                    snapshot,
                    device_key,
                    start_offset,
                    change_id,
                }
            }),
        (moref(), text(), proptest::option::of(moref())).prop_map(|(this, name, datacenter)| {
            Request::DeleteDatastoreFileTask {
                this,
                name,
                datacenter,
            }
        }),
        (
            moref(),
            text(),
            proptest::option::of(moref()),
            proptest::option::of(any::<bool>())
        )
            .prop_map(|(this, name, datacenter, create_parent_directories)| {
                Request::MakeDirectory {
                    this,
                    name,
                    datacenter,
                    create_parent_directories,
                }
            }),
    ]
}

proptest! {
    #[test]
    fn every_request_round_trips(req in request()) {
        prop_assert_eq!(Request::from_envelope(req.to_envelope().as_bytes()).unwrap(), req);
    }

    #[test]
    fn devices_round_trip(devices in proptest::collection::vec(disk(), 0..4)) {
        let v = PropertyValue::Devices(devices);
        let mut s = String::new();
        v.encode("val").write_root(&mut s);
        let back = PropertyValue::decode(&vim_wire::xml::parse(s.as_bytes()).unwrap()).unwrap();
        prop_assert_eq!(back, v);
    }

    #[test]
    fn disk_change_info_round_trips(start in any::<i64>(), len in any::<i64>(),
                                    areas in proptest::collection::vec((any::<i64>(), any::<i64>()), 0..10)) {
        let r = Response::DiskChangeInfo(DiskChangeInfo {
            start_offset: start,
            length: len,
            changed_area: areas.into_iter().map(|(start, length)| DiskChangeExtent { start, length }).collect(),
        });
        prop_assert_eq!(
            Response::from_envelope(Method::QueryChangedDiskAreas, r.to_envelope(Method::QueryChangedDiskAreas).as_bytes()).unwrap(),
            Ok(r)
        );
    }

    #[test]
    fn scalar_values_round_trip(s in text(), b in any::<bool>(), i in any::<i32>(), l in any::<i64>(), m in moref(),
                                ms in proptest::collection::vec(moref(), 0..4)) {
        for v in [PropertyValue::String(s.clone()), PropertyValue::Bool(b), PropertyValue::Int(i),
                  PropertyValue::Long(l), PropertyValue::Moref(m.clone()), PropertyValue::Morefs(ms.clone())] {
            let mut out = String::new();
            v.encode("val").write_root(&mut out);
            prop_assert_eq!(PropertyValue::decode(&vim_wire::xml::parse(out.as_bytes()).unwrap()).unwrap(), v);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = Request::from_envelope(&raw);
        for m in Method::ALL {
            let _ = Response::from_envelope(m, &raw);
        }
    }

    #[test]
    fn mutated_envelopes_never_panic(cut in 0usize..PYVMOMI_REQUEST.len(), byte in any::<u8>()) {
        let mut raw = PYVMOMI_REQUEST.as_bytes().to_vec();
        raw[cut] = byte;
        let _ = Request::from_envelope(&raw);
        let _ = Request::from_envelope(&raw[..cut]);
    }
}

/// What the fuzz target asserts, over mutations of host-shaped bodies: a
/// decoded request, response or fault re-encodes to the same value.
fn reencodes_stably(raw: &[u8]) {
    if let Ok(req) = Request::from_envelope(raw) {
        assert_eq!(
            Request::from_envelope(req.to_envelope().as_bytes()).unwrap(),
            req
        );
    }
    for m in Method::ALL {
        match Response::from_envelope(m, raw) {
            Ok(Ok(r)) => assert_eq!(
                Response::from_envelope(m, r.to_envelope(m).as_bytes()).unwrap(),
                Ok(r)
            ),
            Ok(Err(f)) => assert_eq!(
                Response::from_envelope(m, f.to_envelope().as_bytes()).unwrap(),
                Err(f)
            ),
            Err(_) => {}
        }
    }
}

fn samples() -> Vec<String> {
    let devices = Response::RetrieveResult(Some(vim_wire::RetrieveResult {
        token: Some("t-1".into()),
        objects: vec![vim_wire::ObjectContent {
            obj: Moref::new("VirtualMachine", "vm-1"),
            prop_set: vec![vim_wire::DynamicProperty {
                name: "config.hardware.device".into(),
                val: PropertyValue::Devices(vec![VirtualDevice::Disk(VirtualDisk {
                    key: 2000,
                    label: Some("Hard disk 1".into()),
                    summary: Some("1 KB".into()),
                    backing: DiskBacking::flat("[d] a/a.vmdk", Some(Moref::new("Datastore", "d"))),
                    controller_key: Some(1000),
                    unit_number: Some(0),
                    capacity_in_kb: 1,
                    capacity_in_bytes: Some(1024),
                })]),
            }],
            missing_set: vec![],
        }],
    }))
    .to_envelope(Method::RetrievePropertiesEx);
    vec![
        PYVMOMI_REQUEST.to_string(),
        devices,
        Fault::new(
            "x",
            VimFault::ManagedObjectNotFound {
                obj: Moref::new("Task", "task-1"),
            },
        )
        .to_envelope(),
        Response::Task(Moref::new("Task", "task-1")).to_envelope(Method::CreateSnapshotTask),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
    #[test]
    fn mutated_bodies_reencode_stably(which in 0usize..4, at in any::<prop::sample::Index>(),
                                      byte in prop::sample::select(b"<>/&;\"' =:xX0a\n\r\t".to_vec()),
                                      delete in any::<bool>()) {
        let mut raw = samples()[which].clone().into_bytes();
        let i = at.index(raw.len());
        if delete { raw.remove(i); } else { raw[i] = byte; }
        reencodes_stably(&raw);
    }
}
